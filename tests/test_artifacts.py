import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpgan.pipeline import artifacts


def test_atomic_write_replaces_only_on_success(tmp_path: Path):
    target = tmp_path / "out.bin"
    artifacts.atomic_write_bytes(target, b"first")
    with pytest.raises(RuntimeError):
        with artifacts.atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_write_killed_half_way_leaves_nothing_that_looks_finished(tmp_path: Path):
    target = tmp_path / "big.bin"
    script = (
        "import sys, time\n"
        "from cpgan.pipeline.artifacts import atomic_write\n"
        "with atomic_write(sys.argv[1]) as tmp:\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'x' * 1000); f.flush()\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert leftovers and all(p.name.startswith(artifacts.TMP_PREFIX) for p in leftovers)
    assert artifacts.sweep_temporaries(tmp_path) == leftovers
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir(tmp_path: Path):
    target = tmp_path / "tree"
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "a").mkdir()
        (tmp / "a" / "f.txt").write_text("hi")
        assert not target.exists()
    assert (target / "a" / "f.txt").read_text() == "hi"
    with pytest.raises(FileExistsError):
        with artifacts.atomic_dir(target):
            pass
    with pytest.raises(ValueError):
        with artifacts.atomic_dir(tmp_path / "other") as tmp:
            (tmp / "partial").write_text("x")
            raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def _run_stage(root: Path, source: Path, params: dict) -> Path:
    out = root / "vocab.json"
    artifacts.atomic_write_text(out, source.read_text().upper())
    artifacts.write_record(root, "vocab", config={"k": 1}, params=params, inputs=[source], outputs=[out])
    return out


def test_status_done_stale_missing(tmp_path: Path):
    root = tmp_path / "artifacts"
    source = tmp_path / "captions.json"
    source.write_text("a red ball")
    assert artifacts.stage_state(root, "vocab") == ("missing", "no provenance record")
    out = _run_stage(root, source, {"min_count": 1})
    assert artifacts.stage_state(root, "vocab") == ("done", "")
    assert artifacts.is_current(root, "vocab", params={"min_count": 1}, inputs=[source])
    assert not artifacts.is_current(root, "vocab", params={"min_count": 2}, inputs=[source])

    time.sleep(0.01)
    source.write_text("a blue box")
    state, reason = artifacts.stage_state(root, "vocab")
    assert state == "stale" and "captions.json changed" in reason
    assert not artifacts.is_current(root, "vocab", params={"min_count": 1}, inputs=[source])

    _run_stage(root, source, {"min_count": 1})
    assert artifacts.stage_state(root, "vocab")[0] == "done"
    out.write_text("edited by hand")
    assert artifacts.stage_state(root, "vocab") == ("stale", "output vocab.json changed")
    out.unlink()
    assert artifacts.stage_state(root, "vocab") == ("stale", "output vocab.json is missing")


def test_inputs_outside_the_root_are_matched_by_name_and_content(tmp_path: Path):
    """The preset's Darknet cfg is an input outside the artifacts root, recorded by absolute
    path. The same file reached from another checkout (or after the checkout moved) is the
    same input; another file, or the same content under another name, is not."""
    root = tmp_path / "artifacts"
    first, second, third = (tmp_path / f"checkout-{c}" / "yolov3-toy.cfg" for c in "abc")
    for cfg in (first, second, third):
        cfg.parent.mkdir()
        cfg.write_text("[net]\nwidth=128\n")
    source = root / "captions.json"
    source.parent.mkdir()
    source.write_text("a red ball")
    out = root / "vocab.json"
    out.write_text("A RED BALL")
    artifacts.write_record(root, "vocab", config={}, params={}, inputs=[source, first],
                           outputs=[out])
    first.unlink()  # the checkout that ran the stage is gone
    assert artifacts.stage_state(root, "vocab")[0] == "stale"
    assert artifacts.is_current(root, "vocab", params={}, inputs=[source, second])
    # the record now names the file it was matched with: status agrees with the skip
    assert artifacts.stage_state(root, "vocab") == ("done", "")
    assert str(second) in artifacts.read_record(root, "vocab")["inputs"]

    renamed = second.with_name("yolov3-tiny.cfg")
    renamed.write_text(second.read_text())
    assert not artifacts.is_current(root, "vocab", params={}, inputs=[source, renamed])
    second.write_text("[net]\nwidth=416\n")
    assert not artifacts.is_current(root, "vocab", params={}, inputs=[source, second])
    assert not artifacts.is_current(root, "vocab", params={}, inputs=[source])
    assert artifacts.is_current(root, "vocab", params={}, inputs=[source, third])
    moved_inside = root / "other.json"  # inside the root, paths still count
    moved_inside.write_text(source.read_text())
    assert not artifacts.is_current(root, "vocab", params={}, inputs=[moved_inside, third])


def test_a_parameter_the_record_predates_counts_as_its_default(tmp_path: Path):
    """A stage finished before a config key existed stays done while the key is at its
    default (the behaviour before it) and is stale once the key is set otherwise."""
    root = tmp_path / "artifacts"
    source = tmp_path / "captions.json"
    source.write_text("a red ball")
    _run_stage(root, source, {"gan": {"lr_g": 1e-3}})
    defaults = {"gan": {"lr_g": 2e-4, "d_norm": "batch"}}
    upgraded = {"gan": {"lr_g": 1e-3, "d_norm": "batch"}}
    assert artifacts.is_current(root, "vocab", params=upgraded, inputs=[source],
                                defaults=defaults)
    assert not artifacts.is_current(root, "vocab", params=upgraded, inputs=[source])
    changed = {"gan": {"lr_g": 1e-3, "d_norm": "spectral"}}
    assert not artifacts.is_current(root, "vocab", params=changed, inputs=[source],
                                    defaults=defaults)
    unknown = {"gan": {"lr_g": 1e-3, "width": 2}}
    assert not artifacts.is_current(root, "vocab", params=unknown, inputs=[source],
                                    defaults=defaults)


def test_ignored_keys_are_left_out_of_both_sides(tmp_path: Path):
    """A stage that records a setting its outputs do not depend on stays done when only that
    setting changes, whether the record has the key or predates it; any other change counts."""
    root = tmp_path / "artifacts"
    source = tmp_path / "captions.json"
    source.write_text("a red ball")
    _run_stage(root, source, {"detector": {"lr": 1e-3, "feature_layer": 20}, "seed": 0})
    ignore = ["detector.feature_layer", "detector.shard_size"]
    moved = {"detector": {"lr": 1e-3, "feature_layer": 16, "shard_size": 9}, "seed": 0}
    assert artifacts.is_current(root, "vocab", params=moved, inputs=[source], ignore=ignore)
    assert not artifacts.is_current(root, "vocab", params=moved, inputs=[source])
    trained_otherwise = {"detector": {"lr": 2e-3, "feature_layer": 16}, "seed": 0}
    assert not artifacts.is_current(root, "vocab", params=trained_otherwise, inputs=[source],
                                    ignore=ignore)
    assert not artifacts.is_current(root, "vocab", params={**moved, "seed": 1}, inputs=[source],
                                    ignore=ignore)


def test_touch_without_change_stays_done(tmp_path: Path):
    root = tmp_path / "artifacts"
    source = tmp_path / "captions.json"
    source.write_text("same")
    _run_stage(root, source, {})
    os.utime(source, ns=(1, 1))  # mtime changes, content does not: rehash says unchanged
    assert artifacts.stage_state(root, "vocab") == ("done", "")


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_finished_files_and_trees_get_the_umask_permissions_not_tempfiles_0600(tmp_path):
    """Artifacts on a shared cluster filesystem must be readable by the other users' workers:
    tempfile makes files 0600 and folders 0700; a finished artifact gets what a plain open
    (or mkdir) gives under the same umask."""
    artifacts.atomic_write_text(tmp_path / "a.json", "{}")
    with artifacts.atomic_dir(tmp_path / "tree") as tree:
        (tree / "x").write_text("x")
    (tmp_path / "plain.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "plain.json")
    assert _mode(tmp_path / "tree") == _mode(tmp_path / "plain")


def _holds(folder: Path, stage: str = "detect") -> bool:
    """Take ``folder``'s lock and let it go; True once it was held."""
    with artifacts.folder_lock(folder, stage):
        return True


def test_a_second_run_on_a_locked_folder_fails_at_once_and_the_lock_dies_with_its_holder(
        tmp_path):
    from cpgan.errors import CpganError

    folder = tmp_path / "regions"
    with artifacts.folder_lock(folder, "detect"):
        with pytest.raises(CpganError, match=r"regions: another run is writing this folder "
                           r"\(locked\); run detect"):
            _holds(folder)
    assert _holds(folder)  # released on exit
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cpgan.pipeline import artifacts\n"
         f"with artifacts.folder_lock({str(folder)!r}, 'attend'):\n"
         "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CpganError, match="another run is writing"):
            _holds(folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _holds(folder)  # a killed holder leaves nothing locked
