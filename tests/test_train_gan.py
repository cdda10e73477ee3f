"""GAN training (trainer/gan.py) and ``cpgan-train --stage gan`` on a tiny toy set.

The DAMSM encoder files are freshly built encoders saved in the documented format (what
``train_damsm`` writes), for every switch combination, so no test waits for pretraining.
"""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cpgan.cli.train import main as train_main
from cpgan.config import load_config
from cpgan.errors import CpganError
from cpgan.model.discriminator import (
    Discriminators,
    FineGrainedConditionalDiscriminator,
    SentenceConditionalDiscriminator,
    spectral_norm_without_batch_norm,
)
from cpgan.model.darknet import write_weights
from cpgan.model.generator import Generator
from cpgan.pipeline import artifacts
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.toy import generate_toy_coco
from cpgan.trainer import damsm, gan
from cpgan.trainer.data import TextImageDataset, collate, epoch_order

from builders import (random_detector, random_memory, toy_vocabulary, write_classifier_file,
                      write_encoder_file, write_memory_file)

MEMORY_DIM = 8
TINY = """
[encoder]
word_embed_dim = 8
text_dim = 8
image_size = 64
backbone_width = 4
batch_size = 4
epochs = 1

[gan]
base_size = 8
stages = 2
gf_dim = 4
df_dim = 4
r_num = 1
z_dim = 4
condition_dim = 4
fgcd_patches = 2
batch_size = 4
epochs = 2
lr_g = 0.001
lr_d = 0.001
"""
CONTRACT_KEYS = {"format", "kind", "config", "switches", "encoders", "memory", "vocab_size",
                 "generator", "generator_ema", "discriminators", "optimizer_g", "optimizer_d",
                 "step", "epoch", "finished", "rng"}
OFF = gan.Switches(False, False, False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gan")
    coco = generate_toy_coco(root / "coco", train_images=12, val_images=4, image_size=64,
                             seed=3, progress=False)
    vocab = toy_vocabulary(coco, save_to=root / "vocab.json")
    detector = random_detector(seed=0)
    (root / "models").mkdir()
    write_weights(detector, root / "models" / "detector.weights")
    memory = random_memory(len(vocab), MEMORY_DIM)  # global RNG, right after the detector
    write_memory_file(root / "memory.h5", vocab, memory)
    (root / "tiny.toml").write_text(TINY)
    config = load_config("toy", root / "tiny.toml")
    for use_memory in (True, False):
        for use_objects in (True, False):
            write_encoder_file(root / "models", vocab, config, memory if use_memory else None,
                               detector if use_objects else None)
    return {"root": root, "coco": coco, "vocab": vocab, "detector": detector,
            "config": config}


def _train(setup, switches=OFF, name=None, config=None, **kw) -> gan.GanRun:
    kw.setdefault("checkpoint_every", 2)
    kw.setdefault("sample_every", 100)
    kw.setdefault("log_every", 1)
    return gan.train_gan(setup["coco"], setup["root"], config or setup["config"],
                         setup["vocab"], switches, memory_path=setup["root"] / "memory.h5",
                         detector=setup["detector"], name=name, progress=False, threads=1,
                         **kw)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _losses(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k == "step" or k.startswith("loss")} for row in rows]


@pytest.fixture(scope="module")
def straight(setup) -> gan.GanRun:
    """Two epochs (6 steps) without interruption, checkpoints every 2 steps."""
    return _train(setup, name="straight")


# --------------------------------------------------------------------------------------------


def test_generator_and_discriminators_take_their_own_learning_rates(setup):
    config = copy.deepcopy(setup["config"])
    config.gan.lr_g, config.gan.lr_d = 3e-3, 7e-4
    state = gan.build_state(config, True, torch.device("cpu"))
    assert {group["lr"] for group in state.optimizer_g.param_groups} == {3e-3}
    assert {group["lr"] for group in state.optimizer_d.param_groups} == {7e-4}


def test_the_training_pairs_mirror_their_captions_when_the_config_says_so(setup):
    vocab = setup["vocab"]
    for mirrored in (False, True):
        config = copy.deepcopy(setup["config"])
        config.gan.mirror_captions = mirrored
        job = gan._Job(setup["coco"], setup["root"], config, vocab, OFF, None, None, None,
                       "mirror", torch.device("cpu"), gan.distributed_from_env(), False, None,
                       1, 1, 1, 0)
        expected = {vocab.id("left"): vocab.id("right"), vocab.id("right"): vocab.id("left")}
        assert job.dataset.mirror == (expected if mirrored else {})
        assert job.dataset.augment


def _one_step_inputs(setup, config) -> tuple:
    """The full model's encoders, a fresh GAN state of ``config`` and a batch of 4 pairs."""
    encoders = gan.load_encoders(setup["root"], setup["vocab"], config, gan.Switches(),
                                 setup["root"] / "memory.h5", setup["detector"], None,
                                 torch.device("cpu"))
    state = gan.build_state(config, True, torch.device("cpu"))
    dataset = TextImageDataset(CocoSplit.open(setup["coco"], "train2014"), setup["vocab"],
                               config.data.max_caption_words, [8, 16], augment=False)
    return encoders, state, collate([dataset[i] for i in range(4)])


def test_one_step_moves_g_and_d_and_d_alone_lowers_its_loss(setup):
    config = setup["config"]
    encoders, state, batch = _one_step_inputs(setup, config)
    g_before = [p.detach().clone() for p in state.generator.parameters()]
    d_before = [p.detach().clone() for p in state.discriminators.parameters()]
    values = gan.train_step(state, batch, encoders, config, seed=7)
    assert state.step == 1 and {"loss_d", "loss_g", "loss_tiscl", "loss_kl"} <= values.keys()
    assert all(not torch.equal(a, b) for a, b in zip(g_before, state.generator.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d_before, state.discriminators.parameters()))
    assert not any(p.requires_grad for p in encoders.text.parameters())  # MATE stays frozen

    text = gan.encode_text(encoders.text, batch.captions, batch.lengths)
    with torch.no_grad():
        fake = state.generator(gan.sample_noise(4, config, 1, torch.device("cpu")),
                               text.sentence, text.words, text.mask).images

    def d_loss() -> float:
        with torch.no_grad():
            return state.d_model(batch.images, fake, text)[0].item()

    before = d_loss()
    for _ in range(8):
        gan.discriminator_step(state, batch.images, fake, text)
    assert d_loss() < 0.8 * before


def test_tiscl_takes_its_own_temperature_when_one_is_set(setup):
    """``gan.tiscl_gamma3`` replaces gamma3 in TISCL (Eq. 6) only; 0 keeps the encoders' own."""
    from cpgan.model.losses import damsm_loss

    config = copy.deepcopy(setup["config"])
    encoders, state, batch = _one_step_inputs(setup, config)
    text = gan.encode_text(encoders.text, batch.captions, batch.lengths)
    with torch.no_grad():
        image = state.generator(gan.sample_noise(4, config, 1, torch.device("cpu")),
                                text.sentence, text.words, text.mask).images[-1]
        encoded = encoders.image(image)
        e = config.encoder

        def expected(gamma3: float) -> float:
            return damsm_loss(text.words_by_dim, text.mask, text.sentence, encoded.regions,
                              encoded.global_feature, e.gamma1, e.gamma2, gamma3,
                              region_mask=encoded.region_mask)[0].item()

        config.gan.tiscl_gamma3 = 0.0
        own = gan.tiscl_loss(encoders.image, image, text, config).item()
        config.gan.tiscl_gamma3 = e.gamma3 / 2
        halved = gan.tiscl_loss(encoders.image, image, text, config).item()
    assert own == pytest.approx(expected(e.gamma3), rel=1e-5)
    assert halved == pytest.approx(expected(e.gamma3 / 2), rel=1e-5)
    assert halved != pytest.approx(own, rel=1e-3)
    config.gan.tiscl_gamma3 = -1.0
    with pytest.raises(CpganError, match="gan.tiscl_gamma3 >= 0"):
        gan._Job(setup["coco"], setup["root"], config, setup["vocab"], OFF, None, None, None,
                 "negative", torch.device("cpu"), gan.distributed_from_env(), False, None,
                 1, 1, 1, 0)


def test_without_condition_augmentation_the_kl_term_leaves_the_loss(setup):
    """``gan.condition_augmentation = false``: the generator takes c = mu(s) (built so for
    training and for every reader of the run) and G's loss drops the KL term, which is still
    logged; with the switch on (AttnGAN) the loss holds it at weight 1."""
    from cpgan.trainer.sampling import build_generator

    config = copy.deepcopy(setup["config"])
    encoders, state, batch = _one_step_inputs(setup, config)
    text = gan.encode_text(encoders.text, batch.captions, batch.lengths)
    output = state.generator(gan.sample_noise(4, config, 1, torch.device("cpu")),
                             text.sentence, text.words, text.mask)
    totals = {}
    for augmented in (True, False):
        config.gan.condition_augmentation = augmented
        total, parts = gan.generator_objective(state.discriminators, output, text,
                                               encoders.image, config)
        totals[augmented] = (total.item(), parts)
        assert build_generator(config).condition_augmentation is augmented
    with_kl, parts = totals[True]
    without_kl, _ = totals[False]
    expected = (parts["loss_g_adv"] + config.gan.tiscl_lambda * parts["loss_tiscl"]).item()
    assert without_kl == pytest.approx(expected, rel=1e-6)
    assert parts["loss_kl"].item() > 0
    assert with_kl == pytest.approx(expected + gan.KL_WEIGHT * parts["loss_kl"].item(), rel=1e-6)


def test_tiscl_on_every_stage_averages_the_enlarged_images_losses(setup, monkeypatch):
    """``gan.tiscl_stages = "all"``: the mean of Eq. 6 over every stage's image, each enlarged
    (bilinear) to the last one's size and scored against the same captions; "last" (the paper)
    scores the last image alone. An unknown value is refused in one line before training.
    A stand-in encoder and loss make each stage's term a nonlinear function of its own pixels,
    so mixing stages, skipping one or enlarging otherwise would change the result."""
    import torch.nn.functional as F
    from cpgan.model.image_encoder import ImageEncoding

    config = copy.deepcopy(setup["config"])
    text = gan.TextFeatures(torch.zeros(4, 8, 5), torch.zeros(4, 8), torch.ones(4, 5).bool())
    sizes = [8, 16, 32]
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(4, 3, size, size, generator=generator) + stage
              for stage, size in enumerate(sizes)]

    def encoder(batch):
        pooled = batch.pow(2).flatten(1).mean(dim=1, keepdim=True)  # smoothing lowers it
        return ImageEncoding(pooled[:, :, None], pooled, torch.ones(len(batch), 1).bool(), None)

    monkeypatch.setattr(gan, "_encoded_damsm_loss",
                        lambda regions, feature, mask, text, config: feature.mean() ** 2)
    each = [gan.tiscl_loss(encoder, F.interpolate(image, size=sizes[-1], mode="bilinear",
                                                  align_corners=False), text, config)
            for image in images]
    config.gan.tiscl_stages = "all"
    every = gan.stages_tiscl(encoder, images, text, config).item()
    config.gan.tiscl_stages = "last"
    last = gan.stages_tiscl(encoder, images, text, config).item()
    assert every == pytest.approx(torch.stack(each).mean().item(), rel=1e-6)
    assert last == pytest.approx(each[-1].item(), rel=1e-6)
    assert every != pytest.approx(last, rel=0.1)
    config.gan.tiscl_stages = "first"
    with pytest.raises(CpganError, match="gan.tiscl_stages must be one of last, all"):
        gan._Job(setup["coco"], setup["root"], config, setup["vocab"], OFF, None, None, None,
                 "unknown", torch.device("cpu"), gan.distributed_from_env(), False, None,
                 1, 1, 1, 0)


def test_tiscl_in_channels_last_layout_changes_the_layout_not_the_loss(setup, monkeypatch):
    """``gan.tiscl_channels_last``: the frozen encoders (grid backbone and detector) get the
    images in channels-last layout, a speed choice; TISCL and its gradient to the pixels stay
    those of the plain layout up to the order of the sums."""
    config = copy.deepcopy(setup["config"])
    encoders, _, batch = _one_step_inputs(setup, config)
    text = gan.encode_text(encoders.text, batch.captions, batch.lengths)
    image = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = []
    darknet_forward = type(encoders.image.detector.darknet).forward

    def spy(self, images, *args, **kwargs):
        seen.append(images.is_contiguous(memory_format=torch.channels_last))
        return darknet_forward(self, images, *args, **kwargs)

    monkeypatch.setattr(type(encoders.image.detector.darknet), "forward", spy)
    results = {}
    for layout_on in (False, True):
        config.gan.tiscl_channels_last = layout_on
        pixels = image.clone().requires_grad_(True)
        loss = gan.stages_tiscl(encoders.image, [pixels], text, config)
        results[layout_on] = (loss.item(), torch.autograd.grad(loss, pixels)[0])
    assert seen == [False, True]
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-8)
    assert results[False][1].abs().max() > 1e-6  # the gradient compared is not all zeros


def test_resume_after_a_kill_gives_the_same_run(setup, straight, monkeypatch):
    original = gan.train_step

    def killed_after_step_5(state, *args, **kwargs):
        if state.step == 5:  # step 5 is logged, the last checkpoint is step 4 (mid-epoch 2)
            raise KeyboardInterrupt
        return original(state, *args, **kwargs)

    monkeypatch.setattr(gan, "train_step", killed_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        _train(setup, name="killed")
    folder = setup["root"] / "runs" / "killed"
    assert _load(folder / "checkpoint.pt")["step"] == 4
    assert [r["step"] for r in _losses(folder)] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(gan, "train_step", original)
    (folder / ".tmp-checkpoint.pt.x1").write_bytes(b"half a checkpoint")  # as a SIGKILL leaves

    resumed = _train(setup, name="killed", resume=True)
    assert resumed.steps_trained == 2 and resumed.steps == 6
    assert _losses(folder) == _losses(straight.folder)  # step 5 dropped, then redone alike
    a, b = _load(straight.checkpoint), _load(folder / "checkpoint.pt")
    for part in ("generator", "generator_ema", "discriminators"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for part in ("optimizer_g", "optimizer_d"):
        for key, slot in a[part]["state"].items():
            assert torch.equal(slot["exp_avg_sq"], b[part]["state"][key]["exp_avg_sq"])
    assert not list(folder.rglob(".tmp-*"))


def test_checkpoint_follows_the_contract(setup):
    run = _train(setup, gan.Switches(), sample_every=3)  # the main variant: runs/cpgan
    assert run.folder == setup["root"] / "runs" / "cpgan"
    data = _load(run.checkpoint)
    assert set(data) == CONTRACT_KEYS
    assert data["format"] == 1 and data["kind"] == "cpgan-gan"
    assert data["config"] == setup["config"].to_dict()
    assert data["switches"] == {"use_memory": True, "use_objects": True, "use_fgcd": True}
    assert data["encoders"] == "models/damsm.pt" and data["memory"] == "memory.h5"
    assert data["vocab_size"] == len(setup["vocab"])
    assert (data["step"], data["epoch"], data["finished"]) == (6, 2, True)
    assert all(isinstance(v, (torch.Tensor, int, list)) for v in data["rng"].values())

    cfg, g = data["config"], data["config"]["gan"]  # rebuilt exactly as the contract says
    generator = Generator(text_dim=cfg["encoder"]["text_dim"], z_dim=g["z_dim"],
                          condition_dim=g["condition_dim"], gf_dim=g["gf_dim"],
                          base_size=g["base_size"], stages=g["stages"], r_num=g["r_num"])
    generator.load_state_dict(data["generator_ema"])
    assert not all(torch.equal(data["generator_ema"][k], data["generator"][k])
                   for k in data["generator"])  # the average lags the trained weights
    discriminators = Discriminators(g["stages"], g["df_dim"], g["base_size"],
                                    cfg["encoder"]["text_dim"], g["fgcd_patches"], fgcd=True)
    if g["d_norm"] == "spectral":  # the toy preset's
        spectral_norm_without_batch_norm(discriminators)
    discriminators.load_state_dict(data["discriminators"])

    rows = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "epoch", "loss_d", "loss_g", "loss_tiscl", "loss_kl"} <= r.keys()
               for r in rows)
    assert [r["epoch"] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert json.loads((run.folder / "config.json").read_text()) == setup["config"].to_dict()
    samples = sorted(p.name for p in (run.folder / "samples").iterdir())
    assert samples == ["step-0000003.png", "step-0000006.png"]
    with Image.open(run.folder / "samples" / "step-0000006.png") as image:
        assert image.format == "PNG" and image.width > image.height > 100
    assert not list(run.folder.rglob(".tmp-*"))


def test_a_checkpoint_of_another_config_is_refused_in_one_line(setup, straight):
    other = load_config("toy", setup["root"] / "tiny.toml")
    other.gan.lr_d = 0.002
    with pytest.raises(CpganError) as info:
        _train(setup, name="straight", config=other, resume=True)
    message = str(info.value)
    assert "\n" not in message and str(straight.checkpoint) in message and "gan.lr_d" in message
    longer = load_config("toy", setup["root"] / "tiny.toml")
    longer.gan.epochs = 3  # more epochs is a legitimate resume: one more epoch of 3 steps
    shutil.copytree(straight.folder, setup["root"] / "runs" / "longer")
    run = _train(setup, name="longer", config=longer, resume=True)
    assert (run.steps, run.steps_trained) == (9, 3)

    with pytest.raises(CpganError, match="switches"):
        _train(setup, gan.Switches(False, False, True), name="straight", resume=True)


def test_ablation_switches_pick_discriminator_encoders_and_folder(setup):
    config = setup["config"]
    assert all(isinstance(d.conditional, FineGrainedConditionalDiscriminator)
               for d in gan.build_discriminators(config, True).stages)
    assert all(isinstance(d.conditional, SentenceConditionalDiscriminator)
               for d in gan.build_discriminators(config, False).stages)
    assert gan.run_name(False, False, False) == "cpgan-no-memory-no-oaie-no-fgcd"
    assert gan.run_name(True, False, True) == "cpgan-no-oaie"
    assert gan.Switches(False, True, False).name == "cpgan-no-memory-no-fgcd"
    for switches in (gan.Switches(False, True), gan.Switches(True, False)):
        encoders = gan.load_encoders(setup["root"], setup["vocab"], config, switches,
                                     setup["root"] / "memory.h5", setup["detector"], None,
                                     torch.device("cpu"))
        expected = damsm.model_name(switches.use_memory, switches.use_objects)
        assert encoders.path == f"models/{expected}.pt"
        assert encoders.text.uses_memory == switches.use_memory
        assert encoders.image.use_objects == switches.use_objects
        assert encoders.memory == ("memory.h5" if switches.use_memory else None)

    root = setup["root"]  # a memory bank outside the root is still recorded relative to it
    assert gan.relative_to_root(root, root.parent / "banks" / "m.h5") == "../banks/m.h5"

    run = _train(setup, gan.Switches(True, False, False))
    data = _load(run.checkpoint)
    assert run.folder.name == "cpgan-no-oaie-no-fgcd"
    assert data["encoders"] == "models/damsm-no-oaie.pt"
    assert not any(".patch_features." in k for k in data["discriminators"])
    assert any(".joint." in k for k in data["discriminators"])


def test_rank_shares_cover_the_epoch_like_distributed_sampler():
    order = epoch_order(10, 0, 3)
    shares = [gan.rank_order(10, 0, 3, rank, 4) for rank in range(4)]
    assert [len(s) for s in shares] == [3, 3, 3, 3]
    padded = [i for group in zip(*shares) for i in group]
    assert padded[:10] == order and padded[10:] == order[:2]
    assert gan.steps_per_epoch(10, 2, 4) == 1 and gan.steps_per_epoch(10, 2, 1) == 5


def test_cli_trains_the_gan_then_skips_it_and_records_provenance(setup, tmp_path, capsys):
    artifacts_root = tmp_path / "artifacts"
    (artifacts_root / "models").mkdir(parents=True)
    for name in ("vocab.json", "memory.h5"):
        (artifacts_root / name).write_bytes((setup["root"] / name).read_bytes())
    for name in ("damsm.pt", "detector.weights"):
        (artifacts_root / "models" / name).write_bytes(
            (setup["root"] / "models" / name).read_bytes())
    args = ["--stage", "gan", "--artifacts", str(artifacts_root), "--coco-root",
            str(setup["coco"]), "--config", str(setup["root"] / "tiny.toml"),
            "--detector-weights", str(artifacts_root / "models" / "detector.weights"),
            "--epochs", "1", "--sample-every", "2", "--checkpoint-every", "2"]
    assert _exit_code(args) == 0
    out = capsys.readouterr().out
    assert "gan [cpgan]: 1 epochs (3 steps" in out and "TISCL" in out
    assert artifacts.stage_state(artifacts_root, "gan") == ("done", "")
    assert (artifacts_root / "runs" / "cpgan" / "gan.provenance.json").is_file()
    assert _exit_code(args) == 0
    assert "gan [cpgan]: up to date" in capsys.readouterr().out
    assert _load(artifacts_root / "runs" / "cpgan" / "checkpoint.pt")["step"] == 3

    assert _exit_code([*args, "--no-memory"]) == 1  # its encoders were never trained
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "damsm-no-memory.pt" in err and err.count("\n") == 1


def test_cli_stage_all_pretrains_missing_encoders_then_trains_the_gan(setup, tmp_path, capsys):
    artifacts_root = tmp_path / "artifacts"
    artifacts_root.mkdir()
    (artifacts_root / "vocab.json").write_bytes((setup["root"] / "vocab.json").read_bytes())
    write_classifier_file(artifacts_root / "models" / "classifier.pt",
                          width=setup["config"].encoder.backbone_width)
    args = ["--artifacts", str(artifacts_root), "--coco-root", str(setup["coco"]), "--config",
            str(setup["root"] / "tiny.toml"), "--no-memory", "--no-oaie", "--epochs", "1"]
    assert _exit_code(args) == 0
    out = capsys.readouterr().out
    assert "damsm [damsm-no-memory-no-oaie]: 1 epochs" in out
    assert "gan [cpgan-no-memory-no-oaie]: 1 epochs (3 steps" in out
    record = artifacts_root / "runs" / "cpgan-no-memory-no-oaie" / "gan.provenance.json"
    assert json.loads(record.read_text())["stage"] == "gan"
    assert artifacts.stage_state(artifacts_root, "gan")[0] == "missing"  # the main run's only
    assert _exit_code(args) == 0
    out = capsys.readouterr().out
    assert "damsm [damsm-no-memory-no-oaie]: up to date" in out
    assert "gan [cpgan-no-memory-no-oaie]: up to date" in out


def _exit_code(args: list[str]) -> int:
    try:
        train_main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_spectral_norm_discriminators_train_and_resume_exactly(setup):
    """``gan.d_norm = "spectral"``: no BN in D, and the spectral norm's power-iteration state
    is part of the checkpoint, so a run stopped after one epoch and resumed equals one run."""
    config = copy.deepcopy(setup["config"])
    config.gan.d_norm = "spectral"
    straight = _train(setup, name="spectral", config=config)
    assert not any(isinstance(m, torch.nn.BatchNorm2d)
                   for m in gan.build_discriminators(config, use_fgcd=False).modules())
    config.gan.epochs = 1
    _train(setup, name="spectral-resumed", config=config)
    config.gan.epochs = 2
    resumed = _train(setup, name="spectral-resumed", config=config, resume=True)
    assert resumed.steps_trained == 3 and resumed.steps == 6
    a, b = _load(straight.checkpoint), _load(resumed.checkpoint)
    assert any("parametrizations" in k for k in a["discriminators"])
    for part in ("generator", "discriminators"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    config.gan.d_norm = "layer"
    with pytest.raises(CpganError, match="gan.d_norm is 'layer'"):
        gan.build_discriminators(config)


def test_a_spectral_norm_step_normalises_each_weight_once_per_update(setup):
    """D's update calls every stage on real and on fake images, G's update calls it again:
    each of the two updates computes each normalised weight once (one power iteration)."""
    config = copy.deepcopy(setup["config"])
    config.gan.d_norm = "spectral"
    encoders, state, batch = _one_step_inputs(setup, config)
    norms = [m for m in state.discriminators.modules()
             if type(m).__name__ == "_SpectralNorm"]
    calls = []
    for norm in norms:
        norm.register_forward_hook(lambda module, args, out: calls.append(module))
    gan.train_step(state, batch, encoders, config, seed=7)
    assert len(norms) > 10 and len(calls) == 2 * len(norms)
    assert all(calls.count(norm) == 2 for norm in norms)


def test_a_key_the_checkpoint_predates_counts_as_its_default(setup):
    """A checkpoint written before ``gan.d_norm`` existed resumes under the default ("batch",
    what it was trained with) and is refused under any other value."""
    current = copy.deepcopy(setup["config"])
    current.gan.d_norm = "batch"  # trained before the key existed: BN, the default
    stored = current.to_dict()
    del stored["gan"]["d_norm"]
    assert gan.config_difference(stored, current.to_dict()) is None
    current.gan.d_norm = "spectral"
    assert "gan.d_norm = 'batch' in the checkpoint" in gan.config_difference(stored,
                                                                          current.to_dict())
