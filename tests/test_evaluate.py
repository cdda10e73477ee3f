"""``cpgan-eval`` end to end on a tiny toy run: report.json, index.html, provenance, refusals.

The run is written by tests/test_sample.py's builders (contract checkpoint of untrained models,
tiny sizes) plus what evaluation needs beyond sampling: a random yolov3-toy detector saved as
``models/detector.pt`` (SOA and the encoders' V_o), a random toy scoring classifier, and a
training log. (The Inception Score of uniform predictions is 1: tests/test_is_fid_soa.py.)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cpgan.cli.evaluate import cli as eval_cli
from cpgan.cli.evaluate import main as eval_main
from cpgan.errors import CpganError
from cpgan.model.classifier import ToyClassifier
from cpgan.model.metrics import fid
from cpgan.pipeline import artifacts
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.toy import TOY_CATEGORIES, TOY_COLOURS
from cpgan.trainer import evaluate, sampling
from cpgan.trainer.classifier import load_classifier, save_classifier, score_images
from cpgan.trainer.data import TextImageDataset
from builders import CFG
from test_sample import Setup, make_setup

VAL_IMAGES = 12
METRIC_KEYS = {"inception_score", "fid", "r_precision", "r_precision_in_batch", "soa_c", "soa_i",
               "soa_no_object", "soa_unnamed"}


def _val_pairs(setup: Setup) -> TextImageDataset:
    """The evaluation's (image, caption) pairs, as trainer/data.py's eval dataset gives them."""
    return TextImageDataset(CocoSplit.open(setup.coco, "val2014"), setup.vocab,
                            setup.config.data.max_caption_words, [8, 16, 32], augment=False,
                            seed=setup.config.seed)


def _write_classifier(setup: Setup) -> Path:
    """A random toy classifier whose batch-norm statistics are those of real toy images, so
    its features vary with the image (with the initial statistics every image scores alike)."""
    torch.manual_seed(13)
    model = ToyClassifier(len(TOY_CATEGORIES), len(TOY_COLOURS), width=4, image_size=32)
    pairs = _val_pairs(setup)
    images = torch.stack([pairs[i].images[-1] for i in range(len(pairs))])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None                      # cumulative average over the batches
    with torch.no_grad():
        model.train()(torch.cat([images, images.flip(-1)]))
    path = setup.artifacts / "models" / "classifier.pt"
    save_classifier(path, model.eval())
    return path


def _train_generator(setup: Setup, steps: int = 30) -> None:
    """Fit the checkpoint's EMA generator to the val pairs' images for a few steps (L1 at
    every stage), so "generated" is a generator that learnt something and "untrained" is not."""
    from cpgan.trainer.data import collate

    data = torch.load(setup.checkpoint, weights_only=True)
    checkpoint = sampling.read_checkpoint(setup.checkpoint)
    generator = sampling.build_generator(checkpoint.config)
    generator.load_state_dict(checkpoint.generator_ema)
    text = sampling.load_text_encoder(setup.artifacts / checkpoint.encoders, setup.vocab,
                                      checkpoint.config, setup.artifacts / "memory.h5")
    pairs = _val_pairs(setup)
    batch = collate([pairs[i] for i in range(len(pairs))])
    encoded = sampling.encode_captions(text, batch.captions, batch.lengths)
    optimizer = torch.optim.Adam(generator.parameters(), lr=5e-3, betas=(0.5, 0.999))
    torch.manual_seed(0)
    generator.train()
    for _ in range(steps):
        z = torch.randn(len(pairs), checkpoint.config.gan.z_dim)
        out = generator(z, encoded.sentence, encoded.words, encoded.mask)
        loss = sum((fake - real).abs().mean() for fake, real in zip(out.images, batch.images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    data["generator_ema"] = {k: v.detach().clone() for k, v in generator.state_dict().items()}
    torch.save(data, setup.checkpoint)


def _write_log(setup: Setup) -> None:
    lines = [json.dumps({"step": s, "epoch": s // 10, "loss_d": 2.0 / s, "loss_g": 1.0 + s,
                         "loss_tiscl": 0.5, "loss_kl": 0.01}) for s in (10, 20, 30, 40)]
    (setup.checkpoint.parent / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 5")


PRETRAINED = {"damsm": 0.61, "damsm-no-memory": 0.47}  # val R-precision written per variant


def _write_pretrained_metrics(setup: Setup) -> None:
    """Give the run's encoder file the val metrics DAMSM pretraining stores, and put a
    --no-memory variant beside it, as make demo leaves them for the report's table."""
    models = setup.artifacts / "models"
    data = torch.load(models / "damsm.pt", weights_only=True)
    for name, value in PRETRAINED.items():
        data["metrics"] = {"epoch": 4.0, "r_precision": value, "r_precision_std": 0.03,
                           "r_precision_in_batch": value - 0.01,
                           "r_precision_in_batch_std": 0.02, "val_loss": 3.5,
                           "train_loss": 3.4, "candidates": 100.0}
        torch.save(data, models / f"{name}.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Setup:
    setup = make_setup(tmp_path_factory.mktemp("eval"), objects=True, val_images=VAL_IMAGES)
    _write_classifier(setup)
    _train_generator(setup)
    _write_log(setup)
    _write_pretrained_metrics(setup)
    return setup


def _args(setup: Setup, *extra: str) -> list[str]:
    return ["--artifacts", str(setup.artifacts), "--coco-root", str(setup.coco),
            "--batch-size", "5", *extra]


@pytest.fixture(scope="module")
def evaluated(run: Setup) -> dict:
    result = CliRunner().invoke(eval_cli, _args(run))
    assert result.exit_code == 0, (result.output, result.exception)
    assert "cpgan-eval [cpgan step 40]" in result.output
    assert "encoders damsm R-prec 0.610, damsm-no-memory R-prec 0.470" in result.output
    return json.loads((run.artifacts / "report" / "report.json").read_text())


def test_report_has_every_metric_for_all_three_blocks(evaluated: dict):
    assert set(evaluated) == {"generated", "real", "untrained", "config", "encoders"}
    for block in ("generated", "real", "untrained"):
        entry = evaluated[block]
        assert METRIC_KEYS <= set(entry), block
        assert entry["images"] == VAL_IMAGES
        for key in ("inception_score", "r_precision", "r_precision_in_batch"):
            assert set(entry[key]) == {"mean", "std"}
            assert entry[key]["std"] >= 0
        assert 1.0 <= entry["inception_score"]["mean"] <= 64.0
        assert 0.0 <= entry["r_precision"]["mean"] <= 1.0
        assert entry["fid"] >= 0.0
        assert 0.0 <= entry["soa_c"] <= 1.0 and 0.0 <= entry["soa_i"] <= 1.0
        assert 0.0 <= entry["soa_no_object"] <= 1.0
        if entry["soa_no_object"] == 1.0:  # nothing found anywhere: no share to take
            assert entry["soa_unnamed"] is None, block
        else:
            assert 0.0 <= entry["soa_unnamed"] <= 1.0, block
    config = evaluated["config"]
    assert config["num_images"] == VAL_IMAGES and config["checkpoint"]["step"] == 40
    assert config["r_precision"]["candidates"] == VAL_IMAGES      # fewer than 100: recorded
    assert config["r_precision"]["full_protocol"] is False
    assert config["scoring_network"]["kind"] == "classifier"
    assert "toy classifier" in config["fid_network"]


def test_untrained_and_trained_generators_give_different_images(run: Setup, evaluated: dict):
    folder = run.artifacts / "report"
    generated, untrained = (folder / f"samples-{b}.png" for b in ("generated", "untrained"))
    assert generated.read_bytes() != untrained.read_bytes()
    # the briefly fitted generator is closer to the real images than a fresh one
    assert evaluated["generated"]["fid"] < evaluated["untrained"]["fid"]


def _real_pool(run: Setup) -> torch.Tensor:
    """The real val images' classifier features, recomputed outside the evaluation."""
    split = CocoSplit.open(run.coco, "val2014")
    dataset = TextImageDataset(split, run.vocab, run.config.data.max_caption_words, [32],
                               augment=False, seed=run.config.seed)
    images = torch.stack([dataset[i].images[-1] for i in range(len(dataset))])
    network = load_classifier(run.artifacts / "models" / "classifier.pt", 32)
    return score_images(network, images)[1]


def test_real_fid_is_one_disjoint_half_against_the_other(run: Setup, evaluated: dict):
    half_a, half_b = evaluate.real_halves(VAL_IMAGES, evaluated["config"]["seed"])
    assert set(half_a).isdisjoint(half_b) and set(half_a) | set(half_b) == set(range(VAL_IMAGES))
    assert evaluated["real"]["fid_halves"] == [len(half_a), len(half_b)] == [6, 6]
    pool = _real_pool(run)
    expected = fid(pool[torch.from_numpy(half_a)], pool[torch.from_numpy(half_b)])
    assert evaluated["real"]["fid"] == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-6                      # not the set against itself (which gives 0)


def test_index_html_references_existing_pictures_by_relative_path(run: Setup, evaluated: dict):
    folder = run.artifacts / "report"
    page = (folder / "index.html").read_text()
    sources = re.findall(r"<img src=\"([^\"]+)\"", page)
    assert len(sources) >= 4
    for source in sources:
        assert not source.startswith(("/", "http:", "https:", "file:")) and ".." not in source
        assert (folder / source).is_file(), source
    assert {"samples-generated.png", "samples-real.png", "curves.png", "memory.png",
            "attention-0.png"} <= set(sources)
    assert "http" not in page.replace("http-equiv", "")     # nothing fetched from outside
    assert "SOA-C" in page and "untrained" in page


def test_report_sets_the_pretrained_encoder_variants_side_by_side(run: Setup, evaluated: dict):
    rows = {row["model"]: row for row in evaluated["encoders"]}
    assert set(rows) == {"models/damsm.pt", "models/damsm-no-memory.pt"}
    for name, value in PRETRAINED.items():
        row = rows[f"models/{name}.pt"]
        assert row["r_precision"] == {"mean": value, "std": 0.03}
        assert row["memory"] is (name == "damsm") and row["objects"] is True
        assert row["epochs"] == 4 and row["history"] is None     # no provenance record here
    page = (run.artifacts / "report" / "index.html").read_text()
    table = page[page.index("Pretrained encoders"):]
    assert "0.610 ± 0.030" in table and "0.470 ± 0.030" in table
    assert "AttnGAN (no memory)" in table and "MATE (memory)" in table


def test_eval_stage_provenance_is_done(run: Setup, evaluated: dict):
    assert artifacts.stage_state(run.artifacts, "eval") == ("done", "")
    record = artifacts.read_record(run.artifacts, "eval")
    assert "report/report.json" in record["outputs"] and "report/index.html" in record["outputs"]
    assert "runs/cpgan/checkpoint.pt" in record["inputs"]
    assert "models/damsm-no-memory.pt" in record["inputs"]   # its row is in the report
    assert record["summary"]["generated"]["fid"] == evaluated["generated"]["fid"]


def test_a_finished_report_is_not_recomputed(run: Setup, evaluated: dict, monkeypatch):
    """A rerun of make demo skips the evaluation when nothing it read has changed, and decides
    so without reading the checkpoint, which needs torch (tests/test_cli_skip.py)."""
    report = run.artifacts / "report" / "report.json"
    before = report.stat().st_mtime_ns
    with monkeypatch.context() as patched:
        patched.setattr(sampling, "read_checkpoint", _not_read)
        result = CliRunner().invoke(eval_cli, _args(run))
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    assert report.stat().st_mtime_ns == before
    moved = run.artifacts.with_name(run.artifacts.name + "-moved")  # the record is relative
    run.artifacts.rename(moved)
    try:
        args = _args(run)
        args[args.index(str(run.artifacts))] = str(moved)
        result = CliRunner().invoke(eval_cli, args)
    finally:
        moved.rename(run.artifacts)
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    other = CliRunner().invoke(eval_cli, _args(run, "--seed", "5"))  # other params: recompute
    assert other.exit_code == 0 and "up to date" not in other.output, other.output
    assert report.stat().st_mtime_ns != before


def _not_read(path):
    raise AssertionError(f"{path} was read")


def test_global_features_equal_the_encoders_f(run: Setup):
    from cpgan.trainer.damsm import load_pretrained_encoders

    checkpoint = sampling.read_checkpoint(run.checkpoint)
    _, image = load_pretrained_encoders(run.artifacts / checkpoint.encoders, run.vocab,
                                        checkpoint.config, run.artifacts / "memory.h5",
                                        run.detector)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.allclose(evaluate.global_features(image, images),
                          image(images).global_feature, atol=1e-6)


def test_a_one_stage_generator_has_no_attention_pictures(tmp_path: Path):
    """A one-stage G (``gan.stages = 1``) has no F^att maps: the showcase keeps its samples
    and no attention example, and the report draws without one (it used to fail on an empty
    mosaic)."""
    from cpgan.pipeline.report import _sample_pictures

    collector = evaluate._Collector(limit=2, attention_limit=2)
    images = {block: torch.rand(3, 3, 16, 16) * 2 - 1 for block in evaluate.BLOCKS}
    collector.add(["a red circle", "a blue star", "two squares"],
                  [["a", "red", "circle"], ["a", "blue", "star"], ["two", "squares"]], images, [])
    showcase = collector.showcase()
    assert showcase.attention == [] and len(showcase.captions) == 2
    names = [p.name for p in _sample_pictures(tmp_path, showcase)]
    assert names == [f"samples-{block}.png" for block in evaluate.BLOCKS]
    assert all((tmp_path / name).is_file() for name in names)


def test_scored_images_show_every_block_at_the_stage_resolution():
    """--stage K: the generated and untrained images of stage K enlarged to the final size;
    the real ones shrunk to that size as the real pyramid is, then enlarged back."""
    import torch.nn.functional as F
    from cpgan.model.generator import GeneratorOutput

    def output(seed: int) -> GeneratorOutput:
        g = torch.Generator().manual_seed(seed)
        images = [torch.rand(2, 3, s, s, generator=g) * 2 - 1 for s in (8, 16, 32)]
        return GeneratorOutput(images, [], torch.zeros(2, 4), torch.zeros(2, 4))

    out, untrained, real = output(0), output(1), torch.rand(2, 3, 32, 32) * 2 - 1
    last = evaluate.scored_images(out, untrained, real, None)
    assert last["generated"] is out.images[-1] and last["real"] is real
    assert all(torch.equal(a, b) for a, b in zip(
        evaluate.scored_images(out, untrained, real, 2).values(), last.values()))
    first = evaluate.scored_images(out, untrained, real, 0)
    up = dict(size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(first["generated"], F.interpolate(out.images[0], **up))
    assert torch.equal(first["untrained"], F.interpolate(untrained.images[0], **up))
    shrunk = F.interpolate(real, size=(8, 8), mode="bilinear", align_corners=False,
                           antialias=True)
    assert torch.equal(first["real"], F.interpolate(shrunk, **up))
    # an 8-px view of random pixels keeps little of their detail
    assert (first["real"] - real).abs().mean() > 0.2


def test_stage_option_scores_an_earlier_stage_beside_the_main_report(run: Setup,
                                                                     evaluated: dict,
                                                                     tmp_path: Path, capsys):
    record_before = artifacts.read_record(run.artifacts, "eval")
    folder = tmp_path / "stage0"
    result = CliRunner().invoke(eval_cli, _args(run, "--stage", "0", "--report-dir",
                                                str(folder)))
    assert result.exit_code == 0, (result.output, result.exception)
    assert "cpgan-eval [cpgan step 40 stage 0]" in result.output
    report = json.loads((folder / "report.json").read_text())
    assert report["config"]["stage"] == {"index": 0, "size": 8}
    assert evaluated["config"]["stage"] == {"index": 2, "size": 32}
    assert "stage 0 (8 px images, shown at 32 px" in (folder / "index.html").read_text()
    assert "stage" not in (run.artifacts / "report" / "index.html").read_text().split("</h1>")[0]
    for block in ("generated", "real"):  # other images, so other figures
        assert report[block]["fid"] != pytest.approx(evaluated[block]["fid"], rel=1e-3)
    assert artifacts.read_record(run.artifacts, "eval") == record_before
    assert "--report-dir" in _error(run, capsys, "--stage", "0")
    assert "stages 0 to 2" in _error(run, capsys, "--stage", "3", "--report-dir",
                                     str(tmp_path / "none"))


def _side_report(run: Setup, folder: Path, *extra: str) -> dict:
    """report.json of ``cpgan-eval ... --report-dir folder`` (the command must succeed)."""
    result = CliRunner().invoke(eval_cli, _args(run, *extra, "--report-dir", str(folder)))
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads((folder / "report.json").read_text())


def _other_encoders(run: Setup) -> Path:
    """The run's encoder file with every learned weight redrawn: another R-precision ruler."""
    source = run.artifacts / sampling.read_checkpoint(run.checkpoint).encoders
    data = torch.load(source, weights_only=True)
    generator = torch.Generator().manual_seed(99)
    for part in ("text_encoder", "image_encoder"):
        data[part] = {k: (torch.randn(v.shape, generator=generator) * 0.3
                          if v.is_floating_point() and "running" not in k else v)
                      for k, v in data[part].items()}
    path = run.artifacts / "models" / "ruler.pt"
    torch.save(data, path)
    return path


def test_rprecision_encoders_score_every_variant_with_one_ruler(run: Setup, evaluated: dict,
                                                                 tmp_path: Path):
    """--rprecision-encoders: sentences and f come from the given file, the generator is still
    conditioned by the run's own text encoder, and --report-dir leaves the eval stage alone."""
    ruler = _other_encoders(run)
    record_before = artifacts.read_record(run.artifacts, "eval")
    report = _side_report(run, tmp_path / "ablation", "--rprecision-encoders", str(ruler))
    assert report["config"]["r_precision_encoders"] == str(ruler)
    assert evaluated["config"]["r_precision_encoders"] == "models/damsm.pt"
    # the same generated images (IS and FID agree) scored by another ruler
    assert report["generated"]["fid"] == pytest.approx(evaluated["generated"]["fid"], rel=1e-5)
    assert artifacts.read_record(run.artifacts, "eval") == record_before

    checkpoint = sampling.read_checkpoint(run.checkpoint)
    files = evaluate.EvalFiles(run.artifacts, run.artifacts / "models" / "classifier.pt", None,
                               run.artifacts / "models" / "detector.pt",
                               Path(__file__).parent.parent / run.config.detector.cfg,
                               rprecision_encoders=ruler)
    models = evaluate.load_eval_models(checkpoint, files, CocoSplit.open(run.coco, "val2014"), 0)
    assert ruler in files.inputs(checkpoint, CocoSplit.open(run.coco, "val2014"), models.scoring)
    from cpgan.trainer.data import collate

    pairs = _val_pairs(run)
    batch = collate([pairs[i] for i in range(4)])
    own = sampling.encode_captions(models.text_encoder, batch.captions, batch.lengths)
    ruled = evaluate._scored_sentences(models, own, batch)
    expected = sampling.encode_captions(models.rprecision_text, batch.captions, batch.lengths)
    assert torch.equal(ruled, expected.sentence) and not torch.allclose(ruled, own.sentence)
    images = batch.images[-1]
    assert not torch.allclose(evaluate.global_features(models.scorer_image, images),
                              evaluate.global_features(models.image_encoder, images))


def test_soa_detector_weights_score_soa_with_another_detector(run: Setup, evaluated: dict,
                                                              tmp_path: Path, capsys):
    """--soa-detector-weights: the same generated images (their FID and R-precision, which the
    encoders and their detector decide, agree) with SOA from the other detector; the main
    report and the eval stage stay as they were, and the option needs --report-dir."""
    data = torch.load(run.artifacts / "models" / "detector.pt", weights_only=True)
    for head in (23, 31, 39):  # the convolutions before the [yolo] layers: 3 x (5 + 8 classes)
        bias = data["state_dict"][f"layers.{head}.conv.bias"].view(3, 13)
        bias[:, 4] = -30.0  # no box is an object
    other = tmp_path / "other-detector.pt"
    torch.save(data, other)
    record_before = artifacts.read_record(run.artifacts, "eval")
    report = _side_report(run, tmp_path / "second-detector", "--soa-detector-weights",
                          str(other))
    assert report["config"]["soa_detector"]["weights"] == str(other)
    assert evaluated["config"]["soa_detector"]["weights"].endswith("models/detector.pt")
    for key in ("fid", "r_precision"):
        assert report["generated"][key] == pytest.approx(evaluated["generated"][key], rel=1e-5)
    assert evaluated["generated"]["soa_no_object"] < 1.0
    assert report["generated"]["soa_no_object"] == report["real"]["soa_no_object"] == 1.0
    assert report["generated"]["soa_unnamed"] is report["real"]["soa_unnamed"] is None
    assert artifacts.read_record(run.artifacts, "eval") == record_before
    assert "--report-dir" in _error(run, capsys, "--soa-detector-weights", str(other))


def test_soa_detector_ids_come_from_its_file_read_once(run: Setup, tmp_path: Path,
                                                       monkeypatch):
    """detector.pt's category ids map its classes to the split's; a file without them, with
    the wrong number or with an id the split lacks is refused naming the file."""
    from cpgan.pipeline import detect

    split = CocoSplit.open(run.coco, "val2014")
    weights = run.artifacts / "models" / "detector.pt"
    reads = []
    real_load = detect.load_torch_file
    monkeypatch.setattr(detect, "load_torch_file",
                        lambda *args: reads.append(args) or real_load(*args))
    detector, ids = evaluate.load_soa_detector(CFG, weights, split)
    assert ids == sorted(split.categories()) and len(ids) == detector.num_classes
    assert len(reads) == 1
    data = torch.load(weights, weights_only=True)
    for change, message in ((lambda d: d.pop("category_ids"), "no 'category_ids'"),
                            (lambda d: d["category_ids"].pop(), f"{len(ids) - 1} category ids"),
                            (lambda d: d["category_ids"].__setitem__(0, 999), "category id 999")):
        bad = {**data, "category_ids": list(data["category_ids"])}
        change(bad)
        path = tmp_path / "bad-detector.pt"
        torch.save(bad, path)
        with pytest.raises(CpganError, match=re.escape(message)) as info:
            evaluate.load_soa_detector(CFG, path, split)
        assert str(path) in str(info.value)


def _error(run: Setup, capsys, *extra: str) -> str:
    with pytest.raises(SystemExit) as info:
        eval_main(_args(run, *extra))
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_refusals_are_one_line(run: Setup, tmp_path: Path, capsys):
    assert "fit-classifier" in _error(run, capsys, "--scoring-weights",
                                      str(tmp_path / "none.pt"))
    assert "paper preset" in _error(run, capsys, "--fid-weights", str(tmp_path / "f.pth"))
    bad = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "kind": "cpgan-gan", "config": {}}, bad)
    assert "missing" in _error(run, capsys, "--checkpoint", str(bad))
    assert "--stage needs --report-dir" in _error(run, capsys, "--stage", "0")
    assert "--soa-detector-weights needs --report-dir" in _error(
        run, capsys, "--soa-detector-weights", str(bad))


def test_help_names_the_default_checkpoint_and_the_subcommand():
    runner = CliRunner()
    result = runner.invoke(eval_cli, ["--help"])
    assert result.exit_code == 0
    assert "runs/*/checkpoint.pt" in result.output and "runs/cpgan/checkpoint.pt" in result.output
    assert "fit-classifier" in result.output
    sub = runner.invoke(eval_cli, ["fit-classifier", "--help"])
    assert sub.exit_code == 0 and "--epochs" in sub.output
