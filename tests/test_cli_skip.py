"""A command whose stage is up to date says so before importing anything heavy.

A second `make demo` runs 14 commands; each used to spend 4-8 s importing torch and
torchvision only to print 'up to date'. The commands' checks take the stages' file names and
rules from cpgan.layout, which imports no torch; the stages' modules take theirs from it too.
The first tests check that the owners' names are the layout's objects, not copies of them. The
last makes an artifacts folder on which the demo's stages have run, with their work replaced by
stubs that write placeholder files (the records are the commands' own), then runs the demo's
commands in a fresh interpreter and checks what they print and that nothing heavy was imported.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import itertools
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders import run_prep
from cpgan import layout
from cpgan.errors import CpganError

HEAVY = ("torch", "torchvision", "matplotlib", "dask", "distributed", "cv2", "pycocotools",
         "pandas", "h5py", "cpgan.trainer", "cpgan.model")
"""Packages an up-to-date command must not import (torch and torchvision alone take ~5 s)."""
SINGLE_SOURCED = {
    "cpgan.pipeline.coco": {"annotation_file": "annotation_file"},
    "cpgan.pipeline.regions": {"INDEX_NAME": "REGION_INDEX_NAME"},
    "cpgan.pipeline.memory": {"MEMORY_NAME": "MEMORY_NAME", "VOCAB_NAME": "VOCAB_NAME"},
    "cpgan.trainer.detector": {"MODEL_NAME": "DETECTOR_NAME",
                               "WEIGHTS_NAME": "DETECTOR_DARKNET_NAME"},
    "cpgan.trainer.captioner": {"MODEL_NAME": "CAPTIONER_NAME",
                                "TRAIN_SPLIT": "CAPTIONER_TRAIN_SPLIT",
                                "VAL_SPLIT": "CAPTIONER_VAL_SPLIT", "split_shards": "split_shards"},
    "cpgan.trainer.classifier": {"MODEL_NAME": "CLASSIFIER_NAME",
                                 "TRAIN_SPLIT": "CLASSIFIER_TRAIN_SPLIT",
                                 "VAL_SPLIT": "CLASSIFIER_VAL_SPLIT", "EPOCHS": "CLASSIFIER_EPOCHS",
                                 "BATCH_SIZE": "CLASSIFIER_BATCH_SIZE", "LR": "CLASSIFIER_LR"},
    "cpgan.trainer.damsm": {"MODEL_STEM": "DAMSM_STEM", "VARIANTS": "DAMSM_VARIANTS",
                            "model_name": "damsm_name", "model_path": "damsm_path",
                            "provenance_path": "damsm_record",
                            "variant_files": "damsm_variant_files",
                            "describe_metrics": "describe_damsm_metrics"},
    "cpgan.trainer.gan": {**{name: name for name in ("RUN_STEM", "run_name", "check_run_name",
                                                     "run_dir", "checkpoint_file",
                                                     "metrics_file")},
                          "DEFAULT_CHECKPOINT_EVERY": "GAN_CHECKPOINT_EVERY",
                          "DEFAULT_SAMPLE_EVERY": "GAN_SAMPLE_EVERY",
                          "DEFAULT_LOG_EVERY": "GAN_LOG_EVERY"},
    "cpgan.trainer.sampling": {"RUNS_DIR": "RUNS_DIR", "CHECKPOINT_NAME": "CHECKPOINT_NAME",
                               "DEFAULT_RUN": "RUN_STEM",
                               "default_checkpoint": "default_checkpoint",
                               "VOCAB_NAME": "VOCAB_NAME"},
}
"""Per owner module: its names that are cpgan.layout's objects (owner's name -> layout's)."""
METRICS = {"epoch": 1.0, "train_loss": 2.0, "val_loss": 1.25, "r_precision": 0.5,
           "r_precision_std": 0.05, "r_precision_in_batch": 0.625,
           "r_precision_in_batch_std": 0.0625, "candidates": 100.0}
LOSSES = {"step": 3, "loss_d": 1.5, "loss_g": 2.5, "loss_tiscl": 0.5, "loss_kl": 0.125}
BLOCK = {"fid": 1.0, "inception_score": {"mean": 1.0, "std": 0.0},
         "r_precision": {"mean": 0.5, "std": 0.0}, "soa_c": None}


def _module_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """A module's statements, with those inside its top-level if, try and with blocks."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                yield from _module_statements(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _module_statements(handler.body)


def _bindings(source: str) -> dict[str, list[str]]:
    """Every module-level binding of each name in ``source``: ``layout.X`` where the name is
    bound to cpgan.layout's X (``NAME = layout.X``, ``from cpgan.layout import X as NAME``),
    else what binds it (a def, a class, another assignment or import)."""
    found: dict[str, list[str]] = defaultdict(list)
    for node in _module_statements(ast.parse(source).body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name].append(type(node).__name__)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                name = alias.asname or alias.name.partition(".")[0]
                from_layout = isinstance(node, ast.ImportFrom) and node.module == "cpgan.layout"
                found[name].append(f"layout.{alias.name}" if from_layout else "import")
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            from_layout = (isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name)
                           and value.value.id == "layout")
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        found[name.id].append(f"layout.{value.attr}" if from_layout
                                              else "assignment")
    return found


def test_bindings_tell_a_layout_object_from_a_copy():
    source = """
from cpgan import layout
from cpgan.layout import CAPTIONER_NAME as MODEL_NAME, split_shards
RUNS_DIR = layout.RUNS_DIR
CHECKPOINT_NAME = "checkpoint.pt"
run_dir = layout.run_dir
def run_dir(root, name): ...
if True:
    DEFAULT_RUN = "cpgan"
"""
    found = _bindings(source)
    assert found["MODEL_NAME"] == ["layout.CAPTIONER_NAME"]
    assert found["split_shards"] == ["layout.split_shards"]
    assert found["RUNS_DIR"] == ["layout.RUNS_DIR"]
    assert found["CHECKPOINT_NAME"] == ["assignment"]
    assert found["run_dir"] == ["layout.run_dir", "FunctionDef"]
    assert found["DEFAULT_RUN"] == ["assignment"]


@pytest.mark.parametrize("owner", sorted(SINGLE_SOURCED))
def test_owners_take_their_names_from_the_layout(owner: str):
    """An owner that defined its own copy of a name again (a literal, a def) fails here."""
    module = importlib.import_module(owner)
    found = _bindings(inspect.getsource(module))
    for name, layout_name in SINGLE_SOURCED[owner].items():
        assert found[name] == [f"layout.{layout_name}"], (
            f"{owner}.{name} is bound by {found[name]}: bind it to cpgan.layout.{layout_name} "
            "only (the up-to-date checks read that one)")
        assert getattr(module, name) is getattr(layout, layout_name), f"{owner}.{name}"


def test_the_layout_imports_nothing_heavy():
    script = f"""
import sys
import cpgan.layout
print(*sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {HEAVY!r})))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []


def test_layout_rules(tmp_path: Path, monkeypatch):
    """The rules behind the names, and the owners' uses of them that are not the layout's
    objects themselves (gan.Switches, gan.distributed_from_env)."""
    from cpgan.trainer import gan

    for name in ("train2014-00001.h5", "train2014-00000.h5", "train2014-0002.h5",
                 "val2014-00000.h5", "xtrain2014-00003.h5", "train2014-00004.h5.tmp"):
        (tmp_path / name).touch()
    assert layout.split_shards(tmp_path, "train2014") == [tmp_path / "train2014-00000.h5",
                                                         tmp_path / "train2014-00001.h5"]

    models = tmp_path / "models"
    models.mkdir()
    for name in ("damsm-no-oaie.pt", "damsm.pt"):
        (models / name).touch()
    assert layout.damsm_variant_files(models) == [(models / "damsm.pt", True, True),
                                                  (models / "damsm-no-oaie.pt", True, False)]
    assert (layout.damsm_record(models / "damsm-no-memory.pt")
            == models / "damsm-no-memory.provenance.json")

    folder = layout.run_dir(tmp_path, "cpgan-x")
    assert folder == tmp_path / "runs" / "cpgan-x"
    assert layout.checkpoint_file(folder) == folder / "checkpoint.pt"
    assert layout.metrics_file(folder) == folder / "metrics.jsonl"
    # cli/train.py keeps the switches as this dict and builds gan.Switches(**it) to train
    assert [f.name for f in dataclasses.fields(gan.Switches)] == ["use_memory", "use_objects",
                                                                  "use_fgcd"]
    for switches in itertools.product((True, False), repeat=3):
        assert layout.run_name(*switches) == gan.Switches(*switches).name
    for name, plain in (("cpgan", True), ("a.b-c_D9", True), (".hidden", False), ("-x", False),
                        ("a/b", False), ("", False), ("é", False)):
        if plain:
            assert layout.check_run_name(name) == name
        else:
            with pytest.raises(CpganError, match="run name"):
                layout.run_dir(tmp_path, name)
    for key in layout.TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert not layout.under_torchrun() and gan.distributed_from_env().world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert layout.under_torchrun() and gan.distributed_from_env().world_size == 2

    assert layout.default_checkpoint(tmp_path) == tmp_path / "runs/cpgan/checkpoint.pt"
    for index, run in enumerate(("b", "a")):
        path = tmp_path / "runs" / run / "checkpoint.pt"
        path.parent.mkdir(parents=True)
        path.touch()
        os.utime(path, ns=(10**18 + index, 10**18 + index))
    assert layout.default_checkpoint(tmp_path).parent.name == "a"


def _placeholders(*paths: Path) -> list[Path]:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"placeholder {path.name}".encode())
    return list(paths)


def _writing(*paths: Path, returns):
    """A stub of a stage's work: writes placeholders at ``paths``, returns ``returns``."""
    def stub(*args, **kwargs):
        _placeholders(*paths)
        return returns
    return stub


def _stub_the_stages(monkeypatch, root: Path) -> None:
    """Replace the work of every stage by a stub that writes placeholders where the stage
    writes its outputs and returns the summary its command prints."""
    from cpgan.pipeline import attend, detect, memory, report
    from cpgan.trainer import captioner, classifier, damsm, detector, evaluate, gan, sampling

    models = root / "models"
    monkeypatch.setattr(detector, "train_detector", _writing(
        models / "detector.pt", models / "detector.weights",
        returns={"map50": 0.5, "map": 0.25, "epochs": 1, "seconds": 0.0}))
    monkeypatch.setattr(detect, "load_detector", lambda *a, **k: "detector")

    def fake_detect(split, settings, out_dir, **_):
        shards = _placeholders(Path(out_dir) / f"{settings.split}-00000.h5")
        index = Path(out_dir) / layout.REGION_INDEX_NAME
        rows = pq.read_table(index).to_pylist() if index.exists() else []
        rows = [r for r in rows if r["split"] != settings.split]
        rows += [{"split": settings.split, "image_id": i} for i in split.image_ids()]
        pq.write_table(pa.Table.from_pylist(rows), index)
        return {"images": len(split.image_ids()), "failed": 0, "shards": 1,
                "reused_shards": 0}, shards

    monkeypatch.setattr(detect, "detect", fake_detect)
    monkeypatch.setattr(captioner, "train_captioner", _writing(models / "captioner.pt", returns={
        "samples": [], "epochs": 1, "train_pairs": 1, "train_images": 1, "skipped_failed": 0,
        "skipped_empty": 0, "train_loss": [1.0], "val_loss": [1.0], "seconds": 0.0}))
    part = root / "attention" / "train2014-00000.parquet"
    monkeypatch.setattr(attend, "attend", _writing(part, returns=(
        {"captions": 1, "images": 1, "skipped_failed": 0, "skipped_empty": 0, "rows": 1,
         "parts": 1, "reused_parts": 0}, [part], None)))
    monkeypatch.setattr(classifier, "fit_classifier", _writing(models / "classifier.pt", returns={
        "width": 4, "val_accuracy": 0.5, "val_shape_accuracy": 0.5, "val_colour_accuracy": 0.5,
        "val_images": 1, "seconds": 0.0}))
    monkeypatch.setattr(memory, "load_memory", lambda *a, **k: SimpleNamespace(memory="bank"))

    def fake_damsm(coco_root, models_dir, config, vocab, bank, detector, *a, **k):
        _placeholders(damsm.model_path(models_dir, bank is not None, detector is not None))
        return SimpleNamespace(summary=lambda: {"metrics": METRICS}, seconds=0.0, epochs=1,
                               train_images=1, skipped_images=0, metrics=METRICS)

    monkeypatch.setattr(damsm, "train_damsm", fake_damsm)

    def fake_gan(coco_root, root, config, vocab, switches, *, name, **_):
        folder = gan.run_dir(root, name)
        _placeholders(gan.checkpoint_file(folder))
        gan.metrics_file(folder).write_text(json.dumps(LOSSES) + "\n")
        return SimpleNamespace(summary=lambda: {}, seconds=0.0, metrics=LOSSES, epochs=1,
                               steps=3, steps_trained=3, processes=1, train_images=1,
                               skipped_images=0, images_per_second=1.0)

    monkeypatch.setattr(gan, "train_gan", fake_gan)

    def fake_checkpoint(path):
        from cpgan.config import load_config

        return SimpleNamespace(path=Path(path), config=load_config("toy", None), step=3,
                               encoders="models/damsm.pt", memory="memory.h5", run_name="cpgan")

    monkeypatch.setattr(sampling, "read_checkpoint", fake_checkpoint)
    monkeypatch.setattr(evaluate, "load_eval_models", lambda *a, **k: SimpleNamespace(
        scoring=SimpleNamespace(weights=models / "classifier.pt")))
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: SimpleNamespace(
        report={"generated": BLOCK, "real": BLOCK, "untrained": BLOCK, "config": {
            "num_images": 1, "seconds": 0.0,
            "checkpoint": {"encoders": "models/damsm.pt", "memory": "memory.h5"}}},
        showcase=None, memory_candidates=[]))

    def fake_report(folder, content, showcase, inputs):
        folder.mkdir(parents=True)
        (folder / report.REPORT_JSON).write_text(json.dumps(content))
        (folder / report.INDEX_HTML).write_text("<html></html>")
        return [folder / report.REPORT_JSON, folder / report.INDEX_HTML]

    monkeypatch.setattr(report, "write_report", fake_report)


# The commands of the Makefile's demo target but build-memory (its check reads the memory
# bank, which the stubs do not write; it imports no torch either), and what each prints.
DEMO = [
    (["make-toy"], "already exists"),
    (["vocab"], "vocab: up to date"),
    (["train-detector"], "train-detector: up to date (mAP@0.5 0.500)"),
    (["detect", "--split", "train2014"], "1 shards (1 reused)"),
    (["detect", "--split", "val2014"], "1 shards (1 reused)"),
    (["train-attention"], "train-attention: up to date"),
    (["attend", "--split", "train2014"], "attend [train2014]: up to date"),
    (["fit-classifier"], "fit-classifier: up to date (val accuracy 0.500)"),
    (["--stage", "damsm"], "damsm [damsm]: up to date"),
    (["--stage", "damsm", "--no-memory"], "damsm [damsm-no-memory]: up to date"),
    (["--stage", "gan"], "gan [cpgan]: up to date"),
    ([], "cpgan-eval: up to date"),
    (["status"], "done"),
]
PROGRAMS = {"make-toy": "prep", "vocab": "prep", "train-detector": "prep", "detect": "prep",
            "train-attention": "prep", "attend": "prep", "status": "prep",
            "fit-classifier": "evaluate", "--stage": "train"}


def _main(args: list[str]):
    from cpgan.cli import evaluate, prep, train

    return {"prep": prep, "train": train, "evaluate": evaluate}[
        PROGRAMS.get(args[0] if args else "", "evaluate")].main


@pytest.fixture(scope="module")
def demo_done(tmp_path_factory) -> Path:
    """A folder where the demo's stages have run (their work stubbed), as a second make demo
    finds it."""
    root = tmp_path_factory.mktemp("demo") / "artifacts"
    common = ["--artifacts", str(root)]
    run_prep(["make-toy", *common, "--train-images", "6", "--val-images", "3",
              "--image-size", "32"])
    with pytest.MonkeyPatch.context() as monkeypatch:
        _stub_the_stages(monkeypatch, root)
        _placeholders(root / "memory.h5")  # the stub of build-memory
        for args, _ in DEMO:
            try:
                _main(args)([*args, *common])
            except SystemExit as exc:
                assert exc.code in (0, None), (args, exc.code)
    return root


def test_up_to_date_demo_commands_import_nothing_heavy(demo_done: Path):
    script = f"""
import sys
from cpgan.cli import evaluate, prep, train
for program, args in {[(PROGRAMS.get(a[0] if a else "", "evaluate"), a) for a, _ in DEMO]!r}:
    print("$", program, *args, flush=True)
    {{"prep": prep, "train": train, "evaluate": evaluate}}[program].main(
        [*args, "--artifacts", {str(demo_done)!r}])
heavy = [m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {HEAVY!r})]
print("heavy:", *sorted(heavy))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=demo_done.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    outputs = done.stdout.split("$ ")[1:]
    assert len(outputs) == len(DEMO)
    for (args, expected), output in zip(DEMO, outputs):
        assert expected in output, (args, output)
    heavy = done.stdout.rstrip().splitlines()[-1].removeprefix("heavy:").split()
    assert heavy == [], f"up-to-date commands imported {heavy}"
