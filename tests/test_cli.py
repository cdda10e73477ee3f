"""The command line as a newcomer meets it: help texts, make-toy, vocab and status."""
import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pycocotools.coco import COCO

from cpgan.cli.prep import cli as prep
from cpgan.cli.prep import main as prep_main
from cpgan.cli.train import main as train_main


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "coco"
    result = CliRunner().invoke(prep, ["make-toy", "--out", str(out), "--train-images", "120",
                                       "--val-images", "30", "--seed", "7"])
    assert result.exit_code == 0, result.output
    return out


def test_every_prep_command_has_help():
    runner = CliRunner()
    top = runner.invoke(prep, ["--help"])
    assert top.exit_code == 0 and "status" in top.output
    for name, command in prep.commands.items():
        result = runner.invoke(prep, [name, "--help"])
        assert result.exit_code == 0, name
        assert command.help and len(command.help.split()) > 10, name
        if name != "inspect-weights":  # the only command that reads no dataset or artifact
            assert "--artifacts" in result.output and "--preset" in result.output, name


def test_make_toy_is_deterministic_and_readable(toy: Path, tmp_path: Path):
    again = tmp_path / "again"
    result = CliRunner().invoke(prep, ["make-toy", "--out", str(again), "--train-images", "120",
                                       "--val-images", "30", "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert _tree_digest(again) == _tree_digest(toy)
    for split, count in (("train2014", 120), ("val2014", 30)):
        captions = COCO(str(toy / "annotations" / f"captions_{split}.json"))
        instances = COCO(str(toy / "annotations" / f"instances_{split}.json"))
        assert len(captions.getImgIds()) == count
        for image_id in captions.getImgIds():
            assert len(captions.getAnnIds(imgIds=image_id)) == 5
            info = instances.imgs[image_id]
            for ann in instances.loadAnns(instances.getAnnIds(imgIds=image_id)):
                x, y, w, h = ann["bbox"]
                assert 0 <= x and 0 <= y and w > 0 and h > 0
                assert x + w <= info["width"] and y + h <= info["height"]
    # a second make-toy into an existing folder changes nothing
    before = _tree_digest(toy)
    result = CliRunner().invoke(prep, ["make-toy", "--out", str(toy)])
    assert result.exit_code == 0 and "already exists" in result.output
    assert _tree_digest(toy) == before


def test_vocab_then_status_then_stale(toy: Path, tmp_path: Path):
    runner = CliRunner()
    args = ["--artifacts", str(tmp_path), "--coco-root", str(toy)]
    status = runner.invoke(prep, ["status", *args])
    assert "vocab" in status.output and "missing" in status.output.splitlines()[0]

    result = runner.invoke(prep, ["vocab", *args])
    assert result.exit_code == 0, result.output
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert vocab["tokens"][:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert {"circle", "red", "left"} <= set(vocab["tokens"])
    record = json.loads((tmp_path / "vocab.provenance.json").read_text())
    assert record["config"]["preset"] == "toy" and record["params"] == {"min_count": 1}
    assert runner.invoke(prep, ["status", *args]).output.splitlines()[0].split()[:2] == ["vocab", "done"]
    assert "up to date" in runner.invoke(prep, ["vocab", *args]).output

    captions = toy / "annotations" / "captions_train2014.json"
    original = captions.read_bytes()
    try:
        data = json.loads(original)
        data["annotations"][0]["caption"] = "a zebra"
        captions.write_text(json.dumps(data))
        line = runner.invoke(prep, ["status", *args]).output.splitlines()[0]
        assert line.split()[:2] == ["vocab", "stale"] and "captions_train2014.json changed" in line
        assert "tokens" in runner.invoke(prep, ["vocab", *args]).output  # rebuilt, not skipped
    finally:
        captions.write_bytes(original)


def test_fatal_input_is_one_line_and_nonzero(tmp_path: Path, capsys):
    captions = tmp_path / "annotations" / "captions_train2014.json"
    captions.parent.mkdir()
    (tmp_path / "train2014").mkdir()
    captions.write_text("{not json")
    with pytest.raises(SystemExit) as info:
        prep_main(["vocab", "--artifacts", str(tmp_path / "a"), "--coco-root", str(tmp_path)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(captions) in err and err.count("\n") == 1
    assert not (tmp_path / "a" / "vocab.json").exists()


def test_every_entry_point_has_help():
    """cpgan-train, cpgan-eval (and its fit-classifier) and cpgan-sample are all real now."""
    from cpgan.cli.evaluate import main as eval_main
    from cpgan.cli.sample import main as sample_main

    runner = CliRunner()
    for main, args, expected in ((train_main, [], "--stage"), (eval_main, [], "--checkpoint"),
                                 (eval_main, ["fit-classifier"], "--epochs"),
                                 (sample_main, [], "--seed")):
        result = runner.invoke(main.__wrapped__, [*args, "--help"])  # the Click command
        assert result.exit_code == 0 and expected in result.output, (args, result.output)


def test_config_paths_are_the_same_from_any_folder(tmp_path: Path, monkeypatch):
    """Provenance stores the detector cfg path: running from the project root or from
    elsewhere must give the same path, or every stage looks stale to the other."""
    from cpgan.cli.common import PROJECT_ROOT, RunContext
    from cpgan.config import load_config

    run = RunContext(tmp_path, load_config("toy", None, {}), None)
    monkeypatch.chdir(PROJECT_ROOT)
    here = run.project_path("configs/darknet/yolov3-toy.cfg")
    monkeypatch.chdir(tmp_path)
    elsewhere = run.project_path("configs/darknet/yolov3-toy.cfg")
    assert here == elsewhere and here.is_absolute() and here.is_file()


@pytest.mark.parametrize("entry, args, named, words", [
    (prep_main, ["attend"], "artifacts/models/captioner.pt", "captioner not found"),
    (prep_main, ["show-memory", "circle"], "artifacts/memory.h5", "no readable memory bank"),
    (train_main, ["--stage", "gan"], "artifacts/vocab.json", "vocabulary not found"),
    (train_main, ["--stage", "gan", "--memory", "{tmp}/elsewhere.h5"], "elsewhere.h5",
     "memory bank not found"),
    (train_main, ["--stage", "gan", "--no-memory", "--detector-weights", "{tmp}/det.pt"],
     "det.pt", "detector weights not found"),
])
def test_a_missing_input_stops_the_command_before_any_work(tmp_path: Path, capsys, entry, args,
                                                           named, words):
    """Each stage names the input it lacks in one line and exits 1, writing nothing."""
    artifacts, coco = tmp_path / "artifacts", tmp_path / "coco"
    coco.mkdir()
    artifacts.mkdir()
    if entry is train_main and "vocab" not in words:
        (artifacts / "vocab.json").write_text("{}")
    with pytest.raises(SystemExit) as info:
        entry([*(a.format(tmp=tmp_path) for a in args), "--artifacts", str(artifacts),
               "--coco-root", str(coco)])
    err = capsys.readouterr().err
    assert info.value.code == 1, err
    assert err.startswith(f"error: {tmp_path / named}: ") and words in err, err
    assert err.count("\n") == 1
    assert sorted(p.name for p in artifacts.rglob("*")) == (
        ["vocab.json"] if entry is train_main and "vocab" not in words else [])
