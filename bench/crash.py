"""Crash safety of the resumable prep stages under SIGKILL at random moments. Not a test.

For each stage (train-detector, detect, train-attention, attend, build-memory) the stage is run
as a real ``cpgan-prep`` process (with its own LocalCluster of --workers processes) and killed
with SIGKILL, the whole process group at once, after a delay drawn uniformly from [0, 1.1 T],
T being the stage's uninterrupted run time. After every kill:

* each output that looks finished (no ``.tmp-`` name), the provenance record included, must be
  by content either the uninterrupted run's file or the one that was there when the stage
  started (an index that holds only another split, say): never anything in between;
* no process of the killed group may survive.

The stage is rerun (training stages with --resume) until a run finishes by itself. Its outputs
are then compared with the uninterrupted run's, no temporary may remain anywhere under the
artifacts root, and the stage's outputs are wiped to start another campaign, until ``--kills``
kills are spent; a last campaign leaves the outputs for the next stage. The JSON summary gives,
per stage, kills survived, completions, kills that caught a write half done, and whether
everything was identical.

    .venv/bin/python bench/crash.py --kills 8 --seed 0 [--workdir /tmp/cpgan-bench-crash]

``tests/test_crash.py`` imports this module for its comparisons and kill loop.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

TMP_PREFIX = ".tmp-"
ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# facts about a run, not about its artifacts: differ between an interrupted and a straight run
VOLATILE_KEYS = {"mtime_ns", "seconds", "reused", "reused_shards", "reused_parts"}
# Every key of the sections the prep stages read, so that edits to configs/toy.toml made
# while a long bench runs cannot change its outputs.
CONFIG = """# bench/crash.py: small sizes, so a stage is seconds of work
seed = 0
[data]
max_caption_words = 12
min_word_count = 1
[detector]
cfg = "configs/darknet/yolov3-toy.cfg"
input_size = 128
num_regions = 36
feature_layer = 20
feature_dim = 256
score_threshold = 0.001
nms_iou = 0.45
shard_size = 4
train_epochs = 3
train_batch_size = 4
train_lr = 5e-3
train_weight_decay = 0.0005
train_warmup_steps = 100
train_workers = 0
train_average_decay = 0.0
train_cls_weight = 3.0
[attention]
embed_dim = 16
hidden_dim = 32
attention_dim = 16
dropout = 0.3
epochs = 3
batch_size = 16
lr = 2e-3
grad_clip = 0.1
[memory]
topk = 3
"""


# ------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class Stage:
    """One resumable stage: its arguments, what it writes and how to start it afresh.

    ``outputs`` are globs under the artifacts root compared by content; ``progress`` are
    files rewritten while the stage runs (checkpoints): after a kill they need only load,
    at the end they must equal the reference's."""

    name: str
    args: tuple[str, ...]
    outputs: tuple[str, ...]
    record: str
    progress: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()  # outputs a wipe leaves: they hold another split's rows too

    def files(self, root: Path) -> list[Path]:
        """The stage's finished-looking outputs and checkpoints under ``root``."""
        return sorted({p for pattern in (*self.outputs, *self.progress) for p in root.glob(pattern)
                       if not p.name.startswith(TMP_PREFIX)})

    def wipe(self, root: Path) -> None:
        """Remove the stage's finished outputs and record (not its temporaries: a later run
        must sweep those itself)."""
        kept = {p for pattern in self.kept for p in root.glob(pattern)}
        for path in [*self.files(root), root / self.record]:
            if path not in kept:
                path.unlink(missing_ok=True)


def stages(cluster: tuple[str, ...] = (), limit: int = 1,
           weights: Path | None = None) -> dict[str, Stage]:
    """The five resumable stages, in pipeline order. ``cluster`` is ``("--workers", N)`` or
    ``("--scheduler", ADDRESS)``; train-detector takes the first ``limit`` images; detect
    reads ``weights``."""
    detector = ("--weights", str(weights)) if weights else ()
    return {
        "train-detector": Stage(
            "train-detector", ("train-detector", "--resume", "--limit", str(limit)),
            ("models/detector.pt", "models/detector.weights"),
            "models/detector.provenance.json", ("models/detector.ckpt.pt",)),
        "detect": Stage(
            "detect", ("detect", *cluster, *detector, "--batch-size", "2"),
            ("regions/train2014-*.h5", "regions/index.parquet"),
            "regions/train2014.provenance.json", kept=("regions/index.parquet",)),
        "train-attention": Stage(
            "train-attention", ("train-attention", "--resume"), ("models/captioner.pt",),
            "models/captioner.provenance.json", ("models/captioner.ckpt.pt",)),
        "attend": Stage(
            "attend", ("attend", *cluster, "--batch-size", "8"),
            ("attention/train2014-*.parquet", "attention/grounding.json"),
            "attention/train2014.provenance.json"),
        "build-memory": Stage(
            "build-memory", ("build-memory", *cluster),
            ("memory.h5", "memory_index.parquet", "memory_purity.json"),
            "memory.provenance.json"),
    }


# ------------------------------------------------------------------------------ contents


def _canon(value: Any, root: str) -> Any:
    """A comparable form of decoded content: arrays by dtype, shape and bytes; JSON text
    parsed; the artifacts root and volatile keys (mtimes, timings) taken out."""
    if isinstance(value, dict):
        return {str(k): _canon(v, root) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, (list, tuple)):
        return [_canon(v, root) for v in value]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, str):
        if value[:1] in "{[":
            try:
                return _canon(json.loads(value), root)
            except ValueError:
                pass
        return value.replace(root, "<root>")
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return ["array", [_canon(v, root) for v in value.ravel().tolist()]]
        return ["array", str(value.dtype), list(value.shape), value.tobytes()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decoded(path: Path) -> Any:
    """The file's content as Python data, whatever its format."""
    suffix = path.suffix
    if suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as f:
            data = {name: f[name][()] for name in f}
            data["attrs"] = dict(f.attrs)
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return {"schema": str(table.schema.remove_metadata()),
                "metadata": dict(table.schema.metadata or {}),
                "columns": {name: table[name].to_numpy() for name in table.column_names}}
    if suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if suffix == ".pt":
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)
    return path.read_bytes()


def content(path: Path, root: Path) -> Any:
    """Comparable content of one artifact under ``root``.

    A provenance record is compared without its copy of the whole resolved preset (others
    edit configs/ while a long bench runs; the ``params`` that decide the outputs are
    compared) and with only the names of its outputs: each output is compared by content
    itself, and memory.h5 embeds its inputs' mtimes, so its bytes differ between two roots
    whose content is the same."""
    data = _decoded(path)
    if path.name.endswith(".provenance.json") and isinstance(data, dict):
        data.pop("config", None)
        data["outputs"] = sorted(data.get("outputs", {}))
    return _canon(data, str(Path(root).resolve()))


def snapshot(stage: Stage, root: Path) -> dict[Path, Any]:
    """Content of the stage's finished files and record under ``root`` (relative names)."""
    files = [*stage.files(root), *[root / stage.record] * (root / stage.record).exists()]
    return {p.relative_to(root): content(p, root) for p in files}


def differences(stage: Stage, got: Path, want: Path, *,
                before: dict[Path, Any] | None = None) -> list[str]:
    """Files of ``stage`` under ``got`` that differ from those under ``want``.

    Without ``before`` (a finished run) every output, checkpoint and the record must be
    present and equal. After a kill, ``before`` is the :func:`snapshot` taken when the stage
    started: each file that exists must equal the reference's or be the one that was there
    before (a complete older file, such as an index holding another split), and checkpoints
    need only load."""
    final = before is None
    problems = []
    names = {p.relative_to(want) for p in stage.files(want)} | {Path(stage.record)}
    present = {p.relative_to(got) for p in stage.files(got)}
    present |= {Path(stage.record)} if (got / stage.record).exists() else set()
    if final and present != names:
        problems.append(f"files differ: {sorted(map(str, present ^ names))}")
    progress = {Path(p) for p in stage.progress}
    for name in sorted(present):
        try:
            if not final and name in progress:
                _decoded(got / name)
                continue
            now = content(got / name, got)
        except Exception as exc:  # any failure to read a file that looks finished
            problems.append(f"{name}: unreadable ({type(exc).__name__}: {exc})"[:200])
            continue
        if name in names and now == content(want / name, want):
            continue
        if not final and name in before and now == before[name]:
            continue
        problems.append(f"{name}: content differs")
    return problems


def temporaries(root: Path) -> list[Path]:
    """Every temporary (``.tmp-`` name) anywhere under ``root``."""
    return sorted(p for p in Path(root).rglob(f"{TMP_PREFIX}*"))


# ------------------------------------------------------------------------------ processes


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` still alive (zombies excluded), from /proc."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            alive.append(int(entry.name))
    return alive


@dataclass
class Run:
    """The outcome of one process run: killed or its exit status, its duration, stderr."""

    killed: bool
    returncode: int
    seconds: float
    stderr: str = ""
    survivors: list[int] = field(default_factory=list)


def run_once(command: list[str], *, cwd: Path, env: dict[str, str], log: Path,
             kill_when: Callable[[subprocess.Popen, float], bool]) -> Run:
    """Run ``command`` in its own session; SIGKILL its whole group as soon as
    ``kill_when(process, elapsed)`` says so, unless it ends first."""
    start = time.monotonic()
    with open(log, "wb") as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                   stderr=err, start_new_session=True)
        killed = False
        while process.poll() is None:
            if kill_when(process, time.monotonic() - start):
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.002)
        process.wait()
    seconds = time.monotonic() - start
    survivors: list[int] = []
    if killed:
        deadline = time.monotonic() + 5
        while (survivors := live_group_members(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
    return Run(killed, process.returncode, seconds, log.read_text(errors="replace")[-2000:],
               survivors)


def after(delay: float) -> Callable[[subprocess.Popen, float], bool]:
    """A ``kill_when`` that fires ``delay`` seconds after the start (never for inf)."""
    return lambda _process, elapsed: elapsed >= delay


# ------------------------------------------------------------------------------ campaigns


@dataclass
class StageReport:
    """What the kills of one stage showed; any problem makes ``identical`` false."""

    kills: int = 0
    completions: int = 0
    caught_mid_write: int = 0
    bad_after_kill: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    temporaries_left: list[str] = field(default_factory=list)
    stray_processes: int = 0
    reference_seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return not (self.bad_after_kill or self.failed_runs or self.differences
                    or self.temporaries_left or self.stray_processes) and self.completions > 0

    def summary(self) -> dict[str, Any]:
        return {"kills_survived": self.kills, "completions": self.completions,
                "caught_mid_write": self.caught_mid_write, "identical": self.identical,
                "reference_seconds": round(self.reference_seconds, 1),
                "stray_processes": self.stray_processes,
                **{name: value[:5] for name, value in (
                    ("bad_after_kill", self.bad_after_kill), ("failed_runs", self.failed_runs),
                    ("differences", self.differences),
                    ("temporaries_left", self.temporaries_left)) if value}}


def campaign(stage: Stage, command: list[str], root: Path, reference: Path, *, kills: int,
             kill_moment: Callable[[], Callable[[subprocess.Popen, float], bool]],
             env: dict[str, str], log: Path, report: StageReport,
             finish: Callable[[], None] | None = None, max_runs: int = 200) -> None:
    """Kill ``stage`` ``kills`` times (each time at ``kill_moment()``), resuming after each;
    after every completed run compare with ``reference`` and, while kills remain, wipe the
    outputs to start over. Ends with the stage complete under ``root``: the last run is
    ``command`` again, or ``finish()`` when given (the tests run it in their own process)."""
    before = snapshot(stage, root)
    for _ in range(max_runs):
        done = report.kills >= kills
        leftovers = set(temporaries(root))
        if done and finish is not None:
            finish()
            run = Run(killed=False, returncode=0, seconds=0.0)
        else:
            run = run_once(command, cwd=root.parent, env=env, log=log,
                           kill_when=after(float("inf")) if done else kill_moment())
        if run.killed:
            report.kills += 1
            report.stray_processes += len(run.survivors)
            report.caught_mid_write += bool(set(temporaries(root)) - leftovers)
            report.bad_after_kill += differences(stage, root, reference, before=before)
            continue
        if run.returncode != 0:  # a resumed run that fails is a finding, not a crash of ours
            lines = run.stderr.strip().splitlines()
            report.failed_runs.append(lines[-1] if lines else f"exit {run.returncode}")
            return
        report.completions += 1
        report.differences += differences(stage, root, reference)
        report.temporaries_left += [str(p.relative_to(root)) for p in temporaries(root)]
        if done:
            return
        stage.wipe(root)
        before = snapshot(stage, root)
    report.failed_runs.append(f"no completion in {max_runs} runs")


# ------------------------------------------------------------------------------ the bench


def prepare(workdir: Path, images: int, seed: int) -> tuple[Path, Path, Path]:
    """The toy dataset, the small config and the detector weights both roots share. detect
    uses random weights: a detector trained for seconds finds nothing, and the captioner
    needs regions."""
    import torch

    from cpgan.model.darknet import Darknet, write_weights
    from cpgan.pipeline.toy import generate_toy_coco

    coco = workdir / f"coco-{images}-{seed}"
    if not coco.exists():
        generate_toy_coco(coco, train_images=images, val_images=4, image_size=64, seed=seed,
                          progress=False)
    config = workdir / "crash.toml"
    config.write_text(CONFIG)
    weights = workdir / "random.weights"
    torch.manual_seed(seed)
    write_weights(Darknet.from_cfg_file(ROOT / "configs" / "darknet" / "yolov3-toy.cfg"), weights)
    return coco, config, weights


def side_steps(cluster: tuple[str, ...], weights: Path) -> dict[str, list[tuple[str, ...]]]:
    """Steps no kill targets, run before a stage: detect the val split (train-attention
    validates on it) before detect, the vocabulary before train-attention."""
    return {"detect": [("detect", "--split", "val2014", *cluster, "--weights", str(weights))],
            "train-attention": [("vocab",)]}


def cli(args: Iterable[str], root: Path, coco: Path, config: Path) -> list[str]:
    """The ``cpgan-prep`` command line of ``args`` for the artifacts ``root``."""
    return [sys.executable, "-m", "cpgan.cli.prep", *args, "--artifacts", str(root),
            "--coco-root", str(coco), "--config", str(config)]


def uninterrupted(command: list[str], root: Path, env: dict[str, str], log: Path) -> float:
    """Run ``command`` to its end; its duration. A failure ends the bench."""
    run = run_once(command, cwd=root.parent, env=env, log=log, kill_when=after(float("inf")))
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command[3:5])} failed: {run.stderr[-1500:]}")
    return run.seconds


def bench(workdir: Path, kills: int, seed: int, images: int, workers: int,
          names: list[str]) -> dict[str, Any]:
    """Every stage run straight into ``reference`` and killed ``kills`` times in ``crashed``
    (the ``names`` ones; the others just run there); the JSON summary."""
    start = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    coco, config, weights = prepare(workdir, images, seed)
    reference, crashed = workdir / "reference", workdir / "crashed"
    for root in (reference, crashed):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
    env = {**os.environ, **ONE_THREAD}
    log = workdir / "stderr.txt"
    rng = random.Random(seed)
    cluster = ("--workers", str(workers))
    plan = stages(cluster, images, weights)
    reports: dict[str, StageReport] = {}
    before = side_steps(cluster, weights)
    for name, stage in plan.items():
        for args in before.get(name, []):
            for root in (reference, crashed):
                uninterrupted(cli(args, root, coco, config), root, env, log)
        report = reports[name] = StageReport()
        report.reference_seconds = uninterrupted(cli(stage.args, reference, coco, config),
                                                 reference, env, log)
        if name not in names:  # not benched: just complete it for the stages after it
            uninterrupted(cli(stage.args, crashed, coco, config), crashed, env, log)
            del reports[name]
            continue
        window = 1.1 * report.reference_seconds
        campaign(stage, cli(stage.args, crashed, coco, config), crashed, reference,
                 kills=kills, kill_moment=lambda: after(rng.uniform(0, window)), env=env,
                 log=log, report=report)
        print(f"{name}: {json.dumps(report.summary(), default=str)}", file=sys.stderr)
        if report.failed_runs:
            break
    return {"kills_per_stage": kills, "seed": seed, "images": images, "workers": workers,
            "stages": {name: r.summary() for name, r in reports.items()},
            "identical": all(r.identical for r in reports.values()),
            "seconds": round(time.monotonic() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=8, help="SIGKILLs per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=32, help="train images (4 val)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stages", default=",".join(stages()),
                        help="comma-separated stages to kill (the others just run)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cpgan-bench-crash"))
    options = parser.parse_args()
    names = options.stages.split(",")
    unknown = set(names) - set(stages())
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    print(json.dumps(bench(options.workdir, options.kills, options.seed, options.images,
                           options.workers, names), indent=1, default=str))


if __name__ == "__main__":
    main()
