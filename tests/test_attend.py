"""attend: per-word salient regions in Parquet, resume after a kill, grounding, the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from cpgan.cli.attention import attend_command, show_attention, train_attention
from cpgan.config import AttentionConfig
from cpgan.model.butd import BOS_ID, EOS_ID, region_mask_from_counts
from cpgan.pipeline import regions as store
from cpgan.pipeline.attend import SCHEMA, AttendSettings, attend, grounding_path, part_metadata
from cpgan.pipeline.categories import category_words
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import UNK_ID, build_vocabulary, tokenize
from cpgan.pipeline.toy import generate_toy_coco
from cpgan.trainer.captioner import MODEL_NAME, load_captioner, train_captioner
from test_train_captioner import write_regions

MAX_WORDS = 12
FAILED, EMPTY = 3, 12
CONFIG = AttentionConfig(embed_dim=16, hidden_dim=32, attention_dim=16, dropout=0.2,
                         epochs=2, batch_size=8, lr=1e-2, grad_clip=1.0)


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=40) as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny toy set, its regions (one failed and one empty image), a vocabulary with
    <unk> words (min count 3) and a captioner trained for two epochs."""
    root = tmp_path_factory.mktemp("attend")
    coco = generate_toy_coco(root / "coco", train_images=24, val_images=8, seed=7, progress=False)
    artifacts = root / "artifacts"
    write_regions(coco, artifacts / "regions", shard_size=8, failed={FAILED}, empty={EMPTY})
    train, val = CocoSplit.open(coco, "train2014"), CocoSplit.open(coco, "val2014")
    vocab = build_vocabulary((t for i in train.image_ids() for _, t in train.captions(i)), 3)
    vocab.save(artifacts / "vocab.json")
    train_captioner(artifacts / "regions", artifacts / "models", train, val, vocab, CONFIG,
                    MAX_WORDS, progress=False)
    captioner = artifacts / "models" / MODEL_NAME
    settings = AttendSettings(str(captioner), "captioner-digest", "vocab-digest", MAX_WORDS,
                              batch_size=1)
    return {"root": root, "coco": coco, "artifacts": artifacts, "train": train, "vocab": vocab,
            "settings": settings, "captioner": captioner}


def _attend(setup: dict, out: Path, scheduler: str,
            limit: int | None = None) -> tuple[dict, list[Path], Path | None]:
    return attend(setup["train"], setup["vocab"], setup["settings"],
                  setup["artifacts"] / "regions", out, limit=limit, workers=1,
                  scheduler=scheduler, progress=False)


@pytest.fixture(scope="module")
def reference(setup, cluster) -> dict:
    out = setup["root"] / "reference"
    summary, parts, report = _attend(setup, out, cluster)
    return {"out": out, "summary": summary, "parts": parts, "report": report}


def _table(parts: list[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in parts])


def test_parts_follow_the_shards_with_the_exact_schema(reference):
    assert [p.name for p in reference["parts"]] == [f"train2014-0000{i}.parquet" for i in range(3)]
    for part in reference["parts"]:
        schema = pq.read_schema(part)
        assert schema.remove_metadata().equals(SCHEMA)
        assert [str(schema.field(n).type) for n in schema.names] == [
            "int64", "int64", "int16", "int32", "int16", "float"]
        table = pq.read_table(part)
        keys = list(zip(*(table[c].to_pylist() for c in ("image_id", "caption_id", "position"))))
        assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_one_row_per_kept_caption_token_unk_included(setup, reference):
    split, vocab = setup["train"], setup["vocab"]
    expected = {}
    for image_id in split.image_ids():
        if image_id in (FAILED, EMPTY):
            continue
        for caption_id, text in split.captions(image_id):
            for position, token in enumerate(tokenize(text)[:MAX_WORDS]):
                expected[(image_id, caption_id, position)] = vocab.id(token)
    table = _table(reference["parts"])
    got = {(i, c, p): w for i, c, p, w in zip(*(table[n].to_pylist() for n in
                                                ("image_id", "caption_id", "position", "word_id")))}
    assert got == expected
    assert UNK_ID in got.values() and not {0, BOS_ID, EOS_ID} & set(got.values())


def test_failed_and_empty_images_are_skipped_and_counted(reference):
    summary = reference["summary"]
    assert summary["skipped_failed"] == 1 and summary["skipped_empty"] == 1
    assert summary["images"] == 22 and summary["captions"] == 110
    ids = set(_table(reference["parts"])["image_id"].to_pylist())
    assert FAILED not in ids and EMPTY not in ids and len(ids) == 22
    assert summary["rows"] == _table(reference["parts"]).num_rows


def test_attention_of_the_step_that_predicts_each_word(setup, reference):
    """Compare with the captioner run directly on one caption: word n is predicted by the step
    whose input is token n-1 of <bos> w_0 w_1 ..., i.e. attention[:, n]."""
    table = _table(reference["parts"])
    image_id, caption_id = 9, 92
    rows = table.filter(pa.compute.and_(pa.compute.equal(table["image_id"], image_id),
                                        pa.compute.equal(table["caption_id"], caption_id)))
    text = dict(setup["train"].captions(image_id))[caption_id]
    words = setup["vocab"].encode(text, MAX_WORDS)
    with store.RegionShard(setup["artifacts"] / "regions" / "train2014-00001.h5") as shard:
        row = shard.read("image_id").tolist().index(image_id)
        stored = shard.rows(slice(row, row + 1))
    count = int(stored.num_regions[0])
    posterior = np.zeros((1, stored.labels.shape[1], 8), np.float32)
    for slot in range(count):  # x_i = [v_i ; s_i e_(c_i)]
        posterior[0, slot, stored.labels[0, slot]] = stored.scores[0, slot]
    raw = torch.from_numpy(np.concatenate([stored.features.astype(np.float32), posterior], -1))
    record = torch.load(setup["captioner"], weights_only=True)
    features = (raw - record["input_mean"]) / record["input_std"]
    mask = region_mask_from_counts(torch.tensor([count]), features.shape[1])
    model, _, _ = load_captioner(setup["captioner"])
    with torch.no_grad():
        attention = model(features, mask, torch.tensor([[BOS_ID, *words, EOS_ID]])).attention[0]
    assert rows["position"].to_pylist() == list(range(len(words)))
    assert rows["word_id"].to_pylist() == words
    assert rows["region"].to_pylist() == attention[:len(words)].argmax(dim=1).tolist()
    np.testing.assert_allclose(rows["weight"].to_numpy(),
                               attention[:len(words)].max(dim=1).values.numpy(), rtol=1e-5)
    assert (attention[:, count:] == 0).all()


def test_regions_index_real_boxes_of_their_image(setup, reference):
    table = _table(reference["parts"])
    counts = {}
    for path in sorted((setup["artifacts"] / "regions").glob("train2014-*.h5")):
        with store.RegionShard(path) as shard:
            counts.update(zip(shard.read("image_id").tolist(), shard.read("num_regions").tolist()))
    regions = table["region"].to_numpy()
    limits = np.array([counts[i] for i in table["image_id"].to_pylist()])
    assert (regions >= 0).all() and (regions < limits).all()
    weights = table["weight"].to_numpy()
    assert (weights > 0).all() and (weights <= 1).all()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_grounding_report_recomputed_from_parquet_boxes_and_instances(setup, reference):
    report = json.loads(reference["report"].read_text())
    assert reference["report"] == grounding_path(reference["out"], "train2014")
    split, vocab = setup["train"], setup["vocab"]
    word_of = {vocab.id(w): (w, c) for w, c in category_words(split).items() if w in vocab.tokens}
    boxes = {}
    for path in sorted((setup["artifacts"] / "regions").glob("train2014-*.h5")):
        with store.RegionShard(path) as shard:
            boxes.update(zip(shard.read("image_id").tolist(), shard.read("boxes")))
    counts: dict[str, list[int]] = {}
    table = _table(reference["parts"])
    for image_id, word_id, region in zip(*(table[n].to_pylist() for n in
                                           ("image_id", "word_id", "region"))):
        if word_id not in word_of:
            continue
        word, category = word_of[word_id]
        truth = [np.array(a["bbox"]) for a in split.instances(image_id)
                 if a["category_id"] == category]
        hit = any(_iou(boxes[image_id][region], np.r_[t[:2], t[:2] + t[2:]]) >= 0.5 for t in truth)
        counts.setdefault(word, [0, 0])
        counts[word][0] += 1
        counts[word][1] += hit
    assert counts and sum(h for _, h in counts.values()) > 0
    assert {w: [v["occurrences"], v["hits"]] for w, v in report["words"].items()} == counts
    total = [sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())]
    assert [report["overall"]["occurrences"], report["overall"]["hits"]] == total
    assert report["overall"]["fraction"] == pytest.approx(total[1] / total[0], abs=1e-6)


def test_rerun_reuses_every_part(setup, reference, cluster):
    before = {p: p.stat().st_mtime_ns for p in reference["parts"]}
    summary, _, _ = _attend(setup, reference["out"], cluster)
    assert summary["reused_parts"] == 3
    assert {p: p.stat().st_mtime_ns for p in before} == before


_SUBPROCESS = """
import sys
from pathlib import Path
from cpgan.pipeline.attend import AttendSettings, attend
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import Vocabulary
captioner, artifacts, coco, out = sys.argv[1:]
settings = AttendSettings(captioner, "captioner-digest", "vocab-digest", {max_words}, batch_size=1)
attend(CocoSplit.open(Path(coco), "train2014"), Vocabulary.load(Path(artifacts) / "vocab.json"),
       settings, Path(artifacts) / "regions", Path(out), limit=None, workers=1, scheduler=None,
       progress=False)
"""


def test_killed_run_resumes_to_identical_parquet(setup, reference, cluster):
    out = setup["root"] / "killed"
    code = _SUBPROCESS.format(max_words=MAX_WORDS)
    command = [sys.executable, "-c", code, str(setup["captioner"]), str(setup["artifacts"]),
               str(setup["coco"]), str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = out / "train2014-00000.parquet"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the client and its dask workers
    proc.wait()
    finished = sorted(p.name for p in out.glob("*.parquet"))
    assert "train2014-00000.parquet" in finished and len(finished) < 3, finished
    kept = first.stat().st_mtime_ns
    summary, parts, _ = _attend(setup, out, cluster)
    assert summary["reused_parts"] == len(finished) and first.stat().st_mtime_ns == kept
    for ours, theirs in zip(parts, reference["parts"]):
        assert ours.read_bytes() == theirs.read_bytes(), ours.name
    assert not list(out.glob(".tmp-*"))


def test_changed_captioner_reruns_parts(setup, reference, cluster, tmp_path):
    out = tmp_path / "attention"
    _attend(setup, out, cluster, limit=7)
    changed = dict(setup, settings=AttendSettings(**{**vars(setup["settings"]),
                                                     "captioner_sha256": "other"}))
    summary, parts, _ = _attend(changed, out, cluster, limit=7)
    assert summary["reused_parts"] == 0 and len(parts) == 1
    assert part_metadata(parts[0])["provenance"]["captioner_sha256"] == "other"


def test_commands_write_records_skip_when_current_and_draw(setup, cluster, tmp_path):
    group = click.Group(commands=[train_attention, attend_command, show_attention])
    artifacts = tmp_path / "artifacts"
    (artifacts / "regions").mkdir(parents=True)
    for path in (setup["artifacts"] / "regions").iterdir():
        (artifacts / "regions" / path.name).symlink_to(path)
    (artifacts / "vocab.json").write_bytes((setup["artifacts"] / "vocab.json").read_bytes())
    config = tmp_path / "tiny.toml"
    config.write_text("[attention]\nembed_dim = 16\nhidden_dim = 32\nattention_dim = 16\n"
                      "epochs = 1\nbatch_size = 16\n")
    common = ["--artifacts", str(artifacts), "--coco-root", str(setup["coco"]),
              "--config", str(config)]
    runner = CliRunner()
    attend_args = ["attend", *common, "--scheduler", cluster]
    steps = [["train-attention", *common], ["train-attention", *common], attend_args, attend_args,
             ["show-attention", *common, "--image-id", "9", "--out", str(tmp_path / "a.png")]]
    outputs = []
    for args in steps:
        result = runner.invoke(group, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert "val image" in outputs[0] and "up to date" in outputs[1]
    assert "1 failed, 1 without regions" in outputs[2] and "grounding:" in outputs[2]
    assert "up to date" in outputs[3]
    assert (artifacts / "models" / "captioner.provenance.json").is_file()
    record = json.loads((artifacts / "attention" / "train2014.provenance.json").read_text())
    assert "attention/grounding.json" in record["outputs"]
    png = (tmp_path / "a.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    result = runner.invoke(group, ["show-attention", *common, "--image-id", str(FAILED),
                                   "--out", str(tmp_path / "b.png")])
    assert result.exit_code != 0 and "has no regions" in str(result.exception)
