"""Reading GAN run checkpoints, deterministic generation and ``cpgan-sample``.

The GAN trainer is not needed: the tests write run-contract checkpoints themselves from freshly
built (untrained) models, with tiny sizes, beside a tiny generated toy dataset, a vocabulary, a
memory bank (and its index) and DAMSM encoder files in the documented format. The builders
here are shared with tests/test_evaluate.py.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from cpgan.cli.sample import cli as sample_cli
from cpgan.cli.sample import main as sample_main
from cpgan.config import Config, load_config
from cpgan.errors import CpganError
from cpgan.model.darknet import Darknet
from cpgan.model.discriminator import Discriminators
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.memory import BOX_COLUMNS, MEMORY_INDEX_SCHEMA
from cpgan.pipeline.text import Vocabulary
from cpgan.pipeline.toy import generate_toy_coco
from cpgan.trainer import sampling

from builders import random_detector, random_memory, toy_vocabulary, write_encoder_file, \
    write_memory_file

MEMORY_DIM = 8
TINY = """
[encoder]
word_embed_dim = 8
text_dim = 8
image_size = 64
backbone_width = 4

[gan]
base_size = 8
stages = 3
gf_dim = 4
df_dim = 4
r_num = 1
z_dim = 8
condition_dim = 4
fgcd_patches = 2
"""


# ------------------------------------------------------------------------------ builders


@dataclass
class Setup:
    root: Path
    coco: Path
    artifacts: Path
    config: Config
    vocab: Vocabulary
    checkpoint: Path
    detector: Darknet | None


def write_memory(artifacts: Path, vocab: Vocabulary, coco: Path) -> torch.Tensor:
    """memory.h5 and memory_index.parquet in the DESIGN §3 layout, random values; every word
    gets one region (the first train image's first instance box) so crops can be drawn."""
    memory = random_memory(len(vocab), MEMORY_DIM, seed=5)
    write_memory_file(artifacts / "memory.h5", vocab, memory, topk=1, relevant=1,
                      split="train2014")  # every word but the specials: support 1
    split = CocoSplit.open(coco, "train2014")
    image_id = split.image_ids()[0]
    x, y, w, h = split.instances(image_id)[0]["bbox"]
    words = list(range(4, len(vocab)))
    columns = {"word_id": words, "word": [vocab.tokens[i] for i in words],
               "rank": [0] * len(words), "image_id": [image_id] * len(words),
               "caption_id": [0] * len(words), "position": [0] * len(words),
               "region": [0] * len(words), "weight": [0.5] * len(words),
               **{name: [v] * len(words) for name, v in zip(BOX_COLUMNS, (x, y, x + w, y + h))}}
    table = pa.table({name: pa.array(columns[name], type=MEMORY_INDEX_SCHEMA.field(name).type)
                      for name in MEMORY_INDEX_SCHEMA.names}, schema=MEMORY_INDEX_SCHEMA)
    pq.write_table(table, artifacts / "memory_index.parquet")
    return memory


def write_detector(artifacts: Path, coco: Path) -> Darknet:
    """A random yolov3-toy detector saved as train-detector's models/detector.pt."""
    detector = random_detector(seed=11)
    categories = CocoSplit.open(coco, "val2014").categories()
    state = {"state_dict": {k: v.clone() for k, v in detector.state_dict().items()},
             "category_ids": sorted(categories), "class_names": list(categories.values()),
             "input_size": detector.input_size}
    (artifacts / "models").mkdir(parents=True, exist_ok=True)
    torch.save(state, artifacts / "models" / "detector.pt")
    return detector


def checkpoint_payload(config: Config, vocab: Vocabulary, encoders: str, use_objects: bool,
                       seed: int = 21) -> dict:
    """A run-contract checkpoint of freshly built models (EMA weights from ``seed``)."""
    torch.manual_seed(seed)
    ema = sampling.build_generator(config)
    generator = sampling.build_generator(config)
    g = config.gan
    discriminators = Discriminators(g.stages, g.df_dim, g.base_size, config.encoder.text_dim,
                                    g.fgcd_patches, fgcd=True)
    opt_g = torch.optim.Adam(generator.parameters(), lr=g.lr_g)
    opt_d = torch.optim.Adam(discriminators.parameters(), lr=g.lr_d)
    return {"format": 1, "kind": "cpgan-gan", "config": config.to_dict(),
            "switches": {"use_memory": True, "use_objects": use_objects, "use_fgcd": True},
            "encoders": encoders, "memory": "memory.h5", "vocab_size": len(vocab),
            "generator": generator.state_dict(), "generator_ema": ema.state_dict(),
            "discriminators": discriminators.state_dict(),
            "optimizer_g": opt_g.state_dict(), "optimizer_d": opt_d.state_dict(),
            "step": 40, "epoch": 2, "finished": True,
            "rng": {"torch": torch.get_rng_state(), "seed": 0}}


def make_setup(root: Path, *, objects: bool, val_images: int = 8) -> Setup:
    coco = generate_toy_coco(root / "coco", train_images=8, val_images=val_images,
                             image_size=64, seed=3, progress=False)
    artifacts = root / "artifacts"
    artifacts.mkdir()
    (root / "tiny.toml").write_text(TINY)
    config = load_config("toy", root / "tiny.toml")
    vocab = toy_vocabulary(coco, save_to=artifacts / "vocab.json")
    memory = write_memory(artifacts, vocab, coco)
    detector = write_detector(artifacts, coco) if objects else None
    encoders = str(write_encoder_file(artifacts / "models", vocab, config, memory, detector,
                                      seed=12).relative_to(artifacts))
    checkpoint = artifacts / "runs" / "cpgan" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save(checkpoint_payload(config, vocab, encoders, objects), checkpoint)
    return Setup(root, coco, artifacts, config, vocab, checkpoint, detector)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return make_setup(tmp_path_factory.mktemp("sample"), objects=False)


def _sample(setup: Setup, out: Path, *captions: str, seed: int = 0, n: int = 2):
    return CliRunner().invoke(sample_cli, [*captions, "--out", str(out), "--seed", str(seed),
                                           "--n", str(n), "--artifacts", str(setup.artifacts),
                                           "--coco-root", str(setup.coco)])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ checkpoints


def test_read_checkpoint_rebuilds_config_and_generator(setup: Setup):
    checkpoint = sampling.read_checkpoint(setup.checkpoint)
    assert checkpoint.config == setup.config
    assert checkpoint.run_name == "cpgan" and checkpoint.step == 40 and checkpoint.finished
    generator = sampling.load_generator(checkpoint)
    stored = torch.load(setup.checkpoint, weights_only=True)["generator_ema"]
    assert all(torch.equal(generator.state_dict()[k], v) for k, v in stored.items())
    assert not generator.training and generator.image_sizes() == [8, 16, 32]


def test_a_checkpoint_from_before_separate_learning_rates_reads_its_lr_as_both():
    config = load_config("toy")
    config.gan.lr_g = config.gan.lr_d = 3e-4
    values = config.to_dict()
    gan_values = {k: v for k, v in values["gan"].items() if k not in ("lr_g", "lr_d")}
    old = {**values, "gan": {**gan_values, "lr": 3e-4}}
    assert sampling.config_from_dict(old, Path("old.pt")) == config
    both = {**values, "gan": {**values["gan"], "lr": 3e-4}}
    with pytest.raises(CpganError, match="old.pt.*gan.lr"):
        sampling.config_from_dict(both, Path("old.pt"))


def test_a_key_the_stored_config_predates_is_its_default_not_the_preset_s():
    """The toy preset sets encoder.captions_per_image = 2; a checkpoint written before the
    key existed was trained as the default, 1, and reads back so."""
    config = load_config("toy")
    assert config.encoder.captions_per_image == 2
    values = config.to_dict()
    values["encoder"] = {k: v for k, v in values["encoder"].items()
                         if k != "captions_per_image"}
    read = sampling.config_from_dict(values, Path("old.pt"))
    assert read.encoder.captions_per_image == 1
    assert read.gan == config.gan and read.preset == "toy"


def _refusal(path: Path) -> str:
    with pytest.raises(CpganError) as info:
        sampling.read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


class _Payload:
    """Unpickling this would create a marker file: weights_only must refuse it first."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_checkpoints_are_refused_in_one_line(setup: Setup, tmp_path: Path):
    good = torch.load(setup.checkpoint, weights_only=True)
    missing = dict(good)
    del missing["generator_ema"]
    torch.save(missing, tmp_path / "missing.pt")
    assert "generator_ema" in _refusal(tmp_path / "missing.pt")

    torch.save({**good, "kind": "damsm"}, tmp_path / "kind.pt")
    assert "kind 'damsm'" in _refusal(tmp_path / "kind.pt")

    marker = tmp_path / "pwned"
    torch.save({**good, "rng": _Payload(str(marker))}, tmp_path / "pickled.pt")
    assert "weights_only" in _refusal(tmp_path / "pickled.pt")
    assert not marker.exists()

    torch.save({**good, "memory": None}, tmp_path / "switches.pt")
    assert "use_memory" in _refusal(tmp_path / "switches.pt")

    wrong_size = dict(good)
    wrong_size["config"] = {**good["config"], "gan": {**good["config"]["gan"], "gf_dim": 8}}
    torch.save(wrong_size, tmp_path / "sizes.pt")
    with pytest.raises(CpganError, match="generator_ema' does not fit"):
        sampling.load_generator(sampling.read_checkpoint(tmp_path / "sizes.pt"))


def test_default_checkpoint_is_the_latest_run(tmp_path: Path):
    assert sampling.default_checkpoint(tmp_path) == tmp_path / "runs/cpgan/checkpoint.pt"
    for name, mtime in (("cpgan", 1_000), ("cpgan-no-memory", 2_000)):
        path = tmp_path / "runs" / name / "checkpoint.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        import os
        os.utime(path, (mtime, mtime))
    assert sampling.default_checkpoint(tmp_path).parent.name == "cpgan-no-memory"


# ------------------------------------------------------------------------------ generation


def test_given_epsilon_is_conditioning_augmentation_with_that_noise(setup: Setup):
    generator = sampling.build_generator(setup.config)
    sentence = torch.randn(3, setup.config.encoder.text_dim)
    torch.manual_seed(7)
    expected, _, _ = generator.condition(sentence)
    torch.manual_seed(7)
    eps = torch.randn(3, setup.config.gan.condition_dim)
    given, _, _ = sampling._GivenEpsilon(generator.condition, eps)(sentence)
    assert torch.allclose(given, expected, atol=1e-6)


def _encoded(setup: Setup, count: int) -> sampling.EncodedText:
    checkpoint = sampling.read_checkpoint(setup.checkpoint)
    text = sampling.load_text_encoder(setup.artifacts / checkpoint.encoders, setup.vocab,
                                      checkpoint.config, setup.artifacts / "memory.h5")
    captions = ["a red circle on the grass", "two blue squares", "a star", "a green heart",
                "a yellow triangle left of a ball"][:count]
    batch = sampling.tokenize_captions(captions, setup.vocab, 18)
    return sampling.encode_captions(text, batch.captions, batch.lengths)


def test_generation_depends_on_seed_and_item_only(setup: Setup):
    generator = sampling.load_generator(sampling.read_checkpoint(setup.checkpoint))
    text = _encoded(setup, 5)
    whole = sampling.generate(generator, text, 3, range(5), 2.0).images[-1]
    parts = torch.cat([sampling.generate(generator, text[a:b], 3, range(a, b), 2.0).images[-1]
                       for a, b in ((0, 2), (2, 5))])
    assert torch.allclose(whole, parts, atol=1e-5)            # batch size does not matter
    again = sampling.generate(generator, text, 3, range(5), 2.0).images[-1]
    assert torch.equal(whole, again)
    other = sampling.generate(generator, text, 4, range(5), 2.0).images[-1]
    assert (whole - other).abs().max() > 1e-3
    z, _ = sampling.item_noise(3, range(500), 8, 4, 0.5)
    assert z.abs().max() < 0.5                                 # truncated noise


def test_untrained_generator_is_seeded_and_differs_from_the_trained(setup: Setup):
    trained = sampling.load_generator(sampling.read_checkpoint(setup.checkpoint))
    first = sampling.untrained_generator(setup.config, 5)
    second = sampling.untrained_generator(setup.config, 5)
    state = first.state_dict()
    assert all(torch.equal(state[k], v) for k, v in second.state_dict().items())
    text = _encoded(setup, 3)
    images = [sampling.generate(g, text, 0, range(3), 2.0).images[-1]
              for g in (trained, first)]
    assert (images[0] - images[1]).abs().max() > 1e-2


def test_tokenize_reports_unknown_and_truncated_words(setup: Setup):
    batch = sampling.tokenize_captions(["A red zorblax, quux!", "a b c d e f"], setup.vocab, 4)
    assert batch.unknown[0] == ["quux", "zorblax"]
    assert batch.lengths.tolist() == [4, 4] and batch.truncated == [0, 2]
    assert batch.captions[0, 2].item() == batch.captions[0, 3].item() == 1  # <unk>
    with pytest.raises(CpganError, match="no word"):
        sampling.tokenize_captions(["a circle", " ?! "], setup.vocab, 18)


# ------------------------------------------------------------------------------ cpgan-sample


def test_sample_is_byte_deterministic_for_a_seed(setup: Setup, tmp_path: Path):
    captions = ("a red ball on the grass", "two blue squares")
    runs = [(tmp_path / name, seed) for name, seed in (("a.png", 1), ("b.png", 1), ("c.png", 2))]
    for out, seed in runs:
        result = _sample(setup, out, *captions, seed=seed)
        assert result.exit_code == 0, result.output
        assert "cpgan step 40" in result.output
    assert _digest(runs[0][0]) == _digest(runs[1][0])
    assert _digest(runs[0][0]) != _digest(runs[2][0])
    import matplotlib.image

    picture = matplotlib.image.imread(runs[0][0])
    assert picture.shape[0] > 100 and picture.shape[1] > 100  # two rows of two images + text


def test_sample_reports_unknown_words(setup: Setup, tmp_path: Path):
    result = _sample(setup, tmp_path / "u.png", "a red zorblax near a circle")
    assert result.exit_code == 0
    assert "zorblax" in result.stderr and "<unk>" in result.stderr
    assert (tmp_path / "u.png").is_file()


@pytest.mark.parametrize("caption", ["", "?!  ..."])
def test_sample_refuses_a_caption_without_words(setup: Setup, tmp_path: Path, capsys, caption):
    with pytest.raises(SystemExit) as info:
        sample_main([caption, "--out", str(tmp_path / "e.png"), "--artifacts",
                     str(setup.artifacts)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no word" in err
    assert not (tmp_path / "e.png").exists()


def test_sample_refuses_a_bad_checkpoint_in_one_line(setup: Setup, tmp_path: Path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save({"format": 1, "kind": "cpgan-gan"}, bad)
    with pytest.raises(SystemExit) as info:
        sample_main(["a circle", "--out", str(tmp_path / "x.png"), "--checkpoint", str(bad),
                     "--artifacts", str(setup.artifacts)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "missing" in err
