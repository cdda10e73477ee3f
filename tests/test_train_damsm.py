"""DAMSM pretraining of MATE + OAIE, the encoder file and ``cpgan-train`` on a tiny toy set."""
import copy
import json
from pathlib import Path

import pytest
import torch
from tqdm import tqdm
from click.testing import CliRunner

from cpgan.cli.train import cli as train_cli
from cpgan.cli.train import main as train_main
from cpgan.config import load_config
from cpgan.errors import CpganError
from cpgan.model.darknet import Darknet, write_weights
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.toy import generate_toy_coco
from cpgan.trainer import damsm
from cpgan.trainer.averaging import WeightAverage
from cpgan.trainer.data import TextImageDataset, collate

from builders import (CFG, random_detector, random_memory, toy_vocabulary, write_classifier_file,
                      write_memory_file)

MEMORY_DIM = 8
TINY = """
[encoder]
word_embed_dim = 8
text_dim = 8
image_size = 64
backbone_width = 4
batch_size = 8
epochs = 1
lr = 0.003
swapped_negatives = 1  # as the toy preset: resume covers its draws
# adversarial_epsilon: the toy preset's, so that resume covers the views' random starts
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("damsm")
    coco = generate_toy_coco(root / "coco", train_images=16, val_images=8, image_size=64,
                             seed=2, progress=False)
    vocab = toy_vocabulary(coco, save_to=root / "vocab.json")
    detector = random_detector(seed=0)
    write_weights(detector, root / "random.weights")
    memory = random_memory(len(vocab), MEMORY_DIM)  # global RNG, right after the detector
    (root / "tiny.toml").write_text(TINY)
    config = load_config("toy", root / "tiny.toml")
    classifier = write_classifier_file(root / "classifier.pt", width=config.encoder.backbone_width)
    return {"root": root, "coco": coco, "vocab": vocab, "detector": detector,
            "memory": memory, "config": config, "classifier": classifier}


def _train(setup, out: Path, epochs: int, resume: bool = False, **kw):
    setup["config"].encoder.epochs = epochs
    return damsm.train_damsm(setup["coco"], out, setup["config"], setup["vocab"],
                             kw.pop("memory", setup["memory"]), kw.pop("detector", setup["detector"]),
                             classifier_weights=kw.pop("classifier", setup["classifier"]),
                             resume=resume, progress=False, threads=1, **kw)


@pytest.fixture(scope="module")
def straight(setup) -> damsm.DamsmRun:
    return _train(setup, setup["root"] / "straight", epochs=2)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_steps_lower_the_damsm_loss(setup):
    config = setup["config"]
    dataset = TextImageDataset(CocoSplit.open(setup["coco"], "train2014"), setup["vocab"],
                               config.data.max_caption_words, [64], augment=False)
    batch = collate([dataset[i] for i in range(8)])
    regions = damsm.region_settings(setup["detector"], config.detector)
    text = damsm.build_text_encoder(len(setup["vocab"]), config.encoder, setup["memory"])
    image = damsm.build_image_encoder(config.encoder,
                                      damsm.build_region_extractor(setup["detector"], regions))
    optimizer = torch.optim.Adam([p for p in [*text.parameters(), *image.parameters()]
                                  if p.requires_grad], lr=3e-3, betas=damsm.ADAM_BETAS)
    state = damsm.TrainState(text, image, optimizer)

    def loss() -> float:  # train mode (batch statistics), the same dropout draws each time
        torch.manual_seed(0)
        text.train(), image.train()
        with torch.no_grad():
            return damsm._loss(text, image, batch, config.encoder)[0].item()

    before = loss()
    detector_before = damsm.module_digest(setup["detector"])

    with tqdm(disable=True) as bar:
        damsm._train_epoch(state, [batch] * 10, config.encoder, "cpu", bar)
    assert loss() < 0.8 * before
    assert damsm.module_digest(setup["detector"]) == detector_before  # V_o's detector is frozen


def test_two_epochs_straight_equal_one_plus_resume_plus_one(setup, straight):
    resumed_dir = setup["root"] / "resumed"
    first = _train(setup, resumed_dir, epochs=1)
    assert first.epochs == 1 and len(first.history) == 1
    second = _train(setup, resumed_dir, epochs=2, resume=True)
    assert [h["epoch"] for h in second.history] == [1.0, 2.0]
    assert second.history == straight.history
    a, b = _load(straight.model), _load(second.model)
    for part in ("text_encoder", "image_encoder"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    ckpt_a = _load(damsm.checkpoint_path(straight.model.parent))
    ckpt_b = _load(damsm.checkpoint_path(second.model.parent))
    assert ckpt_a["epoch"] == ckpt_b["epoch"] == 2
    state_a, state_b = ckpt_a["optimizer"]["state"], ckpt_b["optimizer"]["state"]
    assert all(torch.equal(state_a[k]["exp_avg"], state_b[k]["exp_avg"]) for k in state_a)
    assert ckpt_a["average"]["updates"] == ckpt_b["average"]["updates"] == 4  # 2 x 16 / 8
    for part in ("text_encoder", "image_encoder"):
        average_a, average_b = ckpt_a["average"][part], ckpt_b["average"][part]
        assert all(torch.equal(average_a[k], average_b[k]) for k in average_a)


def test_the_published_encoders_are_the_weight_average(setup, straight):
    """The toy preset averages the weights: damsm.pt holds the average, not the last step's
    weights, which the checkpoint keeps beside it for resuming."""
    assert setup["config"].encoder.average_decay > 0
    published = _load(straight.model)
    checkpoint = _load(damsm.checkpoint_path(straight.model.parent))
    for part in ("text_encoder", "image_encoder"):
        average, live = checkpoint["average"][part], checkpoint[part]
        assert published[part].keys() == average.keys() == live.keys()
        assert all(torch.equal(published[part][k], average[k]) for k in average)
        floats = [k for k in live if live[k].dtype.is_floating_point]
        assert any(not torch.equal(average[k], live[k]) for k in floats)


def test_the_trainer_s_average_follows_only_what_training_changes(setup, tmp_path,
                                                                  monkeypatch):
    """The memory and the frozen detector are constant: the trainer's average skips them, and
    they stay exactly the live encoders' own."""
    made = []

    class Recording(WeightAverage):
        def __init__(self, model, *args, **kwargs):
            super().__init__(model, *args, **kwargs)
            made.append((self, model))

    monkeypatch.setattr(damsm, "WeightAverage", Recording)
    _train(setup, tmp_path / "recorded", epochs=1)
    (average, live), = made
    followed = set(average.follow)
    assert "text.memory" not in followed
    assert not any(k.startswith("image.detector.") for k in followed)
    assert {"image.project_global.weight", "image.backbone.top.0.weight"} <= followed
    assert any(k.startswith("text.") for k in followed)
    mine, theirs = average.model.state_dict(), live.state_dict()
    frozen = [k for k in theirs if k not in followed]
    assert frozen and all(torch.equal(mine[k], theirs[k]) for k in frozen)
    assert any(not torch.equal(mine[k], theirs[k]) for k in followed
               if mine[k].is_floating_point())


def test_without_an_average_the_last_weights_are_published(setup, tmp_path):
    config = copy.deepcopy(setup["config"])
    config.encoder.epochs, config.encoder.average_decay = 1, 0.0
    run = damsm.train_damsm(setup["coco"], tmp_path, config, setup["vocab"], setup["memory"],
                            setup["detector"], classifier_weights=setup["classifier"],
                            progress=False, threads=1)
    published, checkpoint = _load(run.model), _load(damsm.checkpoint_path(tmp_path))
    assert checkpoint["average"] is None
    for part in ("text_encoder", "image_encoder"):
        assert all(torch.equal(published[part][k], checkpoint[part][k]) for k in checkpoint[part])
    config.encoder.average_decay = 1.0
    with pytest.raises(CpganError, match="average_decay"):
        damsm.train_damsm(setup["coco"], tmp_path / "bad", config, setup["vocab"],
                          setup["memory"], setup["detector"],
                          classifier_weights=setup["classifier"], progress=False, threads=1)


def test_encoder_file_is_plain_and_records_what_it_needs(setup, straight):
    data = _load(straight.model)
    assert straight.model.name == "damsm.pt"
    assert "memory" not in data["text_encoder"]                  # lives in memory.h5
    assert not any(k.startswith("detector.") for k in data["image_encoder"])
    assert any(k.startswith("backbone.") for k in data["image_encoder"])  # fine-tuned: saved
    record = data["config"]
    assert record["backbone"] == "classifier" and record["sentence_pooling"] == "max"
    assert record["use_memory"] and record["use_objects"] and record["text_dim"] == 8
    assert record["regions"]["roi_bins"] == 2 and record["memory_shape"] == [len(setup["vocab"]),
                                                                             MEMORY_DIM]
    metrics = data["metrics"]
    assert 0 <= metrics["r_precision"] <= 1 and metrics["candidates"] == 8
    assert metrics["val_images"] == 8


def test_load_pretrained_encoders_round_trip_and_refusals(setup, straight, tmp_path):
    memory_file = tmp_path / "memory.h5"
    write_memory_file(memory_file, setup["vocab"], setup["memory"])
    text, image = damsm.load_pretrained_encoders(straight.model, setup["vocab"], setup["config"],
                                                 memory_file, setup["detector"])
    assert not text.training and not image.training
    assert not any(p.requires_grad for p in [*text.parameters(), *image.parameters()])
    stored = _load(straight.model)["text_encoder"]
    assert torch.equal(text.lstm.weight_hh_l0, stored["lstm.weight_hh_l0"])
    assert torch.equal(text.memory, setup["memory"])

    other = load_config("toy", setup["root"] / "tiny.toml")
    other.encoder.text_dim = 16
    with pytest.raises(CpganError) as info:
        damsm.load_pretrained_encoders(straight.model, setup["vocab"], other, memory_file,
                                       setup["detector"])
    message = str(info.value)
    assert "\n" not in message and str(straight.model) in message and "text_dim" in message

    shifted = tmp_path / "other-memory.h5"
    write_memory_file(shifted, setup["vocab"], setup["memory"] * 2)
    with pytest.raises(CpganError, match="another memory bank"):
        damsm.load_pretrained_encoders(straight.model, setup["vocab"], setup["config"], shifted,
                                       setup["detector"])
    torch.manual_seed(1)
    retrained = Darknet.from_cfg_file(CFG)
    with pytest.raises(CpganError, match="another detector"):
        damsm.load_pretrained_encoders(straight.model, setup["vocab"], setup["config"],
                                       memory_file, retrained)


def test_the_classifier_backbone_starts_from_the_fitted_classifier(setup, tmp_path):
    """With no epoch to train, the saved backbone is exactly the classifier's trunk; a missing
    classifier or one of another width is a one-line error naming what to do or the file."""
    run = _train(setup, tmp_path / "start", epochs=0)
    saved = _load(run.model)["image_encoder"]
    trunk = _load(setup["classifier"])["state_dict"]
    for key, value in trunk.items():
        if key.startswith(("body.", "top.")):
            assert torch.equal(saved[f"backbone.{key}"], value), key
    assert not any(k.startswith("backbone.") and k[9:] not in trunk for k in saved)

    with pytest.raises(CpganError, match="fit-classifier") as info:
        _train(setup, tmp_path / "none", epochs=0, classifier=None)
    assert "\n" not in str(info.value)
    wide = write_classifier_file(tmp_path / "wide.pt", width=8)
    with pytest.raises(CpganError) as info:
        _train(setup, tmp_path / "wide", epochs=0, classifier=wide)
    assert str(wide) in str(info.value) and "backbone_width" in str(info.value)


def test_learning_rate_decays_per_epoch_until_below_a_tenth():
    """AttnGAN's rule: multiply while the rate is above a tenth of the initial one."""
    rates = [damsm.epoch_lr(2e-3, epoch, 0.5) for epoch in range(7)]
    assert rates == pytest.approx([2e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4, 1.25e-4, 1.25e-4])
    assert damsm.epoch_lr(1.0, 1) == pytest.approx(0.98)
    assert damsm.epoch_lr(1.0, 500) == pytest.approx(0.98 ** 114)  # first below 0.1
    assert damsm.epoch_lr(1e-3, 9, 1.0) == 1e-3


def test_a_checkpoint_from_before_a_key_resumes_while_the_key_is_at_its_default(tmp_path):
    """--resume across an upgrade that added an encoder key: accepted while the key is at
    its default, refused once it is not (the tiny config's swapped_negatives = 1)."""
    settings = {"model": {"vocab_size": 3}, "encoder": {"gamma1": 4.0, "swapped_negatives": 1},
                "seed": 0}
    path = tmp_path / "damsm.ckpt.pt"
    torch.save({"settings": {**settings, "encoder": {"swapped_negatives": 1}}, "epoch": 1},
               path)
    assert damsm._load_checkpoint(path, settings, 2)["epoch"] == 1
    torch.save({"settings": {**settings, "encoder": {"gamma1": 4.0}}, "epoch": 1}, path)
    with pytest.raises(CpganError, match="other settings"):
        damsm._load_checkpoint(path, settings, 2)
    for epoch, refusal in (("1", "no epoch count"), (-1, "no epoch count"), (3, "beyond the 2")):
        torch.save({"settings": settings, "epoch": epoch}, path)
        with pytest.raises(CpganError, match=refusal):
            damsm._load_checkpoint(path, settings, 2)


def test_a_file_of_another_sentence_pooling_is_refused(setup, straight, tmp_path):
    memory_file = tmp_path / "memory.h5"
    write_memory_file(memory_file, setup["vocab"], setup["memory"])
    other = load_config("toy", setup["root"] / "tiny.toml")
    other.encoder.sentence_pooling = "last"
    with pytest.raises(CpganError) as info:
        damsm.load_pretrained_encoders(straight.model, setup["vocab"], other, memory_file,
                                       setup["detector"])
    assert "sentence_pooling" in str(info.value) and str(straight.model) in str(info.value)
    older = tmp_path / "older" / "damsm.pt"   # written before files recorded the pooling
    older.parent.mkdir()
    data = _load(straight.model)
    del data["config"]["sentence_pooling"]
    torch.save(data, older)
    text, _ = damsm.load_pretrained_encoders(older, setup["vocab"], other, memory_file,
                                             setup["detector"])
    assert text.sentence == "last"


class _Payload:
    """Unpickling this would create a marker file: weights_only must refuse it first."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_object_is_refused_never_run(setup, tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "damsm.pt"
    torch.save({"format": 1, "config": _Payload(str(marker))}, evil)
    with pytest.raises(CpganError) as info:
        damsm.load_pretrained_encoders(evil, setup["vocab"])
    assert not marker.exists()
    assert str(evil) in str(info.value) and "\n" not in str(info.value)
    tensors_only = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, tensors_only)
    with pytest.raises(CpganError, match="not a DAMSM encoder file"):
        damsm.load_pretrained_encoders(tensors_only, setup["vocab"])


def test_cli_help_names_every_damsm_option():
    result = CliRunner().invoke(train_cli, ["--help"])
    assert result.exit_code == 0
    for option in ("--stage", "--memory", "--no-memory", "--no-oaie", "--resume",
                   "--inception-weights", "--detector-weights", "--limit"):
        assert option in result.output


def _exit_code(args: list[str]) -> int:
    try:
        train_main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_cli_trains_the_ablation_beside_then_skips_and_reports(setup, tmp_path, capsys):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "models").mkdir()
    (artifacts / "models" / "classifier.pt").write_bytes(setup["classifier"].read_bytes())
    (artifacts / "vocab.json").write_bytes((setup["root"] / "vocab.json").read_bytes())
    args = ["--artifacts", str(artifacts), "--coco-root", str(setup["coco"]), "--config",
            str(setup["root"] / "tiny.toml"), "--no-memory", "--detector-weights",
            str(setup["root"] / "random.weights")]
    assert _exit_code(["--stage", "damsm", *args]) == 0
    out = capsys.readouterr().out
    assert "damsm [damsm-no-memory]" in out and "R-precision" in out
    assert (artifacts / "models" / "damsm-no-memory.pt").is_file()
    assert (artifacts / "models" / "damsm-no-memory.provenance.json").is_file()
    assert not (artifacts / "models" / "damsm.pt").exists()
    assert _exit_code(["--stage", "damsm", *args]) == 0  # up to date: not retrained
    captured = capsys.readouterr()
    assert "up to date" in captured.out and "R-precision" in captured.out
    _check_variant_rows(artifacts / "models")
    # written before a key existed: done while the key is at its default (gamma1 4.0), and
    # retrained when it is not (the tiny config turns swapped_negatives on, default 0)
    record_file = artifacts / "models" / "damsm-no-memory.provenance.json"
    record = json.loads(record_file.read_text())
    del record["params"]["encoder"]["gamma1"]
    record_file.write_text(json.dumps(record))
    assert _exit_code(["--stage", "damsm", *args]) == 0
    assert "up to date" in capsys.readouterr().out
    del record["params"]["encoder"]["swapped_negatives"]
    record_file.write_text(json.dumps(record))
    assert _exit_code(["--stage", "damsm", *args]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert _exit_code(["--stage", "damsm", *args[:6], "--memory", str(tmp_path / "missing.h5")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.h5" in err and err.count("\n") == 1
    (artifacts / "models" / "classifier.pt").unlink()
    assert _exit_code(["--stage", "damsm", *args]) == 1
    err = capsys.readouterr().err
    assert "classifier.pt" in err and "fit-classifier" in err and err.count("\n") == 1


def _check_variant_rows(models: Path) -> None:
    """The report's encoder table reads the trained file's metrics and, while the record
    still describes the file, the per-epoch R-precision of its provenance record."""
    [row] = damsm.pretrained_variants(models)
    model = models / "damsm-no-memory.pt"
    stored = _load(model)["metrics"]
    record = json.loads((models / "damsm-no-memory.provenance.json").read_text())
    assert row["model"] == "models/damsm-no-memory.pt" and row["memory"] is False
    assert row["r_precision"] == {"mean": stored["r_precision"], "std": stored["r_precision_std"]}
    assert row["history"] == [h["r_precision"] for h in record["summary"]["history"]]
    assert len(row["history"]) == row["epochs"]
    saved = model.read_bytes()
    try:
        torch.save({**_load(model), "metrics": {**stored, "r_precision": 0.5}}, model)
        [changed] = damsm.pretrained_variants(models)
        assert changed["r_precision"]["mean"] == 0.5 and changed["history"] is None
        model.write_bytes(b"not a torch file")
        [broken] = damsm.pretrained_variants(models)
        assert "error" in broken and str(model) in broken["error"]
    finally:
        model.write_bytes(saved)


def test_several_captions_per_image_reach_the_loss(setup, tmp_path, monkeypatch):
    """``encoder.captions_per_image`` K: every training step scores K captions of each image,
    and evaluation keeps one caption per image (the order of the captions: the next test)."""
    seen = []
    real_loss = damsm.damsm_loss

    def recording(words, lengths, *args, captions_per_image=1, **kwargs):
        seen.append((words.shape[0], args[2].shape[0], captions_per_image))
        return real_loss(words, lengths, *args, captions_per_image=captions_per_image, **kwargs)

    monkeypatch.setattr(damsm, "damsm_loss", recording)
    monkeypatch.setattr(setup["config"].encoder, "captions_per_image", 3)
    monkeypatch.setattr(setup["config"].encoder, "adversarial_epsilon", 0.0)  # one loss a step
    run = _train(setup, tmp_path / "three", epochs=1)
    training = [s for s in seen if s[2] == 3]
    assert len(training) == 2  # 16 train images, batches of 8
    assert all(captions == 3 * images for captions, images, _ in training)
    assert all(k == 1 and captions == images for captions, images, k in seen if k != 3)
    assert run.history[0]["r_precision"] > 0


def test_other_captions_follow_the_batch_in_the_loss_s_layout(setup):
    config = setup["config"]
    dataset = TextImageDataset(CocoSplit.open(setup["coco"], "train2014"), setup["vocab"],
                               config.data.max_caption_words, [64], augment=True)
    batch = collate([dataset[i] for i in range(5)])
    captions, lengths = damsm.with_other_captions(batch, dataset, 3)
    assert captions.shape == (15, batch.captions.shape[1]) and lengths.shape == (15,)
    assert torch.equal(captions[:5], batch.captions) and torch.equal(lengths[:5], batch.lengths)
    for k in (1, 2):
        for i, (index, caption_id) in enumerate(zip(batch.indices, batch.caption_ids)):
            ids = captions[k * 5 + i, :lengths[k * 5 + i]].tolist()
            options = {cid: c for cid, c in dataset.captions[int(index)]}
            assert ids in [c for cid, c in options.items() if cid != int(caption_id)]
            assert captions[k * 5 + i, lengths[k * 5 + i]:].eq(0).all()  # <pad> after the words


def test_other_captions_of_a_mirrored_view_are_mirrored(setup):
    """With ``mirror_captions`` a flipped view's extra captions have left and right swapped,
    as its own caption has, so no positive in the loss is false of its view."""
    config, vocab = setup["config"], setup["vocab"]
    left, right = vocab.id("left"), vocab.id("right")
    dataset = TextImageDataset(CocoSplit.open(setup["coco"], "train2014"), vocab,
                               config.data.max_caption_words, [64], augment=True,
                               crop=False, mirror_captions=True)
    changed = 0
    for epoch in range(4):
        dataset.epoch = epoch
        batch = collate([dataset[i] for i in range(len(dataset))])
        captions, lengths = damsm.with_other_captions(batch, dataset, 2)
        for row, (index, caption_id, flipped) in enumerate(
                zip(batch.indices, batch.caption_ids, batch.flipped)):
            (as_written,) = dataset.other_captions(int(index), int(caption_id), 1)
            got = captions[len(batch) + row, :lengths[len(batch) + row]].tolist()
            mirrored = [{left: right, right: left}.get(w, w) for w in as_written]
            assert got == (mirrored if flipped else as_written)
            changed += got != as_written
    assert changed > 0


def test_swapped_negatives_reach_the_sentence_loss_in_training_only(setup, tmp_path,
                                                                    monkeypatch):
    """``encoder.swapped_negatives`` N: each training step scores N false captions per image,
    their sentence vectors from the text encoder being trained; evaluation scores none."""
    seen = []
    real_loss = damsm.damsm_loss

    def recording(words, lengths, sentence, regions, *args, negative_sentences=None, **kwargs):
        seen.append((regions.shape[0], None if negative_sentences is None
                     else (negative_sentences.shape[0], negative_sentences.requires_grad)))
        return real_loss(words, lengths, sentence, regions, *args,
                         negative_sentences=negative_sentences, **kwargs)

    monkeypatch.setattr(damsm, "damsm_loss", recording)
    monkeypatch.setattr(setup["config"].encoder, "swapped_negatives", 2)
    monkeypatch.setattr(setup["config"].encoder, "adversarial_epsilon", 0.0)  # one loss a step
    _train(setup, tmp_path / "negatives", epochs=1)
    training = [s for s in seen if s[1] is not None]
    assert len(training) == 2  # 16 train images, batches of 8
    assert all(rows == 2 * images and grad for images, (rows, grad) in training)
    assert len(seen) > len(training)  # the val batches, without negatives


def test_a_negative_count_of_swapped_negatives_is_refused(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(setup["config"].encoder, "swapped_negatives", -1)
    with pytest.raises(CpganError, match="swapped_negatives >= 0"):
        _train(setup, tmp_path / "bad", epochs=1)


def test_an_unknown_kind_of_swapped_words_is_refused_before_any_work(setup, tmp_path,
                                                                     monkeypatch):
    """Refused even with swapped_negatives 0 (the words are then never swapped), and before
    the trainer reads a single image: a typo must not wait for a run to need the swaps."""
    monkeypatch.setattr(setup["config"].encoder, "swapped_negatives", 0)
    monkeypatch.setattr(setup["config"].encoder, "swapped_words", "colours")
    monkeypatch.setattr(damsm, "_datasets", lambda *a, **k: pytest.fail("read the data"))
    with pytest.raises(CpganError, match="swapped_words must be one of all, object, colour"):
        _train(setup, tmp_path / "typo", epochs=1)
    assert not (tmp_path / "typo").exists() or not any((tmp_path / "typo").iterdir())


def test_adversarial_views_are_what_training_scores(setup, tmp_path, monkeypatch):
    """``encoder.adversarial_epsilon`` > 0: every training step scores the batch's images moved
    within epsilon by FGSM against that step's own loss, which rises; evaluation scores the
    images as they are."""
    scored, attacked, views_made = [], [], []
    measuring = []  # non-empty while this test itself scores images
    real_views = damsm.fgsm_views

    def recording(images, loss_of, epsilon):
        views = real_views(images, loss_of, epsilon)
        measuring.append(True)
        with torch.no_grad():
            attacked.append((loss_of(images).item(), loss_of(views).item(), epsilon))
        measuring.clear()
        views_made.append(views)
        return views

    real_image_loss = damsm._image_loss

    def scoring(image, images, *args):
        if not measuring:
            scored.append(images.detach().clone())
        return real_image_loss(image, images, *args)

    monkeypatch.setattr(damsm, "fgsm_views", recording)
    monkeypatch.setattr(damsm, "_image_loss", scoring)
    monkeypatch.setattr(setup["config"].encoder, "adversarial_epsilon", 0.2)
    run = _train(setup, tmp_path / "adversarial", epochs=1)
    assert len(attacked) == 2  # the 2 train batches (16 images by 8); no val batch
    assert all(eps == 0.2 and after > before for before, after, eps in attacked)
    # each view is what the step then trained on, after the attack's own calls
    assert sum(any(torch.equal(images, v) for v in views_made) for images in scored) == 2
    assert run.history[0]["r_precision"] > 0


def test_adversarial_training_changes_the_weights_and_is_recorded(setup, tmp_path,
                                                                   monkeypatch):
    """Epsilon 0 never builds a view (AttnGAN's clean training); another epsilon trains other
    weights and is a setting a resume must match."""
    def refuse(*args):
        raise AssertionError("fgsm_views called with adversarial_epsilon = 0")

    with monkeypatch.context() as patch:
        patch.setattr(damsm, "fgsm_views", refuse)
        patch.setattr(setup["config"].encoder, "adversarial_epsilon", 0.0)
        clean = _load(_train(setup, tmp_path / "clean", epochs=1).model)
    monkeypatch.setattr(setup["config"].encoder, "adversarial_epsilon", 0.1)
    moved = _load(_train(setup, tmp_path / "moved", epochs=1).model)
    key = next(k for k in clean["image_encoder"] if k.startswith("project_local"))
    assert not torch.equal(clean["image_encoder"][key], moved["image_encoder"][key])
    settings = _load(damsm.checkpoint_path(tmp_path / "moved"))["settings"]
    assert settings["encoder"]["adversarial_epsilon"] == 0.1  # a resume with another is refused


@pytest.mark.parametrize("epsilon", [-0.1, 1.0])
def test_an_adversarial_epsilon_outside_the_pixel_range_is_refused(setup, tmp_path, monkeypatch,
                                                                  epsilon):
    monkeypatch.setattr(setup["config"].encoder, "adversarial_epsilon", epsilon)
    with pytest.raises(CpganError, match="adversarial_epsilon < 1"):
        _train(setup, tmp_path / "bad", epochs=1)
