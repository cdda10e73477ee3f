"""Crash safety, short: SIGKILL the resumable prep stages, resume, compare with an
uninterrupted run. bench/crash.py does the same many times at random moments with each stage's
own LocalCluster; here the stages share one warm cluster so that a run costs seconds.

The kills:

* in the middle of a write (build-memory, train-attention): the run kills its own process group
  when it is about to rename a chosen temporary into place, the moment a random kill rarely
  hits, so a complete-looking temporary is left behind; the resumed run must neither keep nor
  leave it (train-detector gets the same leftover planted, to keep the suite short);
* at random moments (detect, seeded): only the stage's process group dies; the shared workers
  finish what they had started, as on a real cluster whose client was killed;
* one worker alone, while it renames a shard: the stage carries on, dask redoes the task.

After the resumed run completes, every output and the provenance record must equal the
uninterrupted run's by content, and no ``.tmp-`` file may be left anywhere.
"""
from __future__ import annotations

import importlib.util
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from cpgan.pipeline.artifacts import LOCK_NAME

from builders import one_worker_cluster, run_prep

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_crash", ROOT / "bench" / "crash.py")
crash = sys.modules["bench_crash"] = importlib.util.module_from_spec(_spec)  # for dataclasses
_spec.loader.exec_module(crash)

# The process kills its own group just before it renames this file into place: the temporary
# is complete, the target is not there yet.
DIE_BEFORE_RENAME = """
import os, signal, sys
from pathlib import Path

replace = os.replace

def replace_or_die(source, target, *args, **kwargs):
    if Path(target).name == sys.argv[1]:
        os.killpg(0, signal.SIGKILL)
    return replace(source, target, *args, **kwargs)

os.replace = replace_or_die
from cpgan.cli.prep import main
main(sys.argv[2:])
"""

# The same trap, set inside a dask worker process by ``client.run(exec, code, namespace)``: the
# worker dies alone, the stage's client carries on and dask runs the task again elsewhere.
WORKER_DIES_BEFORE_RENAME = """
import os, signal
from pathlib import Path

replace = os.replace

def replace_or_die(source, target, *args, **kwargs):
    if Path(target).name == NAME:
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(source, target, *args, **kwargs)

os.replace = replace_or_die
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with one_worker_cluster() as local:
        yield local


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cluster) -> dict[str, Any]:
    """The chain run once, uninterrupted, into ``reference``."""
    work = tmp_path_factory.mktemp("crash")
    coco, config, weights = crash.prepare(work, images=6, seed=4)
    scheduler = ("--scheduler", cluster.scheduler_address)
    plan = crash.stages(scheduler, limit=4, weights=weights)
    before = crash.side_steps(scheduler, weights)
    setup = {"coco": coco, "config": config, "plan": plan, "before": before,
             "reference": work / "reference", "cluster": cluster}
    for name, stage in plan.items():
        for args in [*before.get(name, []), stage.args]:
            run_prep(_command(setup, name, work / "reference", args))
    return setup


def _command(setup: dict, stage: str, root: Path, args: tuple[str, ...] | None = None,
             ) -> list[str]:
    """``stage``'s arguments (or ``args``) for the artifacts ``root``."""
    return [*(args or setup["plan"][stage].args), "--artifacts", str(root),
            "--coco-root", str(setup["coco"]), "--config", str(setup["config"])]


def _inputs_of(setup: dict, stage: str, root: Path) -> None:
    """Give ``root`` what ``stage`` reads: the reference's files of the earlier stages, or for
    detect the val split detected here, so that its index starts with the val rows only."""
    upstream = {"train-detector": [], "detect": [],
                "train-attention": ["regions", "vocab.json"],
                "attend": ["regions", "vocab.json", "models/captioner.pt"],
                "build-memory": ["regions", "vocab.json", "attention"]}[stage]
    for name in upstream:
        source, target = setup["reference"] / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("grounding*"))
        else:
            shutil.copy2(source, target)
    if stage == "detect":
        for args in setup["before"]["detect"]:
            run_prep(_command(setup, stage, root, args))


def _assert_complete(setup: dict, stage: str, root: Path) -> None:
    assert crash.differences(setup["plan"][stage], root, setup["reference"]) == []
    assert crash.temporaries(root) == []


@pytest.mark.parametrize("stage, file_name", [
    ("build-memory", "memory.provenance.json"),
    ("train-attention", "captioner.ckpt.pt"),
])
def test_killed_in_the_middle_of_a_write_resumes_and_leaves_nothing(setup, tmp_path, stage,
                                                                     file_name):
    root = tmp_path / "artifacts"
    _inputs_of(setup, stage, root)
    args = _command(setup, stage, root)
    env = {**os.environ, **crash.ONE_THREAD}
    before = crash.snapshot(setup["plan"][stage], root)
    killed = subprocess.run([sys.executable, "-c", DIE_BEFORE_RENAME, file_name, *args],
                            env=env, start_new_session=True, capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    left = crash.temporaries(root)
    assert len(left) == 1 and left[0].name.startswith(f".tmp-{file_name}."), left
    for path in root.rglob(file_name):  # the file being written is still the one before
        assert crash.content(path, root) == before[path.relative_to(root)]
    assert crash.differences(setup["plan"][stage], root, setup["reference"], before=before) == []
    run_prep(args)
    _assert_complete(setup, stage, root)


def test_train_detector_sweeps_what_a_killed_run_left_in_models(setup, tmp_path):
    """The same leftover for the detector (train-attention's above is made by a real kill):
    a complete-looking checkpoint temporary, in models/ beside another stage's, which must
    survive: a stage sweeps only its own temporaries in a folder stages share."""
    root = tmp_path / "artifacts"
    models = root / "models"
    models.mkdir(parents=True)
    shutil.copy(setup["reference"] / "models" / "detector.ckpt.pt",
                models / ".tmp-detector.ckpt.pt.k1lled00")
    (models / ".tmp-damsm.pt.running0").write_bytes(b"another stage, still writing")
    run_prep(_command(setup, "train-detector", root))
    assert [p.name for p in crash.temporaries(root)] == [".tmp-damsm.pt.running0"]
    (models / ".tmp-damsm.pt.running0").unlink()
    _assert_complete(setup, "train-detector", root)


def _after_first_write(folder: Path, rng: random.Random, spread: float):
    """Kill a random moment (up to ``spread`` s) after the run's first write in ``folder``,
    so that the kills land while the stage works rather than while Python starts."""
    def kill_when(_process, elapsed: float) -> bool:
        if state["first"] is None and folder.is_dir() and any(
                p.name.startswith(crash.TMP_PREFIX) or p.name not in state["known"]
                for p in folder.iterdir() if p.name != LOCK_NAME):
            state["first"] = elapsed
        return state["first"] is not None and elapsed >= state["first"] + state["delay"]

    state = {"first": None, "delay": rng.uniform(0, spread),
             "known": {p.name for p in folder.iterdir()} if folder.is_dir() else set()}
    return kill_when


def test_random_kills_resume_to_the_uninterrupted_artifacts(setup, tmp_path):
    """Two kills of detect at random moments while it writes (only its own process group
    dies), each followed by a check that every finished-looking file is right; a run that
    ends before its kill completes the stage, is compared and starts it over. Then a run to
    completion: the same shards, index and record, and no temporary left."""
    root = tmp_path / "artifacts"
    _inputs_of(setup, "detect", root)
    rng = random.Random(7)
    report = crash.StageReport()
    args = _command(setup, "detect", root)
    crash.campaign(setup["plan"]["detect"], [sys.executable, "-m", "cpgan.cli.prep", *args],
                   root, setup["reference"], kills=2,
                   kill_moment=lambda: _after_first_write(root / "regions", rng, 0.5),
                   env={**os.environ, **crash.ONE_THREAD}, log=tmp_path / "stderr.txt",
                   report=report, finish=lambda: run_prep(args))
    assert report.kills == 2 and report.identical, report.summary()
    _assert_complete(setup, "detect", root)


def test_a_worker_killed_mid_write_is_replaced_and_its_temporary_swept(setup, tmp_path):
    """A worker dies while renaming its shard (out of memory, a lost node): the stage goes on,
    dask redoes the task on the worker the nanny restarts, and the dead worker's complete-
    looking temporary must not outlive the run."""
    from dask.distributed import Client

    root = tmp_path / "artifacts"
    _inputs_of(setup, "detect", root)
    with Client(setup["cluster"].scheduler_address) as client:
        before = set(client.run(os.getpid).values())
        client.run(exec, WORKER_DIES_BEFORE_RENAME, {"NAME": "train2014-00000.h5"})
        run_prep(_command(setup, "detect", root))
        client.wait_for_workers(1)
        assert not before & set(client.run(os.getpid).values())  # the worker was replaced
    _assert_complete(setup, "detect", root)
