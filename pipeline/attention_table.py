"""The contract of ``attention/<split>-NNNNN.parquet`` (DESIGN §3), shared by the stage that
writes it (attend) and the one that reads it (build-memory).

One row per word of every kept caption token: the image, the caption, the word's position in
the caption's kept tokens, its vocabulary id, the most salient region q_n (an index into the
stored box order of that image's row in the region shard) and its weight a_{q_n,n} (Eq. 7).
Kept in a module of its own, with no torch import, so dask workers reading the table stay light.
"""
import pyarrow as pa

ATTENTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("caption_id", pa.int64()),
        ("position", pa.int16()),
        ("word_id", pa.int32()),
        ("region", pa.int16()),
        ("weight", pa.float32()),
    ]
)
