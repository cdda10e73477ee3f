"""The artifact store: atomic writes and provenance (DESIGN §3).

Every file a stage writes goes through :func:`atomic_write` or :func:`atomic_dir`: the content
is written to a temporary name in the same folder, flushed and fsynced, then renamed into place.
A run killed at any moment therefore leaves either the previous complete file or nothing that
looks finished (temporary names start with ``.tmp-`` and are swept on the next run).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from cpgan import layout
from cpgan.config import fill_new_keys
from cpgan.errors import CpganError, one_line

if TYPE_CHECKING:
    import pyarrow as pa

TMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
"""The process's umask, read once: finished files get the permissions a plain ``open`` would
give them (``tempfile`` creates its files 0600 and folders 0700, which would keep artifacts
from the other users of a shared cluster filesystem)."""


def _fsync_dir(path: Path) -> None:
    """Make a rename durable by fsyncing the folder that holds it (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``.

    The caller writes the whole file to the yielded path (with any library: h5py, pyarrow,
    torch.save, plain open). On an exception the temporary file is removed and ``path`` is left
    untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_parquet(path: Path, missing: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The table in ``path`` (only ``columns`` when given); a one-line :class:`CpganError` when
    the file is absent (``missing`` says what it is and what writes it) or not Parquet. The
    caller checks the schema: each artifact has its own."""
    import pyarrow as pa  # here, not at the top: every CLI imports this module, few read Parquet
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=columns)
        _ = table.schema.names  # decoded on first use: a footer whose names are not UTF-8 fails here
    except FileNotFoundError:
        raise CpganError(f"{path}: {missing}") from None
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise CpganError(f"{path}: not a readable Parquet file ({one_line(exc)})") from None
    return table


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success rename it to ``path``.

    For outputs that are a whole tree (the toy dataset). ``path`` must not exist yet: replacing
    a finished tree is the caller's explicit decision, not a side effect.
    """
    target = Path(path)
    if target.exists():
        raise FileExistsError(f"{target}: already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as handle:
                    os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, stage: str) -> Iterator[None]:
    """Hold ``folder`` for one run of ``stage``; a second run on the same folder fails at once.

    Two runs writing one folder (``detect`` for train2014 and val2014 started together on the
    same regions/) would sweep each other's temporaries and race on the shared index. The lock
    is an ``flock`` on ``<folder>/.lock``: the kernel releases it when the holder exits, however
    it exits, so a killed run never leaves the folder locked.
    """
    from cpgan.errors import CpganError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CpganError(f"{folder}: another run is writing this folder (locked); run "
                             f"{stage} for one split at a time, or wait for the other run "
                             "to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sweep_temporaries(folder: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Remove temporary files and folders a killed run left in ``folder``; return what went.

    With ``prefix``, only the temporaries of targets whose names start with it: in a folder
    other stages write to at the same time (``models/``), a stage sweeps its own only.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_PREFIX + prefix):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# --------------------------------------------------------------------------- provenance
#
# Each stage writes one record beside its outputs: the resolved config, the parameters that
# decide its result, fingerprints of its inputs and outputs, the package version and a summary
# of key figures. A stage is "done" when its record exists and every input and output still
# matches its fingerprint, "stale" when something changed, "missing" when it never finished.

STAGES = (
    "vocab",
    "train-detector",
    "detect",
    "train-attention",
    "attend",
    "build-memory",
    "damsm",
    "gan",
    "eval",
)
_RECORD_PATHS = {
    "vocab": "vocab.provenance.json",
    "train-detector": "models/detector.provenance.json",
    "detect": "regions/{split}.provenance.json",
    "train-attention": "models/captioner.provenance.json",
    "attend": "attention/{split}.provenance.json",
    "build-memory": "memory.provenance.json",
    "damsm": layout.damsm_record(layout.damsm_path(Path("models"))).as_posix(),
    "gan": f"{layout.RUNS_DIR}/{layout.RUN_STEM}/{layout.GAN_RECORD_NAME}",
    "eval": "report/report.provenance.json",
}
_HASH_CHUNK = 1 << 20


def record_path(root: Path, stage: str, split: str | None = None) -> Path:
    """Where ``stage`` keeps its provenance record under the artifacts root."""
    template = _RECORD_PATHS[stage]
    if "{split}" in template and not split:
        raise ValueError(f"stage {stage} needs a split")
    return Path(root) / template.format(split=split)


def fingerprint(path: Path, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size, mtime and SHA-256 of a file; the hash is reused from ``known`` when size and
    mtime are unchanged, so checking a multi-GB shard is cheap unless it was rewritten."""
    stat = Path(path).stat()
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return dict(known)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def record_key(root: Path, path: Path) -> str:
    """Record paths relative to the artifacts root when inside it (the root can move)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _resolve(root: Path, key: str) -> Path:
    path = Path(key)
    return path if path.is_absolute() else Path(root) / path


def write_record(
    root: Path,
    stage: str,
    *,
    config: dict[str, Any],
    params: dict[str, Any],
    inputs: Iterable[Path],
    outputs: Iterable[Path],
    summary: dict[str, Any] | None = None,
    split: str | None = None,
    path: Path | None = None,
) -> Path:
    """Write ``stage``'s provenance record atomically, after its outputs are in place, to
    ``path`` (default :func:`record_path`; the DAMSM ablations keep theirs beside their model
    files)."""
    from cpgan import __version__

    record = {
        "stage": stage,
        "split": split,
        "version": __version__,
        "params": params,
        "inputs": {record_key(root, p): fingerprint(p) for p in sorted(map(Path, inputs))},
        "outputs": {record_key(root, p): fingerprint(p) for p in sorted(map(Path, outputs))},
        "summary": summary or {},
        "config": config,
    }
    path = path or record_path(root, stage, split)
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def read_record(root: Path, stage: str, split: str | None = None,
                path: Path | None = None) -> dict[str, Any] | None:
    """The stage's record (at ``path``, default :func:`record_path`), or None when there is
    none or it is unreadable."""
    path = path or record_path(root, stage, split)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("stage") == stage else None


def _changed(root: Path, files: dict[str, Any], role: str) -> str | None:
    for key, known in files.items():
        path = _resolve(root, key)
        if not path.is_file():
            return f"{role} {key} is missing"
        if fingerprint(path, known)["sha256"] != known.get("sha256"):
            return f"{role} {key} changed"
    return None


def stage_state(root: Path, stage: str, split: str | None = None) -> tuple[str, str]:
    """("done" | "stale" | "missing", reason) for one stage."""
    record = read_record(root, stage, split)
    if record is None:
        return "missing", "no provenance record"
    reason = _changed(root, record.get("inputs", {}), "input") or _changed(
        root, record.get("outputs", {}), "output"
    )
    return ("stale", reason) if reason else ("done", "")


def same_params(recorded: Any, params: dict[str, Any],
                defaults: dict[str, Any] | None = None, ignore: Iterable[str] = ()) -> bool:
    """Are a record's parameters ``params``, once the keys it predates are taken from
    ``defaults`` (:func:`cpgan.config.fill_new_keys`) and the dotted keys in ``ignore``
    ("detector.feature_layer": settings the stage records but whose value its outputs do not
    depend on) are left out of both?"""
    current = json.loads(json.dumps(params))
    if defaults is not None:
        recorded = fill_new_keys(recorded, current, defaults)
    for dotted in ignore:
        recorded, current = _without(recorded, dotted), _without(current, dotted)
    return recorded == current


def _without(params: Any, dotted: str) -> Any:
    """``params`` with the nested key ``dotted`` ("section.key") removed, if it is there."""
    head, _, rest = dotted.partition(".")
    if not isinstance(params, dict) or head not in params:
        return params
    kept = dict(params)
    if rest:
        kept[head] = _without(params[head], rest)
    else:
        del kept[head]
    return kept


def same_inputs(root: Path, recorded: dict[str, Any], inputs: Iterable[Path]) -> bool:
    """Are ``inputs`` the files of a record's ``inputs`` fingerprints? Files inside the
    artifacts root are matched by path and content. Files outside it (the preset's Darknet cfg
    in the checkout, the user's weight files) are matched by name and content: the same files
    reached from another checkout or working directory, or after the checkout moved, are the
    same inputs, and a finished stage is not redone for their new absolute paths."""
    current = {record_key(root, Path(p)): Path(p) for p in inputs}
    inside_recorded = {k: v for k, v in recorded.items() if not Path(k).is_absolute()}
    if set(inside_recorded) != {k for k in current if not Path(k).is_absolute()}:
        return False
    if _changed(root, inside_recorded, "input") is not None:
        return False
    wanted = sorted((Path(k).name, known.get("sha256")) for k, known in recorded.items()
                    if Path(k).is_absolute())
    found = []
    for key, path in current.items():
        if Path(key).is_absolute():
            if not path.is_file():
                return False
            found.append((path.name, fingerprint(path, recorded.get(key))["sha256"]))
    return sorted(found) == wanted


def is_current(
    root: Path,
    stage: str,
    *,
    params: dict[str, Any],
    inputs: Iterable[Path],
    split: str | None = None,
    defaults: dict[str, Any] | None = None,
    ignore: Iterable[str] = (),
    path: Path | None = None,
) -> bool:
    """True when ``stage`` already finished with these parameters and these inputs
    (:func:`same_inputs`) and its outputs are unchanged, so a rerun can skip it. ``defaults``
    (:func:`cpgan.config.config_defaults` of the config sections ``params`` records) stand in
    for the keys the record predates; the dotted keys in ``ignore`` are not compared
    (:func:`same_params`). ``path`` is the record's file (default :func:`record_path`). A
    record whose inputs were matched by name and content is rewritten to name them where they
    are now (:func:`_repoint_inputs`)."""
    path = path or record_path(root, stage, split)
    record = read_record(root, stage, split, path)
    if record is None or not same_params(record.get("params"), params, defaults, ignore):
        return False
    inputs = list(inputs)
    if not (same_inputs(root, record.get("inputs", {}), inputs)
            and _changed(root, record.get("outputs", {}), "output") is None):
        return False
    _repoint_inputs(path, record, root, inputs)
    return True


def _repoint_inputs(path: Path, record: dict[str, Any], root: Path,
                    inputs: list[Path]) -> None:
    """Rewrite the record at ``path``, whose inputs :func:`same_inputs` matched by name and
    content, so that it names them where they are now: ``cpgan-prep status`` then checks the
    files the stage would use, not those of a checkout that moved or is gone."""
    recorded = record.get("inputs", {})
    current = {record_key(root, Path(p)): Path(p) for p in inputs}
    if set(current) == set(recorded):
        return
    fingerprints = {key: fingerprint(p, recorded.get(key)) for key, p in sorted(current.items())}
    atomic_write_text(path, json.dumps({**record, "inputs": fingerprints}, indent=1,
                                       sort_keys=True) + "\n")
