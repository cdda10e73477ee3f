"""``cpgan-prep attend``: the most salient region of every word of every caption (§3.2.1, Eq. 7).

For each caption of the split, one teacher-forced pass of the trained Up-Down captioner gives,
at every step, the attention over the image's regions. The step that *predicts* the word at
position n (0-based among the caption's kept tokens) is step n of ``CaptionerOutput``, whose
input is the previous token (``<bos>`` for the first word). From its distribution we keep

    q_n = argmax_i a_{i,n}  over the image's real regions,   and   a_{q_n,n}

exactly the quantities Eq. 7 consumes. Special tokens are not words (``<bos>`` is never a
target, ``<eos>``/``<pad>`` are dropped); ``<unk>`` words keep their id 1.

Output, one part per region shard with the same number: ``attention/<split>-NNNNN.parquet``
with columns image_id int64, caption_id int64, position int16, word_id int32, region int16
(index into the stored box order of the image's shard row), weight float32, rows sorted by
(image_id, caption_id, position). Each part is one dask task (like detect), written atomically
with its provenance (captioner and vocabulary digests, the region shard's provenance or digest,
a digest of the encoded captions, parameters) in the Parquet schema metadata; a finished part
with equal provenance is reused, so a killed run resumes and gives the same files.

The grounding report (``attention/grounding.json``; ``grounding-<split>.json`` for splits other
than train2014) measures whether the attention means something: for caption words naming an
instance category, the fraction of occurrences whose chosen box overlaps (IoU >= 0.5) an
annotated instance of that category in the image. It is computed from the Parquet parts, the
region boxes and the instances only, so anyone can recompute it.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from cpgan import __version__
from cpgan.errors import CpganError
from cpgan.model.butd import BOS_ID, EOS_ID, PAD_ID, salient_regions
from cpgan.pipeline import regions as store
from cpgan.pipeline.attention_table import ATTENTION_SCHEMA
from cpgan.pipeline.artifacts import (
    atomic_write,
    atomic_write_text,
    folder_lock,
    read_parquet,
    sweep_temporaries,
)
from cpgan.pipeline.categories import HIT_IOU, category_words, region_hits
from cpgan.pipeline.cluster import run_tasks
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import Vocabulary
from cpgan.trainer.captioner import (
    CaptionPairs,
    RegionEncoding,
    load_captioner,
    make_batch,
    plan_split,
    read_shard_arrays,
)

SCHEMA = ATTENTION_SCHEMA
METADATA_KEY = b"cpgan.attend"
SORT_KEYS = [("image_id", "ascending"), ("caption_id", "ascending"), ("position", "ascending")]
NOT_WORDS = (PAD_ID, BOS_ID, EOS_ID)


def part_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.parquet"


def grounding_path(out_dir: Path, split: str) -> Path:
    """``grounding.json`` for the training split (the one the memory is built from)."""
    return Path(out_dir) / ("grounding.json" if split == "train2014" else f"grounding-{split}.json")


@dataclass(frozen=True)
class AttendSettings:
    """Everything a worker needs, as plain data so dask can ship it to another machine."""

    captioner: str
    captioner_sha256: str
    vocab_sha256: str
    max_words: int
    batch_size: int = 256
    device: str = "cpu"

    def provenance(self, shard: Path, pairs: CaptionPairs) -> dict[str, Any]:
        """What decides a part's content: a part with equal provenance can be reused."""
        return {"captioner_sha256": self.captioner_sha256, "vocab_sha256": self.vocab_sha256,
                "regions": shard_provenance(shard), "captions_sha256": pairs_digest(pairs),
                "max_words": self.max_words, "version": __version__}


def shard_provenance(path: Path) -> Any:
    """The shard's own provenance attribute (detect writes one), else the file's SHA-256.

    Hashing every multi-GB shard on each run just to check a resume would be wasteful when
    detect already records what decides the shard's content.
    """
    attrs = store.shard_attrs(path)
    if attrs is None:
        raise CpganError(f"{path}: not a readable region shard")
    if "provenance" in attrs:
        return attrs["provenance"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"sha256": digest.hexdigest()}


def pairs_digest(pairs: CaptionPairs) -> str:
    """SHA-256 of the encoded captions: covers caption text, vocabulary ids, length rule, limit."""
    digest = hashlib.sha256()
    for array in (pairs.rows, pairs.image_ids, pairs.caption_ids, pairs.tokens):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------ one part


@torch.no_grad()
def attend_batch(model: torch.nn.Module, inputs: np.ndarray, num_regions: np.ndarray,
                 pairs: CaptionPairs, device: str = "cpu") -> dict[str, np.ndarray]:
    """Rows (image_id, caption_id, position, word_id, region, weight) of a batch of captions.

    ``inputs``/``num_regions`` are the region inputs (``read_shard_arrays``) and counts of a
    shard's rows, which ``pairs.rows`` indexes. Target ``captions[:, n + 1]`` is the word at
    position n, predicted by step n, whose attention is ``attention[:, n]``
    (see ``CaptionerOutput``).
    """
    batch = make_batch(inputs, num_regions, pairs).to(device)
    out = model(batch.features, batch.mask, batch.captions)
    region, weight = salient_regions(out.attention, batch.mask)
    targets = batch.captions[:, 1:]
    keep = torch.ones_like(targets, dtype=torch.bool)
    for special in NOT_WORDS:
        keep &= targets != special
    which, position = keep.nonzero(as_tuple=True)
    which_np = which.cpu().numpy()
    return {
        "image_id": pairs.image_ids[which_np],
        "caption_id": pairs.caption_ids[which_np],
        "position": position.cpu().numpy().astype(np.int16),
        "word_id": targets[which, position].cpu().numpy().astype(np.int32),
        "region": region[which, position].cpu().numpy().astype(np.int16),
        "weight": weight[which, position].cpu().numpy().astype(np.float32),
    }


def sorted_table(parts: Sequence[dict[str, np.ndarray]]) -> pa.Table:
    """One table in the part schema, sorted by (image_id, caption_id, position)."""
    columns = {name: np.concatenate([p[name] for p in parts]) if parts
               else np.zeros(0, dtype=SCHEMA.field(name).type.to_pandas_dtype())
               for name in SCHEMA.names}
    order = np.lexsort((columns["position"], columns["caption_id"], columns["image_id"]))
    return pa.table({name: columns[name][order] for name in SCHEMA.names}, schema=SCHEMA)


_WORKER_CACHE: dict[tuple[str, str, str], tuple[torch.nn.Module, RegionEncoding]] = {}


def _captioner(settings: AttendSettings) -> tuple[torch.nn.Module, RegionEncoding]:
    """The captioner of this worker process and its input encoding, loaded once per digest."""
    key = (settings.captioner, settings.captioner_sha256, settings.device)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        model, encoding, _ = load_captioner(settings.captioner)
        _WORKER_CACHE[key] = model.to(settings.device).eval(), encoding
    return _WORKER_CACHE[key]


def run_part(settings: AttendSettings, shard_path: str, part_path: str, pairs: CaptionPairs,
             provenance: dict[str, Any]) -> int:
    """Attend every caption of one shard and write its part atomically; returns the captions.

    Pairs are ordered by shard row, so each batch reads one contiguous row slice of features.
    """
    # One torch thread per task: CPU kernels sum in a thread-count-dependent order, and the
    # parts must not depend on how many workers ran them. Use --workers for more cores.
    torch.set_num_threads(1)
    model, encoding = _captioner(settings)
    pieces: list[dict[str, np.ndarray]] = []
    order = np.argsort(pairs.rows, kind="stable")
    for start in range(0, len(order), settings.batch_size):
        batch = pairs.take(order[start:start + settings.batch_size])
        first, last = int(batch.rows.min()), int(batch.rows.max()) + 1
        inputs, counts = read_shard_arrays(Path(shard_path), encoding, slice(first, last))
        local = CaptionPairs(batch.rows - first, batch.image_ids, batch.caption_ids,
                             batch.tokens, 0)
        pieces.append(attend_batch(model, inputs, counts, local, settings.device))
    table = sorted_table(pieces)
    summary = {"images": int(len(np.unique(pairs.image_ids))), "captions": len(pairs),
               "rows": table.num_rows, "skipped_empty": pairs.skipped_empty}
    meta = json.dumps({"provenance": provenance, "summary": summary}, sort_keys=True)
    table = table.replace_schema_metadata({METADATA_KEY: meta.encode("utf-8")})
    with atomic_write(Path(part_path)) as tmp:
        pq.write_table(table, tmp)
    return len(pairs)


def part_metadata(path: Path) -> dict[str, Any] | None:
    """The provenance and summary of a finished part, or None when absent or unreadable."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[METADATA_KEY])
    except (FileNotFoundError, OSError, pa.ArrowInvalid, KeyError, ValueError):
        return None


def read_part(path: Path) -> pa.Table:
    """Read and validate one attention part (schema exactly as DESIGN §3)."""
    table = read_parquet(path, "attention part is missing (run 'cpgan-prep attend')")
    if not table.schema.remove_metadata().equals(SCHEMA):
        raise CpganError(f"{path}: columns {table.schema.names} do not match the attention "
                         "schema")
    return table


# ------------------------------------------------------------------------------ grounding


def grounding_report(split: CocoSplit, vocab: Vocabulary, parts: Sequence[Path],
                     shards: Sequence[Path]) -> dict[str, Any]:
    """Fraction of category-word occurrences whose region overlaps an instance of the category.

    ``parts[i]`` must be the attention part of ``shards[i]``. Words are those of
    :func:`category_words` that are in the vocabulary (``<unk>`` rows name nothing).
    """
    words = {vocab.id(w): (w, c) for w, c in category_words(split).items() if w in vocab.tokens}
    names = split.categories()
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for part, shard_path in zip(parts, shards):
        table = read_part(part)
        word_ids = table["word_id"].to_numpy()
        chosen = np.isin(word_ids, list(words))
        if not chosen.any():
            continue
        with store.RegionShard(shard_path) as shard:
            row_of = {int(i): r for r, i in enumerate(shard.read("image_id"))}
            boxes = shard.read("boxes")
        instances: dict[int, list[dict]] = {}
        for image_id, word_id, region in zip(table["image_id"].to_numpy()[chosen],
                                             word_ids[chosen],
                                             table["region"].to_numpy()[chosen]):
            image_id = int(image_id)
            if image_id not in instances:
                instances = {image_id: split.instances(image_id)}
            word, category = words[int(word_id)]
            box = boxes[row_of[image_id], int(region)]
            counts[word][0] += 1
            counts[word][1] += region_hits(box.tolist(), instances[image_id], category)
    per_word = {word: {"category": names[category], "occurrences": counts[word][0],
                       "hits": counts[word][1], "fraction": _fraction(*counts[word])}
                for word, category in sorted(words.values()) if counts[word][0]}
    total = [sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())]
    return {"split": split.split, "iou_threshold": HIT_IOU,
            "overall": {"occurrences": total[0], "hits": total[1], "fraction": _fraction(*total)},
            "words": per_word}


def _fraction(occurrences: int, hits: int) -> float | None:
    return round(hits / occurrences, 6) if occurrences else None


# ------------------------------------------------------------------------------ the stage


def remove_unplanned_parts(split: str, count: int, out_dir: Path) -> list[Path]:
    """Delete parts of ``split`` beyond ``count`` (an earlier run over more shards)."""
    planned = {part_name(split, i) for i in range(count)}
    removed = [p for p in out_dir.glob(f"{split}-*.parquet") if p.name not in planned]
    for path in removed:
        path.unlink()
    return removed


def attend(split: CocoSplit, vocab: Vocabulary, settings: AttendSettings, regions_dir: Path,
           out_dir: Path, *, limit: int | None, workers: int, scheduler: str | None,
           progress: bool = True) -> tuple[dict[str, Any], list[Path], Path | None]:
    """Run the stage for one split: (summary, part paths, grounding report path or None).

    ``limit`` keeps the first N images in shard order. The grounding report needs the split's
    instances file; without one it is not written.
    """
    # the workers of a --scheduler cluster have another cwd: they get absolute paths
    regions_dir, out_dir = Path(regions_dir).resolve(), Path(out_dir).resolve()
    with folder_lock(out_dir, "attend"):
        return _attend(split, vocab, settings, regions_dir, out_dir, limit=limit,
                       workers=workers, scheduler=scheduler, progress=progress)


def _attend(split: CocoSplit, vocab: Vocabulary, settings: AttendSettings, regions_dir: Path,
            out_dir: Path, *, limit: int | None, workers: int, scheduler: str | None,
            progress: bool) -> tuple[dict[str, Any], list[Path], Path | None]:
    sweep_temporaries(out_dir)
    shards, counts = plan_split(regions_dir, split, vocab, settings.max_words, limit)
    load_captioner(settings.captioner, len(vocab), counts["feature_dim"])  # fail here, once
    remove_unplanned_parts(split.split, len(shards), out_dir)
    parts = [out_dir / part_name(split.split, i) for i in range(len(shards))]
    tasks = []
    for shard, part in zip(shards, parts):
        provenance = settings.provenance(shard.path, shard.pairs)
        known = part_metadata(part)
        if known is None or known.get("provenance") != provenance:
            tasks.append((settings, str(shard.path), str(part), shard.pairs, provenance))
    total = sum(len(s.pairs) for s in shards)
    run_tasks(run_part, tasks, workers=workers, scheduler=scheduler, total=total,
              initial=total - sum(len(t[3]) for t in tasks), description=f"attend {split.split}",
              unit="cap", progress=progress)
    # a worker killed mid-write leaves its temporary; dask has since redone its task elsewhere
    sweep_temporaries(out_dir, f"{split.split}-")
    summary = {"images": 0, "captions": 0, "rows": 0, "skipped_empty": 0}
    for part in parts:
        for key, value in (part_metadata(part) or {}).get("summary", {}).items():
            summary[key] += value
    summary.update(skipped_failed=counts["skipped_failed"], parts=len(parts),
                   reused_parts=len(parts) - len(tasks))
    report = None
    if split.has_instances:
        report = grounding_path(out_dir, split.split)
        grounding = grounding_report(split, vocab, parts, [s.path for s in shards])
        atomic_write_text(report, json.dumps(grounding, indent=1, sort_keys=True) + "\n")
        summary["grounding"] = grounding["overall"]["fraction"]
    return summary, parts, report


# ------------------------------------------------------------------------------ the picture


def caption_rows(part: Path, image_id: int, caption_id: int | None) -> tuple[int, pa.Table]:
    """(caption id, its rows by position) of one image; the image's first caption by default."""
    table = read_part(part)
    table = table.filter(pc.equal(table["image_id"], image_id))
    if table.num_rows == 0:
        raise CpganError(f"{part}: no attention rows for image {image_id}")
    if caption_id is None:
        caption_id = int(pc.min(table["caption_id"]).as_py())
    rows = table.filter(pc.equal(table["caption_id"], caption_id))
    if rows.num_rows == 0:
        available = sorted(set(table["caption_id"].to_pylist()))
        raise CpganError(f"{part}: image {image_id} has no caption {caption_id} "
                         f"(it has {', '.join(map(str, available))})")
    return caption_id, rows.sort_by("position")


def draw_attention(image: np.ndarray, words: Sequence[str], regions: Sequence[int],
                   boxes: np.ndarray, weights: Sequence[float], title: str, out: Path) -> None:
    """The image with each word's chosen box and weight, saved as PNG.

    ``regions[k]``/``boxes[k]`` are word k's region index and box. Each chosen region gets
    one colour and a tag with the positions of the words that chose it; the key beside the
    image lists every word in caption order as "position word weight" in its region's colour,
    so words sharing a box, or boxes nearly on top of each other, stay readable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    height, width = image.shape[:2]
    scale = 5.0 / max(height, width)
    fig, (ax, key) = plt.subplots(
        1, 2, figsize=(width * scale + 2.6, max(height * scale, 0.22 * len(words)) + 0.8),
        dpi=120, gridspec_kw={"width_ratios": [width * scale, 2.4]})
    ax.imshow(image)
    ax.set_axis_off()
    key.set_axis_off()
    fig.suptitle(title, fontsize=9, wrap=True)
    palette = plt.get_cmap("tab10")
    order = list(dict.fromkeys(int(r) for r in regions))
    colour = {region: palette(i % 10) for i, region in enumerate(order)}
    for region in order:
        chosen = [k for k, r in enumerate(regions) if int(r) == region]
        x1, y1, x2, y2 = (float(v) for v in boxes[chosen[0]])
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, ec=colour[region]))
        ax.text(x1, y1, ",".join(map(str, chosen)), fontsize=7, va="bottom", color="white",
                bbox={"facecolor": colour[region], "alpha": 0.85, "pad": 1, "edgecolor": "none"})
    for k, (word, region, weight) in enumerate(zip(words, regions, weights)):
        key.text(0.0, 1.0 - (k + 0.5) / max(len(words), 12), f"{k:>2} {word} {weight:.2f}",
                 fontsize=8, family="monospace", va="center", color=colour[int(region)],
                 transform=key.transAxes)
    with atomic_write(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
