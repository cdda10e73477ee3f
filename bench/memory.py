"""Benchmark of `cpgan-prep build-memory` at COCO scale (issue 5). Not a test.

Synthetic inputs, generated once and cached under --workdir (default /tmp/cpgan-bench-memory):

* ``vocab.json``: V = 27,297 tokens (the 4 specials and w00004 ... w27296).
* The attention table of COCO train2014: 82,783 images (ids 1..82,783), 5 captions each of 8
  to 13 words (binomial, mean 10.5): 4.35 M rows. Word ids are Zipf-distributed (exponent
  1.1) over the 27,293 words, regions uniform in 0..35, weights 1/36 + 35/36 * Beta(2, 5).
  One part per 1,024 images (81 parts), as detect's shard size 1,024 would cut COCO.
* Region shards "drawn to match": 8 shards x 1,024 images x 36 regions x D = 1,024 float16
  features (604 MB, random normal) with random boxes. ``regions/index.parquet`` lists all
  82,783 images; the image of rank k (0-based, by id) uses feature row j = k mod 8,192, i.e.
  shard j // 1,024, row j % 1,024. So the table is full size while the I/O part reads at
  most 8,192 distinct rows (COCO would read up to ~10x more from disk).

Sizes 1/4, 1/2 and 1 are the first 20,695 / 41,391 / 82,783 images (same rows per image). For
each size, in a fresh child process: the shard files are read once to warm the page cache,
then `build-memory --no-purity --force --workers W` runs (the Click command, provenance record
included) from a root without a previous memory.h5, so every input is hashed; a second child
reads just the needed feature rows (the I/O floor: sorted unique rows per shard, in the same
batches). Peak RSS is the largest sum of RSS over the child's process tree (dask workers
included), polled every 50 ms with psutil; shared pages count once per process, so it errs
high. Phase times come from wrapping the stage's functions in the child.

    .venv/bin/python bench/memory.py [--workers 2] [--workdir /tmp/cpgan-bench-memory]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

IMAGES = 82_783
CAPTIONS = 5
VOCAB = 27_297
SLOTS = 36
DIM = 1024
FEATURE_IMAGES = 8_192
SHARD_SIZE = 1_024
ZIPF = 1.1
SIZES = {"1/4": IMAGES // 4, "1/2": IMAGES // 2, "1": IMAGES}
SPLIT = "train2014"
GENERATOR_VERSION = 1


# ----------------------------------------------------------------------------- inputs


def attention_table(seed: int = 0) -> dict[str, np.ndarray]:
    """The full synthetic attention table, rows sorted by (image, caption, position)."""
    rng = np.random.default_rng(seed)
    lengths = 8 + rng.binomial(5, 0.5, size=IMAGES * CAPTIONS)
    total = int(lengths.sum())
    caption = np.repeat(np.arange(IMAGES * CAPTIONS), lengths)
    position = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ranks = np.arange(1, VOCAB - 4 + 1, dtype=np.float64)
    p = ranks ** -ZIPF
    return {
        "image_id": (caption // CAPTIONS + 1).astype(np.int64),
        "caption_id": (caption + 1).astype(np.int64),
        "position": position.astype(np.int16),
        "word_id": (rng.choice(VOCAB - 4, size=total, p=p / p.sum()) + 4).astype(np.int32),
        "region": rng.integers(0, SLOTS, total).astype(np.int16),
        "weight": (1 / SLOTS + (1 - 1 / SLOTS) * rng.beta(2, 5, total)).astype(np.float32),
    }


def write_regions(folder: Path, seed: int = 1) -> None:
    import pyarrow as pa

    from cpgan.pipeline import regions as store

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(FEATURE_IMAGES // SHARD_SIZE):
        corner = rng.uniform(0, 400, (SHARD_SIZE, SLOTS, 2))
        size = rng.uniform(8, 240, (SHARD_SIZE, SLOTS, 2))
        rows = store.RegionRows(
            image_ids=np.arange(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE) + 1,
            boxes=np.concatenate([corner, corner + size], axis=2),
            scores=rng.uniform(0, 1, (SHARD_SIZE, SLOTS)),
            labels=rng.integers(0, 80, (SHARD_SIZE, SLOTS)),
            num_regions=np.full(SHARD_SIZE, SLOTS),
            features=rng.standard_normal((SHARD_SIZE, SLOTS, DIM), dtype=np.float32).astype(
                np.float16),
        )
        store.write_shard(folder / store.shard_name(SPLIT, shard), rows, {"bench": True})
    k = np.arange(IMAGES)
    j = k % FEATURE_IMAGES
    store.write_index(folder / store.INDEX_NAME, pa.table({
        "image_id": k + 1, "file_name": [f"COCO_train2014_{i + 1:012d}.jpg" for i in k],
        "split": [SPLIT] * IMAGES, "shard": j // SHARD_SIZE, "row": j % SHARD_SIZE,
        "width": np.full(IMAGES, 640), "height": np.full(IMAGES, 480), "status": ["ok"] * IMAGES,
    }))


def write_parts(folder: Path, table: dict[str, np.ndarray], images: int) -> int:
    """Parts of 1,024 images for the first ``images`` images; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cpgan.pipeline.memory import ATTENTION_SCHEMA

    folder.mkdir(parents=True, exist_ok=True)
    image_index = table["image_id"] - 1
    cuts = np.searchsorted(image_index, np.r_[np.arange(0, images, SHARD_SIZE), images])
    for part, (low, high) in enumerate(zip(cuts[:-1], cuts[1:])):
        chunk = {name: values[low:high] for name, values in table.items()}
        pq.write_table(pa.table(chunk, schema=ATTENTION_SCHEMA),
                       folder / f"{SPLIT}-{part:05d}.parquet")
    return int(cuts[-1])


def prepare(workdir: Path) -> dict[str, Any]:
    """Generate (or reuse) the inputs; one artifacts root per size sharing regions and vocab."""
    from cpgan.pipeline.text import SPECIALS, Vocabulary

    stamp = workdir / "inputs.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == GENERATOR_VERSION:
        return json.loads(stamp.read_text())
    start = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    words = tuple(f"w{i:05d}" for i in range(len(SPECIALS), VOCAB))
    Vocabulary(SPECIALS + words, (0,) * VOCAB, 1).save(workdir / "vocab.json")
    write_regions(workdir / "regions")
    table = attention_table()
    info: dict[str, Any] = {"version": GENERATOR_VERSION, "sizes": {}}
    for label, images in SIZES.items():
        root = workdir / f"size-{images}"
        rows = write_parts(root / "attention", table, images)
        for name in ("regions", "vocab.json"):
            if not (root / name).exists():
                (root / name).symlink_to(workdir / name)
        info["sizes"][label] = {"root": str(root), "images": images, "rows": rows}
    info["generation_s"] = round(time.perf_counter() - start, 1)
    stamp.write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------- children


def _timed(module: Any, name: str, phases: dict[str, float]) -> None:
    function: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def child_build(root: Path, workers: int) -> dict[str, Any]:
    from cpgan.cli.memory import build_memory_command
    from cpgan.pipeline import artifacts
    from cpgan.pipeline import memory as mem

    phases: dict[str, float] = {}
    for name in ("_fingerprints", "select_top", "gather_chosen", "weighted_means",
                 "_write_memory_file", "check_parts"):
        _timed(mem, name, phases)
    _timed(artifacts, "write_record", phases)
    for name in ("memory.h5", "memory_index.parquet", "memory.provenance.json"):
        (root / name).unlink(missing_ok=True)
    start = time.perf_counter()
    build_memory_command.main(["--artifacts", str(root), "--no-purity", "--force",
                               "--workers", str(workers)], standalone_mode=False)
    wall = time.perf_counter() - start
    with __import__("h5py").File(root / "memory.h5", "r") as f:
        support = f["support"][:]
    return {"wall_s": wall, "phases_s": phases, "words_full_support": int((support == 5).sum()),
            "words_zero_support": int((support == 0).sum())}


def child_floor(root: Path) -> dict[str, Any]:
    """Read every feature row build-memory needed, nothing else."""
    import pyarrow.parquet as pq

    from cpgan.pipeline import regions as store
    from cpgan.pipeline.memory import iter_feature_rows

    chosen = pq.read_table(root / "memory_index.parquet", columns=["image_id"])["image_id"]
    chosen = np.unique(chosen.to_numpy())
    index = store.read_index(root / "regions" / store.INDEX_NAME).to_pandas().set_index("image_id")
    where = index.loc[chosen, ["shard", "row"]].drop_duplicates().sort_values(["shard", "row"])
    start, total = time.perf_counter(), 0
    for shard, rows in where.groupby("shard")["row"]:
        with store.RegionShard(root / "regions" / store.shard_name(SPLIT, int(shard))) as f:
            for _offset, block in iter_feature_rows(f, rows.to_numpy()):
                total += block.nbytes
    return {"wall_s": time.perf_counter() - start, "rows": len(where), "bytes": total}


def run_child(args: list[str]) -> tuple[dict[str, Any], float]:
    """Run this script as a child; return its JSON result (plus ``cpu_s``, the user + system
    time of its whole process tree, from getrusage) and the peak RSS (bytes) of its tree."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(_rss(p) for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    out = proc.stdout.read().decode()
    if proc.returncode:
        raise SystemExit(f"child {args} failed with {proc.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.strip().splitlines()[-1])
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, peak


def _rss(process: Any) -> int:
    try:
        return process.memory_info().rss
    except Exception:  # a worker that exited between listing and reading
        return 0


def warm(root: Path) -> None:
    for path in sorted((root / "regions").glob("*.h5")):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cpgan-bench-memory"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", choices=["build", "floor"])
    parser.add_argument("--root", type=Path)
    args = parser.parse_args()
    if args.child:
        if args.child == "build":
            result = child_build(args.root, args.workers)
        else:
            result = child_floor(args.root)
        print(json.dumps(result))
        return

    info = prepare(args.workdir)
    print(f"inputs: {args.workdir} (generated in {info.get('generation_s', '?')} s)")
    results = {}
    for label, size in info["sizes"].items():
        root = Path(size["root"])
        warm(root)
        build, peak = run_child(["--child", "build", "--root", str(root),
                                 "--workers", str(args.workers)])
        floor, floor_peak = run_child(["--child", "floor", "--root", str(root)])
        results[label] = {**size, "build": build, "peak_rss_bytes": peak, "floor": floor,
                          "floor_peak_rss_bytes": floor_peak}
        phases = ", ".join(f"{k} {v:.2f}" for k, v in build["phases_s"].items())
        print(f"size {label:>3}: {size['rows']:>9,} rows  build {build['wall_s']:6.1f} s "
              f"(CPU {build['cpu_s']:5.1f} s)  "
              f"peak RSS {peak / 2**30:5.2f} GiB  I/O floor {floor['wall_s']:5.2f} s "
              f"({floor['rows']} rows, {floor['bytes'] / 2**20:.0f} MiB)  "
              f"build/floor {build['wall_s'] / floor['wall_s']:5.1f}\n    phases (s): {phases}",
              flush=True)
    full, half, quarter = (results[k] for k in ("1", "1/2", "1/4"))
    for name, a, b in (("1/2 vs 1/4", half, quarter), ("1 vs 1/2", full, half)):
        ratio = {key: a["build"][key] / b["build"][key] for key in ("wall_s", "cpu_s")}
        select = a["build"]["phases_s"]["select_top"] / b["build"]["phases_s"]["select_top"]
        print(f"{name}: rows x{a['rows'] / b['rows']:.2f}, time x{ratio['wall_s']:.2f}, "
              f"CPU x{ratio['cpu_s']:.2f}, select_top x{select:.2f}, "
              f"peak RSS x{a['peak_rss_bytes'] / b['peak_rss_bytes']:.2f}")
    rows = np.array([r["rows"] for r in results.values()]) / 1e6
    for what, values in (("wall", [r["build"]["wall_s"] for r in results.values()]),
                         ("CPU", [r["build"]["cpu_s"] for r in results.values()])):
        slope, fixed = np.polyfit(rows, values, 1)
        print(f"{what} time ~ {fixed:.1f} s + {slope:.2f} s per million attention rows")
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
