"""Running a stage's tasks on dask: a LocalCluster of worker processes, or an existing cluster.

Every parallel prep stage (detect, attend, build-memory) cuts its work into independent tasks
that read artifacts and write their own output files; this module submits them, counts
progress in the stage's own unit (images, rows) and tears down the LocalCluster it started.
Each worker runs one torch/BLAS thread: CPU kernels sum in a thread-count-dependent order, and
an artifact must not depend on how many workers produced it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def local_cluster(workers: int) -> Any:
    """A LocalCluster of ``workers`` single-threaded processes, without a dashboard. Its
    scheduler's HTTP server (health routes only) takes a free port: on dask's default 8787 it
    would warn whenever another cluster, a notebook's or a test's, already holds that port."""
    from dask.distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                        dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                        silence_logs=40, env=ONE_THREAD_ENV)


def run_tasks(
    function: Callable[..., int],
    tasks: Sequence[tuple[Any, ...]],
    *,
    workers: int,
    scheduler: str | None,
    total: int,
    initial: int = 0,
    description: str = "",
    unit: str = "it",
    progress: bool = True,
) -> None:
    """Run ``function(*task)`` for every task; each call returns how many units it finished.

    ``scheduler`` is the address of an existing dask scheduler (``tcp://host:8786``); without
    it a LocalCluster of ``workers`` single-threaded processes is started and closed. Nothing
    starts when ``tasks`` is empty. The first failing task's exception is raised.
    """
    from dask.distributed import Client, as_completed
    from tqdm import tqdm

    if not tasks:
        return
    cluster = None
    if scheduler is None:
        cluster = local_cluster(workers)
    try:
        with Client(scheduler or cluster) as client, tqdm(
            total=total, initial=initial, unit=unit, desc=description, disable=not progress
        ) as bar:
            futures = [client.submit(function, *task, pure=False) for task in tasks]
            for future in as_completed(futures):
                bar.update(future.result())
    finally:
        if cluster is not None:
            cluster.close()


def default_workers() -> int:
    """One worker process per CPU core."""
    return os.cpu_count() or 1
