"""Builders of the small on-disk artifacts that several test modules set up the same way.

A plain module, not a test file: pytest puts tests/ on ``sys.path`` (rootdir conftest, the
default "prepend" import mode), so test modules import it as ``from builders import ...``.
Every builder writes exactly what the named pipeline stage would write, with tiny random
contents, so a test need not run the stage (or wait for training) to get its input.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch

from cpgan.config import Config
from cpgan.errors import CpganError
from cpgan.model.darknet import Darknet, write_weights
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import Vocabulary, build_vocabulary
from cpgan.trainer import damsm

CFG = Path(__file__).resolve().parent.parent / "configs" / "darknet" / "yolov3-toy.cfg"
"""The tiny Darknet layout every test detector is built from."""


def toy_vocabulary(coco: Path, save_to: Path | None = None) -> Vocabulary:
    """The vocabulary of every caption of ``coco``'s train2014 split (what
    'cpgan-prep vocab' builds), saved as vocab.json at ``save_to`` when given."""
    split = CocoSplit.open(coco, "train2014")
    vocab = build_vocabulary(t for i in split.image_ids() for _, t in split.captions(i))
    if save_to is not None:
        vocab.save(save_to)
    return vocab


def random_detector(seed: int) -> Darknet:
    """An untrained yolov3-toy detector (CFG) drawn after ``torch.manual_seed(seed)``, in eval
    mode with every parameter frozen, as the DAMSM and GAN stages hold their detector."""
    torch.manual_seed(seed)
    return Darknet.from_cfg_file(CFG).eval().requires_grad_(False)


def write_random_weights(path: Path, seed: int = 0) -> Path:
    """``path``: the weights of :func:`random_detector` (``seed``) in the Darknet ``.weights``
    format (header + flat float32 parameters, what '--weights' / '--detector-weights' read)."""
    write_weights(random_detector(seed), path)
    return path


def random_memory(words: int, dim: int, seed: int | None = None) -> torch.Tensor:
    """A random ``words x dim`` memory bank whose 4 special tokens' rows are zero, as the bank
    builder leaves them. Drawn from a generator seeded with ``seed``, or from torch's global
    generator when ``seed`` is None."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    memory = torch.randn(words, dim, generator=generator)
    memory[:4] = 0
    return memory


def write_memory_file(path: Path, vocab: Vocabulary, memory: torch.Tensor, *, topk: int = 5,
                      relevant: int = 7, split: str | None = None) -> None:
    """``path``: a memory.h5 in the DESIGN §3 layout (what 'cpgan-prep build-memory' writes).

    Datasets ``memory`` (float32, one row a word), ``words`` (utf-8 tokens), ``relevant``
    (``relevant`` regions for each word with a non-zero row, 0 for the others) and ``support``
    (``min(relevant, topk)`` of them); attributes ``topk``, ``feature_dim`` and, when given,
    ``split``. No memory_index.parquet is written.
    """
    counts = np.where(memory.abs().sum(1).numpy() > 0, relevant, 0).astype(np.int32)
    with h5py.File(path, "w") as f:
        f.create_dataset("memory", data=memory.numpy().astype(np.float32))
        f.create_dataset("words", data=np.asarray(vocab.tokens, dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("support", data=np.minimum(counts, topk).astype(np.int32))
        f.create_dataset("relevant", data=counts)
        f.attrs["topk"] = topk
        f.attrs["feature_dim"] = memory.shape[1]
        if split is not None:
            f.attrs["split"] = split


def write_encoder_file(models: Path, vocab: Vocabulary, config: Config,
                       memory: torch.Tensor | None = None, detector: Darknet | None = None, *,
                       seed: int | None = None) -> Path:
    """Untrained MATE + OAIE saved exactly as trainer/damsm.py's train_damsm saves its result.

    The file is ``damsm.model_path(models, use_memory, use_objects)`` (models/damsm*.pt),
    with use_memory = ``memory`` given and use_objects = ``detector`` given: a dict with
    ``format``, ``text_encoder`` (MATE without the memory), ``image_encoder`` (the learned
    state only), ``config`` (damsm.encoder_record) and empty ``metrics``. The encoders are
    drawn after ``torch.manual_seed(seed)`` when a seed is given, else from the global
    generator as it stands. Returns the path.
    """
    if seed is not None:
        torch.manual_seed(seed)
    use_objects = detector is not None
    regions = damsm.region_settings(detector, config.detector) if use_objects else None
    extractor = damsm.build_region_extractor(detector, regions) if use_objects else None
    text = damsm.build_text_encoder(len(vocab), config.encoder, memory)
    image = damsm.build_image_encoder(config.encoder, extractor)
    record = damsm.encoder_record(len(vocab), config.encoder, text, image, regions)
    path = damsm.model_path(models, memory is not None, use_objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": damsm.FORMAT, "text_encoder": damsm.text_state(text),
                "image_encoder": {k: v.clone() for k, v in image.learned_state_dict().items()},
                "config": record, "metrics": {}}, path)
    return path


def write_classifier_file(path: Path, width: int = 4, image_size: int = 64,
                          seed: int = 0) -> Path:
    """An untrained toy scoring classifier saved as ``cpgan-eval fit-classifier`` saves one
    (``models/classifier.pt``), for stages that start from it. Returns the path."""
    from cpgan.model.classifier import ToyClassifier
    from cpgan.pipeline.toy import TOY_CATEGORIES, TOY_COLOURS
    from cpgan.trainer.classifier import save_classifier

    torch.manual_seed(seed)
    model = ToyClassifier(len(TOY_CATEGORIES), len(TOY_COLOURS), width, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(path, model)
    return path


def run_prep(args: list[str]) -> None:
    """``cpgan-prep ARGS`` in this process; any exit but success fails the test."""
    from cpgan.cli.prep import main as prep_main

    try:
        prep_main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code


@contextlib.contextmanager
def one_worker_cluster():
    """The LocalCluster a stage starts for ``--workers 1`` (same options), kept warm so that
    several stages share it; yields the cluster (``.scheduler_address`` for --scheduler)."""
    from dask.distributed import LocalCluster

    from cpgan.pipeline.cluster import ONE_THREAD_ENV

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=40, env=ONE_THREAD_ENV,
                      preload=["cpgan.pipeline.detect"]) as cluster:
        yield cluster


def refusal(read: Callable[[], Any], path: Path, phrase: str | re.Pattern[str],
            separator: str = ": ") -> str:
    """The message of the CpganError ``read()`` must raise: one line, starting with ``path``
    and ``separator`` (":" also admits a cfg's "path:LINE:") and containing ``phrase`` (a
    pattern is searched for)."""
    with pytest.raises(CpganError) as info:
        read()
    message = str(info.value)
    assert message.startswith(f"{path}{separator}"), message
    if isinstance(phrase, re.Pattern):
        assert phrase.search(message), message
    else:
        assert phrase in message, message
    assert "\n" not in message, message
    return message
