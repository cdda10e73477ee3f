"""Beyond one machine: detect, attend and build-memory against a dask cluster of separate
processes.

A scheduler and two workers are started with the ``dask`` command line, each in its own folder
and with the thread settings a worker node has by default (not the one-thread environment the
LocalCluster gets), the way an existing cluster looks to ``--scheduler``. The stages run from
another working directory with a relative ``--artifacts``, as a user types them, and their
artifacts must equal, by content, those of a LocalCluster run: the cluster the stages start
themselves (``LocalCluster(n_workers, threads_per_worker=1, env=ONE_THREAD_ENV)``), started
here once and shared by the stages, because each start costs a worker's torch import.
The CLI's own ``--workers`` path is covered by tests/test_detect.py and tests/test_attend.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cpgan.pipeline.toy import generate_toy_coco

from builders import one_worker_cluster, run_prep, write_random_weights

DASK = Path(sys.executable).parent / "dask"
TINY_CAPTIONER = "[attention]\nembed_dim = 16\nhidden_dim = 32\nattention_dim = 16\nepochs = 1\n"
BOOT_SECONDS = 120


# ----------------------------------------------------------------------------- the cluster


def _read_address(scheduler_file: Path, process: subprocess.Popen, log: Path) -> str:
    """The scheduler's address from its --scheduler-file, which appears (and may be read half
    written) once it listens on the free port it picked."""
    deadline = time.monotonic() + BOOT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dask scheduler exited: {log.read_text()[-2000:]}")
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            time.sleep(0.1)
    raise TimeoutError(f"dask scheduler did not start: {log.read_text()[-2000:]}")


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGKILL each process group we started (a worker's nanny and its worker): nothing of
    theirs outlives the test, and a graceful close would only cost time."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _start(command: list[str], folder: Path, env: dict[str, str]) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "log.txt", "wb")
    try:
        return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=log,
                                start_new_session=True)
    finally:
        log.close()


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[str]:
    """The LocalCluster a stage starts for --workers 1 (same options)."""
    with one_worker_cluster() as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A scheduler on a free localhost port and two single-threaded worker processes."""
    from dask.distributed import Client

    folder = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # a node's default: tasks must pin their own
    scheduler_file = folder / "scheduler" / "scheduler.json"
    processes: list[subprocess.Popen] = []
    try:
        processes.append(_start([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                 "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                folder / "scheduler", env))
        address = _read_address(scheduler_file, processes[0], folder / "scheduler" / "log.txt")
        for name in ("w0", "w1"):
            processes.append(_start(
                [str(DASK), "worker", address, "--name", name, "--nthreads", "1",
                 "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard",
                 "--preload", "cpgan.pipeline.detect"],  # imports torch while we set up
                folder / name, env))
        client = Client(address, timeout=BOOT_SECONDS)
        try:
            yield {"address": address, "client": client, "folder": folder, "processes": processes}
        finally:
            client.close()
    finally:
        _stop(processes)


# ----------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, external_cluster, local_cluster) -> dict[str, Path]:
    """The same detect, attend and build-memory, once on the LocalCluster and once on the
    external cluster from another working directory with a relative --artifacts."""
    root = tmp_path_factory.mktemp("runs")
    coco = generate_toy_coco(root / "coco", train_images=7, val_images=3, image_size=64, seed=5,
                             progress=False)
    weights = write_random_weights(root / "random.weights", seed=0)
    (root / "tiny.toml").write_text(TINY_CAPTIONER)
    local, remote = root / "local", root / "remote"
    common = ["--coco-root", str(coco), "--config", str(root / "tiny.toml")]
    detect = ["detect", *common, "--weights", str(weights), "--shard-size", "3",
              "--batch-size", "2"]
    run_prep([*detect, "--artifacts", str(local), "--scheduler", local_cluster])
    external_cluster["client"].wait_for_workers(2, timeout=BOOT_SECONDS)
    address = external_cluster["address"]
    previous = Path.cwd()
    os.chdir(root)  # the workers' folders differ: a relative path must not reach them
    try:
        for split in ("train2014", "val2014"):
            run_prep([*detect, "--artifacts", "remote", "--split", split, "--scheduler", address])
        run_prep(["vocab", *common, "--artifacts", "remote"])
        run_prep(["train-attention", *common, "--artifacts", "remote"])
        run_prep(["attend", *common, "--artifacts", "remote", "--scheduler", address])
        run_prep(["build-memory", *common, "--artifacts", "remote", "--scheduler", address])
    finally:
        os.chdir(previous)
    for name in ("vocab.json", "models/captioner.pt"):  # the same captioner for both runs
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(remote / name, local / name)
    run_prep(["attend", *common, "--artifacts", str(local), "--scheduler", local_cluster])
    run_prep(["build-memory", *common, "--artifacts", str(local), "--scheduler", local_cluster])
    return {"local": local, "remote": remote}


# ----------------------------------------------------------------------------- contents


def _h5(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        content: dict[str, Any] = {name: f[name][:] for name in f}
        content["attrs"] = {key: json.loads(value) for key, value in f.attrs.items()}
    return content


def _assert_same_h5(got: Path, want: Path) -> None:
    a, b = _h5(got), _h5(want)
    assert a.keys() == b.keys() and a.pop("attrs") == b.pop("attrs"), got.name
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"{got.name}:{name}")


def _train_rows(index: Path):
    table = pq.read_table(index)
    return table.filter(pc.equal(table["split"], "train2014"))


def test_detect_on_the_cluster_equals_the_local_cluster(runs, external_cluster):
    local, remote = runs["local"] / "regions", runs["remote"] / "regions"
    shards = sorted(p.name for p in local.glob("train2014-*.h5"))
    assert shards == [f"train2014-0000{i}.h5" for i in range(3)]
    assert sorted(p.name for p in remote.glob("train2014-*.h5")) == shards
    for name in shards:
        _assert_same_h5(remote / name, local / name)
    assert _train_rows(remote / "index.parquet").equals(_train_rows(local / "index.parquet"))
    assert _train_rows(local / "index.parquet").num_rows == 7
    assert not list(external_cluster["folder"].rglob("*.h5"))  # nothing landed in a worker's cwd


def test_attend_on_the_cluster_equals_the_local_cluster(runs):
    local, remote = runs["local"] / "attention", runs["remote"] / "attention"
    parts = sorted(p.name for p in local.glob("train2014-*.parquet"))
    assert parts == [f"train2014-0000{i}.parquet" for i in range(3)]
    assert sorted(p.name for p in remote.glob("train2014-*.parquet")) == parts
    for name in parts:
        got, want = pq.read_table(remote / name), pq.read_table(local / name)
        assert want.num_rows > 0 and got.equals(want, check_metadata=True), name
    grounding = json.loads((local / "grounding.json").read_text())
    assert json.loads((remote / "grounding.json").read_text()) == grounding
    assert grounding["overall"]["occurrences"] > 0


def test_build_memory_on_the_cluster_equals_the_local_cluster(runs):
    """The bank, its index and purity report. memory.h5's digest of the regions and its input
    fingerprints differ by design: the remote index also holds the val split's rows."""
    local, remote = runs["local"], runs["remote"]
    with h5py.File(local / "memory.h5", "r") as want, h5py.File(remote / "memory.h5", "r") as got:
        for name in ("memory", "words", "support", "relevant"):
            np.testing.assert_array_equal(got[name][:], want[name][:], err_msg=name)
        skip = {"regions_sha256"}
        assert ({k: v for k, v in got.attrs.items() if k not in skip}
                == {k: v for k, v in want.attrs.items() if k not in skip})
        assert (want["support"][:] > 0).sum() > 5
    index = pq.read_table(local / "memory_index.parquet")
    assert index.num_rows > 0 and pq.read_table(remote / "memory_index.parquet").equals(index)
    purity = json.loads((local / "memory_purity.json").read_text())
    assert json.loads((remote / "memory_purity.json").read_text()) == purity


def test_the_work_ran_on_both_external_workers(runs, external_cluster):
    """Each worker process loaded the detector or the captioner itself: the tasks were not run
    by the client, and the two workers shared them."""

    def loaded() -> int:
        modules = [sys.modules.get(f"cpgan.pipeline.{name}") for name in ("detect", "attend")]
        return sum(len(module._WORKER_CACHE) for module in modules if module is not None)

    counts = external_cluster["client"].run(loaded)
    assert len(counts) == 2 and all(count >= 1 for count in counts.values()), counts
    assert all(p.poll() is None for p in external_cluster["processes"])


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
        return True


def test_the_stages_local_cluster_leaves_dask_s_default_port_alone():
    """With dask's default HTTP port 8787 taken (another cluster, a notebook), the cluster a
    stage starts runs its tasks without warning about the port: its scheduler takes a free one."""
    from cpgan.pipeline.cluster import run_tasks

    holder = socket.socket()
    if _port_is_free(8787):  # otherwise something else holds it already, as this test wants
        holder.bind(("", 8787))
        holder.listen()
    assert not _port_is_free(8787)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_tasks(len, [("ab",), ("cde",)], workers=1, scheduler=None, total=5,
                      progress=False)
    finally:
        holder.close()
    assert not [w for w in caught if "8787" in str(w.message)]
