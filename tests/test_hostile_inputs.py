"""Bad input as a user meets it, through the real ``cpgan-prep`` entry point.

A fatal problem must end the command with exit status 1 and one ``error:`` line naming the file;
a per-item problem must be recorded with its reason while the rest is processed. Cases the
reader-level tests already cover are named where they would go here:

* tests/test_coco.py: every bad image kind read directly (missing, empty, text, truncated,
  corrupt PNG, zero size, huge PNG header, directory), 16-bit and CMYK decoding, escaping and
  symlinked file names, and every malformed annotation file read directly (missing, empty,
  not JSON, wrong types, duplicate image/caption ids, unknown image ids, bad instances).
* tests/test_detect.py: a truncated JPEG recorded by ``detect`` (test_corrupt_image_is_recorded_
  not_fatal) and a truncated Darknet weights file through ``detect``.
* tests/test_cli.py: a captions file that is not JSON through ``vocab``.
* tests/test_darknet.py: weights 1 or 4 bytes short or long and weights of another cfg.
* tests/test_memory.py: ``load_memory`` on a memory.h5 of another vocabulary, with NaNs, wrong
  shapes or dtypes; malformed attention parts through ``build_memory``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from cpgan.cli.prep import main as prep_main
from cpgan.errors import CpganError
from cpgan.pipeline import regions as store
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.memory import load_memory
from cpgan.pipeline.text import SPECIALS, Vocabulary, tokenize
from cpgan.pipeline.toy import generate_toy_coco
from cpgan.torch_file import load_torch_file

from builders import CFG, one_worker_cluster, run_prep, write_random_weights

MAX_WORDS = 8
TINY = (f"[data]\nmax_caption_words = {MAX_WORDS}\n[detector]\nshard_size = 6\n"
        "train_epochs = 1\ntrain_batch_size = 4\n"
        "[attention]\nembed_dim = 16\nhidden_dim = 32\nattention_dim = 16\nepochs = 1\n")


# ----------------------------------------------------------------------------- hostile files


def _jpeg(height: int, width: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small, valid JPEG whose frame header says ``width`` x ``height``."""
    data = bytearray(_jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _jpeg_undefined_table() -> bytes:
    """A JPEG whose components use quantisation table 3, which it never defines."""
    data = bytearray(_jpeg(64, 64))
    sof = data.index(b"\xff\xc0")
    for component in range(data[sof + 9]):
        data[sof + 12 + 3 * component] = 3
    return bytes(data)


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG with a correct IHDR (CRC included) for ``width`` x ``height`` RGB pixels: what a
    decompression bomb announces. Only its first rows are present: a reader must refuse it
    from the header alone, before allocating the pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                               0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _cmyk_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def _png16() -> bytes:
    return cv2.imencode(".png", np.full((64, 64, 3), 40000, np.uint16))[1].tobytes()


# image id -> (file name, bytes or None for no file, annotated width x height, expected status)
IMAGES: dict[int, tuple[str, Callable[[], bytes | None], tuple[int, int] | None, str]] = {
    1: ("cmyk.jpg", _cmyk_jpeg, None, "ok"),
    2: ("sixteen-bit-png.jpg", _png16, None, "ok"),
    3: ("one-pixel.jpg", lambda: _jpeg(1, 1), (1, 1), "ok"),
    4: ("huge-header.jpg", lambda: _jpeg_claiming(20000, 20000), (20000, 20000),
        "too large: 20000x20000"),
    5: ("bomb.png", lambda: _png_bomb(20000, 20000), (20000, 20000), "too large: 20000x20000"),
    6: ("undefined-table.jpg", _jpeg_undefined_table, None, "corrupt image data"),
    7: ("empty.jpg", lambda: b"", None, "empty file"),
    8: ("text.jpg", lambda: b"this is not an image\n" * 20, None, "not an image"),
    9: ("missing.jpg", lambda: None, None, "missing file"),
    10: ("../outside.jpg", lambda: None, None, "escapes the image folder"),
    11: ("<absolute>", lambda: None, None, "escapes the image folder"),
    12: ("wrong-size.jpg", lambda: _jpeg(32, 48), None, "image is 48x32 but the annotation says"),
    15: ("nul\0.jpg", lambda: None, None, "file name contains a NUL character"),
    16: ("x" * 300 + ".jpg", lambda: None, None, "File name too long"),
}
UNCAPTIONED = 13
HOSTILE_CAPTIONS = 14
CAPTIONS = ["", "!!! ... ??? ---", "ein Bär über dem Fluß, 猫 und café",
            "<pad> <unk> <eos> <bos> a red circle",
            " ".join(["a big blue square"] * 2000)]
TRAIN_IMAGES = 20


def _edit_annotations(coco: Path, change: Callable[[dict, str], None]) -> None:
    """Apply ``change(data, kind)`` to the train captions and instances files alike."""
    for kind in ("captions", "instances"):
        path = coco / "annotations" / f"{kind}_train2014.json"
        data = json.loads(path.read_text())
        change(data, kind)
        path.write_text(json.dumps(data))


def _make_hostile(coco: Path) -> None:
    """Put every IMAGES case in place, drop one image's captions, make another's hostile."""
    folder = coco / "train2014"
    (coco / "outside.jpg").write_bytes(_jpeg(64, 64))  # readable, but not in the folder
    names = {}
    for image_id, (name, make, size, _) in IMAGES.items():
        old = folder / f"COCO_train2014_{image_id:012d}.jpg"
        old.unlink()
        name = str((coco / "outside.jpg").resolve()) if name == "<absolute>" else name
        data = make()
        if data is not None:
            (folder / name).write_bytes(data)
        names[image_id] = (name, size)

    def change(data: dict, kind: str) -> None:
        for image in data["images"]:
            if image["id"] in names:
                name, size = names[image["id"]]
                image["file_name"] = name
                if size:
                    image["width"], image["height"] = size
        if kind == "captions":
            data["annotations"] = [a for a in data["annotations"]
                                   if a["image_id"] != UNCAPTIONED]
            hostile = [a for a in data["annotations"] if a["image_id"] == HOSTILE_CAPTIONS]
            for annotation, text in zip(hostile, CAPTIONS):
                annotation["caption"] = text

    _edit_annotations(coco, change)


def _fails(args: list[str], capsys) -> str:
    """The one ``error:`` line of a command that must fail with status 1."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        prep_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with one_worker_cluster() as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, cluster) -> dict[str, Any]:
    """The whole prep chain over a toy set with every per-item problem at once."""
    root = tmp_path_factory.mktemp("hostile")
    coco = generate_toy_coco(root / "coco", train_images=TRAIN_IMAGES, val_images=2,
                             image_size=64, seed=11, progress=False)
    _make_hostile(coco)
    weights = write_random_weights(root / "random.weights", seed=0)
    (root / "tiny.toml").write_text(TINY)
    artifacts = root / "artifacts"
    common = ["--artifacts", str(artifacts), "--coco-root", str(coco),
              "--config", str(root / "tiny.toml")]
    cluster_args = ["--scheduler", cluster]
    for split in ("train2014", "val2014"):
        run_prep(["detect", *common, *cluster_args, "--weights", str(weights), "--split", split])
    for command in (["vocab"], ["train-attention"], ["attend", *cluster_args],
                    ["build-memory", "--topk", "2", *cluster_args]):
        run_prep([command[0], *common, *command[1:]])
    return {"root": root, "coco": coco, "artifacts": artifacts, "common": common,
            "weights": weights, "cluster": cluster}


# ----------------------------------------------------------------------------- per image


def _index(artifacts: Path) -> dict[int, dict]:
    table = pq.read_table(artifacts / "regions" / store.INDEX_NAME)
    table = table.filter(pc.equal(table["split"], "train2014"))
    return {row["image_id"]: row for row in table.to_pylist()}


@pytest.mark.parametrize("image_id", sorted(IMAGES))
def test_each_bad_image_is_recorded_with_its_reason(hostile, image_id):
    name, _, _, status = IMAGES[image_id]
    row = _index(hostile["artifacts"])[image_id]
    shard = hostile["artifacts"] / "regions" / store.shard_name("train2014", row["shard"])
    with store.RegionShard(shard) as regions:
        ids = regions.read("image_id").tolist()
        failures = {f["image_id"]: f["reason"] for f in regions.attrs["failures"]}
    if status == "ok":  # decoded, converted to 8-bit RGB and detected like any image
        assert row["status"] == "ok" and ids[row["row"]] == image_id
        assert image_id not in failures
    else:
        assert status in row["status"] and row["row"] == -1, row
        assert image_id not in ids and failures[image_id] == row["status"]


def test_the_good_images_are_all_processed(hostile):
    index = _index(hostile["artifacts"])
    assert sorted(index) == list(range(1, TRAIN_IMAGES + 1))  # every image accounted for
    good = [i for i in index if i not in IMAGES or IMAGES[i][3] == "ok"]
    assert all(index[i]["status"] == "ok" and index[i]["row"] >= 0 for i in good)
    attended = _attention(hostile["artifacts"])
    captioned = set(good) - {UNCAPTIONED}
    assert set(attended["image_id"].to_pylist()) == captioned
    record = json.loads((hostile["artifacts"] / "regions" / "train2014.provenance.json")
                        .read_text())
    failed = sum(IMAGES[i][3] != "ok" for i in IMAGES)
    assert record["summary"]["failed"] == failed and record["summary"]["images"] == TRAIN_IMAGES


def _attention(artifacts: Path) -> pa.Table:
    parts = sorted((artifacts / "attention").glob("train2014-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


# ----------------------------------------------------------------------------- per caption


def test_image_without_captions_is_detected_but_has_no_attention(hostile):
    assert _index(hostile["artifacts"])[UNCAPTIONED]["status"] == "ok"
    assert UNCAPTIONED not in _attention(hostile["artifacts"])["image_id"].to_pylist()


def test_hostile_captions_keep_exactly_their_tokens(hostile):
    """Empty and punctuation-only captions give no word; non-ASCII letters are dropped as
    AttnGAN does; the long one is cut at max_caption_words; written specials are plain words."""
    table = _attention(hostile["artifacts"])
    table = table.filter(pc.equal(table["image_id"], HOSTILE_CAPTIONS))
    vocab = Vocabulary.load(hostile["artifacts"] / "vocab.json")
    split = CocoSplit.open(hostile["coco"], "train2014")
    texts = dict(split.captions(HOSTILE_CAPTIONS))
    assert sorted(texts.values()) == sorted(CAPTIONS)
    for caption_id, text in texts.items():
        rows = table.filter(pc.equal(table["caption_id"], caption_id))
        expected = [vocab.id(t) for t in tokenize(text)[:MAX_WORDS]]
        assert rows["word_id"].to_pylist() == expected, text[:40]
        assert rows["position"].to_pylist() == list(range(len(expected)))
    lengths = {text[:10]: len(tokenize(text)[:MAX_WORDS]) for text in CAPTIONS}
    assert lengths["ein Bär üb"] == 7 and lengths[CAPTIONS[-1][:10]] == MAX_WORDS
    assert lengths[""] == 0 and lengths["!!! ... ??"] == 0
    specials = [t for t in vocab.tokens[len(SPECIALS):] if t in ("pad", "unk", "eos", "bos")]
    assert len(specials) == 4 and all(vocab.id(t) >= len(SPECIALS) for t in specials)


def test_memory_is_finite_despite_hostile_captions(hostile):
    bank = load_memory(hostile["artifacts"] / "memory.h5", hostile["artifacts"] / "vocab.json")
    assert torch.isfinite(bank.memory).all() and int((bank.support > 0).sum()) > 5


# ----------------------------------------------------------------------------- fatal inputs


def _dataset_copy(hostile, tmp_path: Path) -> Path:
    coco = tmp_path / "coco"
    shutil.copytree(hostile["coco"], coco)
    return coco


def _duplicate_image(path: Path) -> None:
    data = json.loads(path.read_text())
    data["images"].append(dict(data["images"][-1], file_name="another.jpg"))
    path.write_text(json.dumps(data))


def _edit_first_image(path: Path, **values: Any) -> None:
    data = json.loads(path.read_text())
    data["images"][0].update(values)
    path.write_text(json.dumps(data))


ANNOTATION_DEFECTS = {
    "missing": (lambda p: p.unlink(), "annotation file is missing"),
    "empty": (lambda p: p.write_bytes(b""), "annotation file is empty"),
    "latin-1": (lambda p: p.write_bytes('{"images": "caf\xe9"}'.encode("latin-1")),
                "not UTF-8 text"),
    "cut short": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "invalid JSON"),
    "duplicate image id": (_duplicate_image, "duplicate image id"),
    # ids are int64 and sides int32 in every artifact: refused before any work, not mid-stage
    "id beyond int64": (lambda p: _edit_first_image(p, id=2**63), "does not fit in 64 bits"),
    "width beyond int32": (lambda p: _edit_first_image(p, width=2**31),
                           "has a width or height above 2147483647"),
}


ANNOTATION_CASES = [
    (command, kind, defect)
    for command, kind in (("vocab", "captions"), ("detect", "captions"), ("detect", "instances"),
                          ("train-detector", "instances"))
    for defect in sorted(ANNOTATION_DEFECTS)
    if (command, kind, defect) != ("detect", "instances", "missing")  # optional for detect
]


@pytest.mark.parametrize("command, kind, defect", ANNOTATION_CASES)
def test_bad_annotation_file_stops_the_command(hostile, tmp_path, capsys, command, kind, defect):
    coco = _dataset_copy(hostile, tmp_path)
    path = coco / "annotations" / f"{kind}_train2014.json"
    damage, message = ANNOTATION_DEFECTS[defect]
    damage(path)
    extra = {"detect": ["--weights", str(hostile["weights"]), "--workers", "1"],
             "train-detector": ["--limit", "2"], "vocab": []}[command]
    artifacts = tmp_path / "artifacts"
    err = _fails([command, "--artifacts", str(artifacts), "--coco-root", str(coco),
                  "--config", str(hostile["root"] / "tiny.toml"), *extra], capsys)
    assert err.startswith(f"error: {path}: ") and message in err
    assert not (artifacts / "vocab.json").exists() and not (artifacts / "regions").exists()


@pytest.mark.parametrize("cut, words", [
    ("empty", "0 bytes is too short for a Darknet weights header"),
    ("header only", "found 20 bytes"),
    ("8 bytes too long", "found {size_plus_8} bytes"),
])
def test_darknet_weights_of_the_wrong_size_are_refused(hostile, tmp_path, capsys, cut, words):
    good = hostile["weights"].read_bytes()
    data = {"empty": b"", "header only": good[:20], "8 bytes too long": good + bytes(8)}[cut]
    bad = tmp_path / "bad.weights"
    bad.write_bytes(data)
    err = _fails(["detect", *hostile["common"][2:], "--artifacts", str(tmp_path / "a"),
                  "--weights", str(bad), "--workers", "1"], capsys)
    assert str(bad) in err and words.format(size_plus_8=len(good) + 8) in err
    assert not (tmp_path / "a" / "regions").exists()


def test_inspect_weights_says_mismatch_and_exits_1(hostile, tmp_path, capsys):
    bad = tmp_path / "long.weights"
    bad.write_bytes(hostile["weights"].read_bytes() + bytes(8))
    with pytest.raises(SystemExit) as info:
        prep_main(["inspect-weights", str(bad), "--cfg", str(CFG)])
    assert info.value.code == 1
    assert "verdict: MISMATCH" in capsys.readouterr().out


# ----------------------------------------------------------------------------- torch files


class _Reduce:
    """Unpickling this runs ``os.system('touch MARKER')``: harmless, and visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _hostile_torch_file(kind: str, marker: Path, path: Path) -> None:
    if kind == "reduce in a torch zip":
        torch.save({"state_dict": _Reduce(marker), "epoch": 1}, path)
    elif kind == "reduce in a bare pickle":
        path.write_bytes(pickle.dumps({"state_dict": _Reduce(marker)}, protocol=2))
    else:  # a whole module object instead of its state dict
        torch.save(torch.nn.Linear(2, 2), path)


TORCH_KINDS = ["reduce in a torch zip", "reduce in a bare pickle", "module object"]


def test_the_reduce_payload_is_live(tmp_path):
    """Control: without weights_only the payloads do run, so the refusals below mean something."""
    for kind in TORCH_KINDS[:2]:
        marker = tmp_path / kind.replace(" ", "-")
        path = tmp_path / "payload.pt"
        _hostile_torch_file(kind, marker, path)
        if kind == "reduce in a bare pickle":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_load_torch_file_refuses_in_one_line_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "executed"
    path = tmp_path / "payload.pt"
    _hostile_torch_file(kind, marker, path)
    with pytest.raises(CpganError) as info:
        load_torch_file(path, "GAN checkpoint")
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable GAN checkpoint (") and "\n" not in message
    assert not marker.exists()


def test_load_torch_file_reads_tensors_and_names_a_missing_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 2}, path)
    data = load_torch_file(path, "detector checkpoint")
    assert data["epoch"] == 2 and torch.equal(data["state_dict"]["w"], torch.arange(3.0))
    with pytest.raises(CpganError, match=r"absent\.pt: captioner file not found \(run 'x'\)$"):
        load_torch_file(tmp_path / "absent.pt", "captioner file", "run 'x'")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CpganError, match="truncated.pt: not a readable detector checkpoint"):
        load_torch_file(truncated, "detector checkpoint")


def _artifacts_with(hostile, tmp_path: Path, target: str, payload: Path) -> Path:
    """A fresh artifacts folder sharing the hostile run's vocabulary and regions, with
    ``target`` replaced by the payload."""
    artifacts = tmp_path / "artifacts"
    (artifacts / "models").mkdir(parents=True)
    shutil.copytree(hostile["artifacts"] / "regions", artifacts / "regions")
    shutil.copy(hostile["artifacts"] / "vocab.json", artifacts / "vocab.json")
    shutil.copy(payload, artifacts / target)
    return artifacts


@pytest.mark.parametrize("kind", TORCH_KINDS)
@pytest.mark.parametrize("consumer", ["detect --weights", "attend", "train-attention --resume",
                                      "train-detector --resume"])
def test_a_torch_file_that_is_not_a_plain_state_dict_is_refused_unexecuted(
        hostile, tmp_path, capsys, kind, consumer):
    marker = tmp_path / "executed"
    payload = tmp_path / "payload.pt"
    _hostile_torch_file(kind, marker, payload)
    target = {"detect --weights": "models/detector.pt", "attend": "models/captioner.pt",
              "train-attention --resume": "models/captioner.ckpt.pt",
              "train-detector --resume": "models/detector.ckpt.pt"}[consumer]
    artifacts = _artifacts_with(hostile, tmp_path, target, payload)
    common = ["--artifacts", str(artifacts), *hostile["common"][2:]]
    args = {"detect --weights": ["detect", *common, "--weights", str(artifacts / target),
                                 "--workers", "1"],
            "attend": ["attend", *common, "--workers", "1"],
            "train-attention --resume": ["train-attention", *common, "--resume"],
            "train-detector --resume": ["train-detector", *common, "--resume", "--limit", "2"],
            }[consumer]
    err = _fails(args, capsys)
    assert str(artifacts / target) in err
    assert not marker.exists()


# ----------------------------------------------------------------------------- memory.h5


def _damage_memory(artifacts: Path, damage: str) -> None:
    path = artifacts / "memory.h5"
    if damage == "another vocabulary":
        vocab = Vocabulary.load(artifacts / "vocab.json")
        tokens = list(vocab.tokens)
        tokens[-1] = tokens[-1] + "s"
        Vocabulary(tuple(tokens), vocab.counts, vocab.min_count).save(artifacts / "vocab.json")
        return
    with h5py.File(path, "r+") as f:
        if damage == "nan":
            row = int(np.flatnonzero(f["support"][:] > 0)[0])
            f["memory"][row, 0] = np.nan
        elif damage == "float64":
            data = f["memory"][:].astype(np.float64)
            del f["memory"]
            f["memory"] = data
        elif damage == "wrong shape":
            data = f["memory"][:, :-1]
            del f["memory"]
            f["memory"] = data
        elif damage == "no support":
            del f["support"]


MEMORY_DAMAGE = {
    "nan": "non-finite values",
    "float64": "'memory' is float64, expected float32",
    "wrong shape": "attribute feature_dim is 256 but 'memory' is 255-d",
    "another vocabulary": "built for another vocabulary",
    "no support": "dataset 'support' is missing",
}


def _artifacts_copy(hostile, tmp_path: Path) -> Path:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(hostile["artifacts"], artifacts, ignore=shutil.ignore_patterns("models"))
    return artifacts


@pytest.mark.parametrize("damage", sorted(MEMORY_DAMAGE))
def test_show_memory_refuses_a_damaged_memory_bank(hostile, tmp_path, capsys, damage):
    artifacts = _artifacts_copy(hostile, tmp_path)
    _damage_memory(artifacts, damage)
    err = _fails(["show-memory", "circle", "--artifacts", str(artifacts),
                  *hostile["common"][2:], "--out", str(tmp_path / "m.png")], capsys)
    assert str(artifacts / "memory.h5") in err and MEMORY_DAMAGE[damage] in err
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("damage", ["nan", "float64", "wrong shape", "no support"])
def test_build_memory_rebuilds_a_damaged_memory_bank_instead_of_reusing_it(
        hostile, tmp_path, capsys, damage):
    """Its recorded inputs still match, but the file itself is not a memory bank any more."""
    artifacts = _artifacts_copy(hostile, tmp_path)
    _damage_memory(artifacts, damage)
    capsys.readouterr()
    run_prep(["build-memory", "--topk", "2", "--artifacts", str(artifacts), *hostile["common"][2:],
          "--scheduler", hostile["cluster"]])
    assert "reused" not in capsys.readouterr().out
    rebuilt = load_memory(artifacts / "memory.h5", artifacts / "vocab.json")
    original = load_memory(hostile["artifacts"] / "memory.h5", artifacts / "vocab.json")
    assert torch.equal(rebuilt.memory, original.memory)
