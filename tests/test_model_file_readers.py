"""Refusals of the model-file readers, one real malformed file per branch.

Every detector, captioner, GAN checkpoint, DAMSM encoder and Darknet cfg/weights file the
project reads is validated before use; a bad one must stop with a one-line
:class:`CpganError` that starts with the file's path and says what is wrong. The rest of the
suite reaches few of these refusals (tests/test_darknet.py, tests/test_sample.py and
tests/test_hostile_inputs.py cover others, which are not repeated here). Each case starts from
a valid file written by the project's own code, at toy sizes, and introduces one defect,
through the reader's public entry point. Some defects (a sparse weight, a tensor where a
number belongs, a memory path with use_memory off, a captioner without weights, a GAN
checkpoint whose state, config or step has the wrong type, an encoder file with a string or
zero size or no region settings) once made a reader crash with a traceback, a multi-line
message or a message without the file's name.

The trainers' resume checkpoints (GAN optimizer states; the detector's, captioner's and
DAMSM's epoch checkpoints) are restored into a freshly built run, as ``--resume`` does: an
Adam moment of another shape, a string epoch or a loss history of tensors once loaded and then
crashed training with a traceback, or went on with NaN weights.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from cpgan.config import AttentionConfig, Config, load_config
from cpgan.model.darknet import Darknet, read_weights
from cpgan.pipeline.detect import load_detector
from cpgan.pipeline.text import SPECIALS, Vocabulary
from cpgan.trainer import captioner, damsm, detector, gan, sampling
from cpgan.trainer.averaging import WeightAverage
from cpgan.trainer.resume import refusing_unfit_checkpoint

from builders import CFG, random_detector, write_encoder_file
from builders import refusal as refusal_at

refusal = partial(refusal_at, separator=":")  # a cfg names its line: "PATH:1: ..."
Edit = Callable[[dict[str, Any]], Any]

TINY = {"encoder.word_embed_dim": 8, "encoder.text_dim": 8, "encoder.backbone_width": 4,
        "gan.base_size": 8, "gan.stages": 2, "gan.gf_dim": 4, "gan.df_dim": 4, "gan.r_num": 1,
        "gan.z_dim": 8, "gan.condition_dim": 4, "gan.fgcd_patches": 2}


def edited(record: dict[str, Any], edit: Edit) -> dict[str, Any]:
    """A copy of ``record`` (its nested dicts copied too) after ``edit``; an edit that returns
    something else than None replaces the whole record."""
    copy = {k: dict(v) if isinstance(v, dict) else v for k, v in record.items()}
    replaced = edit(copy)
    return copy if replaced is None else replaced


def save(path: Path, value: Any) -> Path:
    torch.save(value, path)
    return path


def without(key: str, part: str | None = None) -> Edit:
    """Drop ``key`` from the record (from its dict ``part`` when given)."""
    def edit(record: dict[str, Any]) -> None:
        (record if part is None else record[part]).pop(key)
    return edit


def setting(key: str, value: Any, part: str | None = None) -> Edit:
    """Set ``key`` of the record (of its dict ``part`` when given) to ``value``."""
    def edit(record: dict[str, Any]) -> None:
        (record if part is None else record[part])[key] = value
    return edit


def replacing(key: str, value: Any, part: str | None = None) -> Edit:
    """As :func:`setting`, for a ``key`` the valid record has."""
    def edit(record: dict[str, Any]) -> None:
        target = record if part is None else record[part]
        assert key in target, key
        target[key] = value
    return edit


def poisoned(key: str, part: str, value: float = float("nan")) -> Edit:
    """One element of the tensor ``key`` of the dict ``part`` set to ``value`` (NaN)."""
    def edit(record: dict[str, Any]) -> None:
        tensor = record[part][key].clone()
        tensor.view(-1)[-1] = value
        record[part][key] = tensor
    return edit


def replaced_by(value: Any) -> Edit:
    """The whole record replaced by ``value``."""
    return lambda record: value


@pytest.fixture(scope="module")
def tiny_config() -> Config:
    return load_config("toy", overrides=TINY)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    words = ("a", "red", "blue", "circle", "square", "left", "of")
    return Vocabulary(SPECIALS + words, (0,) * len(SPECIALS) + (3,) * len(words), 1)


# ----------------------------------------------------------------------------- Darknet cfg


TOY_CFG = CFG.read_text()
CFG_DEFECTS = {
    "option before any section": ("batch=1\n" + TOY_CFG,
                                  ":1: option 'batch' before the first [section]"),
    "first section not [net]": (TOY_CFG.replace("\n[net]\n", "\n[maxpool]\n", 1),
                                ":1: a Darknet cfg must start with a [net] section"),
    "empty": ("# nothing but a comment\n", ":1: a Darknet cfg must start with a [net] section"),
    "second [net]": (TOY_CFG + "\n[net]\nwidth=128\n", "[net] may appear only once"),
}


@pytest.mark.parametrize("defect", sorted(CFG_DEFECTS))
def test_malformed_darknet_cfg_is_refused(tmp_path: Path, defect: str) -> None:
    text, phrase = CFG_DEFECTS[defect]
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    refusal(lambda: Darknet.from_cfg_file(path), path, phrase)


def test_darknet_cfg_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.cfg"
    path.write_bytes(TOY_CFG.replace("# yolov3-toy", "# café yolov3-toy", 1).encode("latin-1"))
    refusal(lambda: Darknet.from_cfg_file(path), path, "Darknet cfg is not UTF-8 text")


@pytest.mark.parametrize("size", [12, 16, 19])
def test_weights_shorter_than_their_64bit_header_are_refused(tmp_path: Path, size: int) -> None:
    """Version 0.2 announces a 20-byte header (64-bit ``seen``): 12 to 19 bytes cannot hold it."""
    path = tmp_path / "short.weights"
    path.write_bytes((np.array([0, 2, 0], "<i4").tobytes() + bytes(8))[:size])
    refusal(lambda: read_weights(random_detector(0), path), path,
            f"{size} bytes is too short for a Darknet weights header")


# ----------------------------------------------------------------------------- detector.pt


@pytest.fixture(scope="module")
def detector_record() -> dict[str, Any]:
    """models/detector.pt as train-detector writes it (cf. tests/test_sample.py)."""
    detector = random_detector(seed=3)
    return {"state_dict": {k: v.clone() for k, v in detector.state_dict().items()},
            "category_ids": [1, 2], "class_names": ["circle", "square"],
            "input_size": detector.input_size}


FIRST_CONV = "layers.0.conv.weight"


def _transposed(record: dict[str, Any]) -> None:
    record["state_dict"][FIRST_CONV] = record["state_dict"][FIRST_CONV].transpose(0, 1).clone()


NOT_A_STATE = "expected a dict with a 'state_dict' of tensors"
DETECTOR_DEFECTS: dict[str, tuple[Edit, str]] = {
    "a tensor, not a dict": (replaced_by(torch.zeros(3)), NOT_A_STATE),
    "no state_dict": (without("state_dict"), NOT_A_STATE),
    "state_dict a list": (setting("state_dict", [torch.zeros(1)]), NOT_A_STATE),
    "a string among the tensors": (replacing(FIRST_CONV, "w", "state_dict"), NOT_A_STATE),
    "a layer missing": (without(FIRST_CONV, "state_dict"), "its layers do not match"),
    "an extra layer": (setting("layers.99.conv.weight", torch.zeros(1), "state_dict"),
                       "its layers do not match"),
    "a sparse weight": (replacing(FIRST_CONV, torch.ones(8, 3, 3, 3).to_sparse(), "state_dict"),
                        "its weights cannot be loaded into"),
    "a NaN weight": (poisoned(FIRST_CONV, "state_dict"),
                     f"'state_dict' entry '{FIRST_CONV}' holds NaN or infinite values"),
    "an infinite running variance": (
        poisoned("layers.0.bn.running_var", "state_dict", float("inf")),
        "'state_dict' entry 'layers.0.bn.running_var' holds NaN or infinite values"),
    "a negative running variance": (
        poisoned("layers.0.bn.running_var", "state_dict", -1.0),
        "layers.0.bn.running_var holds a negative batch-norm variance"),
    "a transposed weight": (_transposed, f"{FIRST_CONV} has shape (3, 8, 3, 3), {CFG} needs "
                                         "(8, 3, 3, 3)"),
}


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("defect", sorted(DETECTOR_DEFECTS))
def test_malformed_detector_state_file_is_refused(tmp_path: Path, detector_record: dict[str, Any],
                                                  defect: str) -> None:
    edit, phrase = DETECTOR_DEFECTS[defect]
    path = save(tmp_path / "detector.pt", edited(detector_record, edit))
    refusal(lambda: load_detector(CFG, path), path, phrase)


@pytest.mark.parametrize("name", ["detector.pt", "detector.weights"])
def test_missing_detector_weights_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    refusal(lambda: load_detector(CFG, path), path, "detector weights not found")


def test_valid_detector_state_file_loads(tmp_path: Path, detector_record: dict[str, Any]) -> None:
    """Control: the record the defects start from is accepted."""
    path = save(tmp_path / "detector.pt", detector_record)
    model = load_detector(CFG, path)
    assert all(torch.equal(model.state_dict()[k], v)
               for k, v in detector_record["state_dict"].items())


# ----------------------------------------------------------------------------- captioner.pt

CAPTIONER_SIZES = {"vocab_size": 11, "feature_dim": 6, "num_classes": 2}
CAPTIONER_INPUTS = CAPTIONER_SIZES["feature_dim"] + CAPTIONER_SIZES["num_classes"]


@pytest.fixture(scope="module")
def captioner_record() -> dict[str, Any]:
    """models/captioner.pt as train-attention writes it, at toy sizes."""
    config = AttentionConfig(embed_dim=8, hidden_dim=8, attention_dim=8, dropout=0.0)
    torch.manual_seed(0)
    model = captioner.build_captioner(*CAPTIONER_SIZES.values(), config)
    encoding = captioner.RegionEncoding(CAPTIONER_SIZES["num_classes"],
                                        np.zeros(CAPTIONER_INPUTS, np.float32),
                                        np.ones(CAPTIONER_INPUTS, np.float32))
    return captioner._model_record(model, CAPTIONER_SIZES["feature_dim"], encoding, config, 10)


NOT_A_CAPTIONER = "expected a dict with state_dict and vocab_size, feature_dim, num_classes"
MEAN_SIZE = f"'input_mean' must be a tensor of {CAPTIONER_INPUTS} values"
STD_SIZE = f"'input_std' must be a tensor of {CAPTIONER_INPUTS} values"
UNFIT = "weights do not fit the stored sizes"
CAPTIONER_DEFECTS: dict[str, tuple[Edit, str]] = {
    "a list, not a dict": (replaced_by([1, 2]), NOT_A_CAPTIONER),
    "no hidden_dim": (without("hidden_dim"), NOT_A_CAPTIONER),
    "a float embed_dim": (setting("embed_dim", 8.0), NOT_A_CAPTIONER),
    "a tensor vocab_size": (setting("vocab_size", torch.tensor(11)), NOT_A_CAPTIONER),
    "a boolean feature_dim": (setting("feature_dim", True), NOT_A_CAPTIONER),
    "no state_dict": (without("state_dict"), NOT_A_CAPTIONER),
    "state_dict a tensor": (setting("state_dict", torch.zeros(2)), NOT_A_CAPTIONER),
    "a negative embed_dim": (replacing("embed_dim", -8), "do not build a captioner"),
    "dropout above 1": (replacing("dropout", 2.0), "do not build a captioner"),
    "dropout a word": (replacing("dropout", "half"), "do not build a captioner"),
    "no input_mean": (without("input_mean"), MEAN_SIZE),
    "input_mean one value short": (setting("input_mean", torch.zeros(CAPTIONER_INPUTS - 1)),
                                   MEAN_SIZE),
    "input_std a list": (setting("input_std", [1.0] * CAPTIONER_INPUTS), STD_SIZE),
    "input_std 2-d": (setting("input_std", torch.ones(1, CAPTIONER_INPUTS)), STD_SIZE),
    "num_classes not matching the statistics": (
        setting("num_classes", 3),
        f"'input_mean' must be a tensor of {CAPTIONER_INPUTS + 1} values"),
    "a weight missing": (without("embed.weight", "state_dict"), UNFIT),
    "an unexpected weight": (setting("extra.weight", torch.zeros(2), "state_dict"), UNFIT),
    "hidden_dim not that of the weights": (setting("hidden_dim", 16), UNFIT),
    "a weight of another shape": (replacing("embed.weight", torch.zeros(11, 9), "state_dict"),
                                  UNFIT),
    "a string among the weights": (replacing("embed.weight", "w", "state_dict"), UNFIT),
    "a NaN weight": (poisoned("embed.weight", "state_dict"),
                     "'state_dict' entry 'embed.weight' holds NaN or infinite values"),
    "a NaN in input_mean": (setting("input_mean", torch.full((CAPTIONER_INPUTS,), float("nan"))),
                            "input statistics entry 'input_mean' holds NaN or infinite values"),
    "an infinite input_std": (setting("input_std", torch.full((CAPTIONER_INPUTS,), float("inf"))),
                              "input statistics entry 'input_std' holds NaN or infinite values"),
    "a zero in input_std": (setting("input_std", torch.zeros(CAPTIONER_INPUTS)),
                            "'input_std' must be positive"),
    "a negative input_std": (setting("input_std", -torch.ones(CAPTIONER_INPUTS)),
                             "'input_std' must be positive"),
}


@pytest.mark.parametrize("defect", sorted(CAPTIONER_DEFECTS))
def test_malformed_captioner_file_is_refused(tmp_path: Path, captioner_record: dict[str, Any],
                                             defect: str) -> None:
    edit, phrase = CAPTIONER_DEFECTS[defect]
    path = tmp_path / "captioner.pt"
    captioner.save_captioner(path, edited(captioner_record, edit))
    refusal(lambda: captioner.load_captioner(path), path, phrase)


def test_valid_captioner_file_loads(tmp_path: Path, captioner_record: dict[str, Any]) -> None:
    path = tmp_path / "captioner.pt"
    captioner.save_captioner(path, captioner_record)
    model, encoding, sizes = captioner.load_captioner(path, 11, 6)
    assert encoding.num_classes == 2 and sizes["hidden_dim"] == 8 and not model.training


# ----------------------------------------------------------------------------- GAN checkpoint


@pytest.fixture(scope="module")
def gan_record(tiny_config: Config, vocab: Vocabulary) -> dict[str, Any]:
    """runs/<name>/checkpoint.pt as the GAN trainer writes it (no memory), at tiny sizes."""
    state = gan.build_state(tiny_config, True, torch.device("cpu"))
    encoders = gan.Encoders(None, None, "models/damsm-no-memory-no-oaie.pt", None)
    info = gan.RunInfo(tiny_config, gan.Switches(use_memory=False, use_objects=False), encoders,
                       len(vocab), steps_per_epoch=5, total_steps=10)
    return gan.make_checkpoint(state, info)


def in_state(part: str, value: Any) -> Edit:
    """The first entry of the state dict ``part`` set to ``value``."""
    def edit(record: dict[str, Any]) -> None:
        record[part][next(iter(record[part]))] = value
    return edit


def nan_in_state(part: str) -> Edit:
    """A NaN in the first weight of the state dict ``part``."""
    def edit(record: dict[str, Any]) -> None:
        poisoned(next(iter(record[part])), part)(record)
    return edit


NONFINITE = "holds NaN or infinite values"


def _z_dim_a_matrix(record: dict[str, Any]) -> None:
    record["config"]["gan"] = {**record["config"]["gan"], "z_dim": torch.zeros(3, 3)}


NOT_PLAIN = "holds something other than plain settings"
NOT_OURS = "not a CPGAN GAN checkpoint (format 1, kind cpgan-gan)"
RESUME_DEFECTS: dict[str, tuple[Edit, str]] = {
    "a list, not a dict": (replaced_by([1, 2]), NOT_OURS),
    "another kind": (setting("kind", "damsm"), NOT_OURS),
    "another format": (setting("format", 2), NOT_OURS),
    "no kind": (without("kind"), NOT_OURS),
    "format a tensor of two values": (setting("format", torch.tensor([1, 1])), NOT_OURS),
    "no rng": (without("rng"), "checkpoint keys differ from the contract (rng)"),
    "no optimizer_d": (without("optimizer_d"),
                       "checkpoint keys differ from the contract (optimizer_d)"),
    "a key beyond the contract": (setting("notes", "x"),
                                  "checkpoint keys differ from the contract (notes)"),
    "a string in generator": (in_state("generator", "w"),
                              "'generator' is not a state dict of tensors"),
    "a list in discriminators": (in_state("discriminators", [1.0]),
                                 "'discriminators' is not a state dict of tensors"),
    "an int in generator_ema": (in_state("generator_ema", 3),
                                "'generator_ema' is not a state dict of tensors"),
    "generator_ema an int": (setting("generator_ema", 3),
                             "'generator_ema' is not a state dict of tensors"),
    "config a list": (setting("config", [1]), "'config' is not a dict of settings"),
    "step a string": (setting("step", "40"), "'step' must be a non-negative integer"),
    "a negative step": (setting("step", -1), "'step' must be a non-negative integer"),
    "a tensor for a config setting": (_z_dim_a_matrix, f"'config' {NOT_PLAIN}"),
    "vocab_size a tensor": (setting("vocab_size", torch.tensor([7, 7])),
                            f"'vocab_size' {NOT_PLAIN}"),
    "a tensor among the switches": (setting("use_fgcd", torch.tensor([True, False]), "switches"),
                                    f"'switches' {NOT_PLAIN}"),
    "encoders a bytes path": (setting("encoders", b"models/damsm.pt"), f"'encoders' {NOT_PLAIN}"),
    "a NaN in discriminators": (nan_in_state("discriminators"),
                                re.compile(f"'discriminators' entry '.+' {NONFINITE}")),
}


@pytest.mark.parametrize("defect", sorted(RESUME_DEFECTS))
def test_malformed_checkpoint_to_resume_is_refused(tmp_path: Path, gan_record: dict[str, Any],
                                                   defect: str) -> None:
    edit, phrase = RESUME_DEFECTS[defect]
    path = tmp_path / "checkpoint.pt"
    gan.save_checkpoint(path, edited(gan_record, edit))
    refusal(lambda: gan.read_checkpoint(path), path, phrase)


NOT_CONFIG = "'config' is not a resolved config (preset and the data, detector"
SWITCHES = "'switches' must map use_memory, use_objects, use_fgcd to booleans"
RELATIVE = "'encoders' must be a path relative to the artifacts root"
NOT_STATE = "is not a state dict of tensors"
SAMPLING_DEFECTS: dict[str, tuple[Edit, str]] = {
    "a list, not a dict": (replaced_by([1, 2]), "not a GAN checkpoint (expected a dict)"),
    "a tensor, not a dict": (replaced_by(torch.zeros(2)), "not a GAN checkpoint (expected a dict)"),
    "format a tensor of two values": (setting("format", torch.tensor([1, 1])),
                                      "not a GAN checkpoint (kind 'cpgan-gan', format a Tensor;"),
    "format True": (setting("format", True),
                    "not a GAN checkpoint (kind 'cpgan-gan', format True;"),
    "kind a 2-d tensor": (setting("kind", torch.zeros(2, 2)),
                          "not a GAN checkpoint (kind a Tensor,"),
    "memory recorded while use_memory is off": (setting("memory", 3),
                                                "'memory' must be a relative path when use_memory"),
    "a 2-d tensor for a config setting": (_z_dim_a_matrix,
                                          "its config is not usable (command line: gan.z_dim"),
    "config a list": (setting("config", [1]), NOT_CONFIG),
    "config without preset": (without("preset", "config"), NOT_CONFIG),
    "config with a numeric preset": (replacing("preset", 1, "config"), NOT_CONFIG),
    "config without its gan section": (without("gan", "config"), NOT_CONFIG),
    "config with a string for a section": (replacing("encoder", "tiny", "config"), NOT_CONFIG),
    "switches without use_fgcd": (without("use_fgcd", "switches"), SWITCHES),
    "a switch given as 1": (replacing("use_fgcd", 1, "switches"), SWITCHES),
    "an unknown switch": (setting("use_magic", True, "switches"), SWITCHES),
    "switches a list": (setting("switches", [True, True, True]), SWITCHES),
    "absolute encoders path": (setting("encoders", "/models/damsm.pt"), RELATIVE),
    "empty encoders path": (setting("encoders", ""), RELATIVE),
    "encoders path a number": (setting("encoders", 3), RELATIVE),
    "negative vocab_size": (setting("vocab_size", -1),
                            "'vocab_size' must be a non-negative integer"),
    "step a string": (setting("step", "40"), "'step' must be a non-negative integer"),
    "step a boolean": (setting("step", True), "'step' must be a non-negative integer"),
    "epoch a float": (setting("epoch", 2.0), "'epoch' must be a non-negative integer"),
    "epoch a tensor": (setting("epoch", torch.tensor(2)), "'epoch' must be a non-negative integer"),
    "finished an int": (setting("finished", 1), "'finished' must be a boolean"),
    "finished a string": (setting("finished", "yes"), "'finished' must be a boolean"),
    "empty generator_ema": (setting("generator_ema", {}), f"'generator_ema' {NOT_STATE}"),
    "generator_ema a tensor": (setting("generator_ema", torch.zeros(2)),
                               f"'generator_ema' {NOT_STATE}"),
    "a string in generator": (in_state("generator", "w"), f"'generator' {NOT_STATE}"),
    "a number as a discriminators key": (setting(0, torch.zeros(1), "discriminators"),
                                         f"'discriminators' {NOT_STATE}"),
    "a NaN in generator_ema": (nan_in_state("generator_ema"),
                               re.compile(f"'generator_ema' entry '.+' {NONFINITE}")),
}


@pytest.mark.parametrize("defect", sorted(SAMPLING_DEFECTS))
def test_malformed_checkpoint_to_sample_from_is_refused(tmp_path: Path,
                                                        gan_record: dict[str, Any],
                                                        defect: str) -> None:
    edit, phrase = SAMPLING_DEFECTS[defect]
    path = tmp_path / "checkpoint.pt"
    gan.save_checkpoint(path, edited(gan_record, edit))
    refusal(lambda: sampling.read_checkpoint(path), path, phrase)


def test_valid_checkpoint_reads_for_resume_and_sampling(tmp_path: Path, tiny_config: Config,
                                                        gan_record: dict[str, Any]) -> None:
    path = tmp_path / "checkpoint.pt"
    gan.save_checkpoint(path, gan_record)
    assert gan.read_checkpoint(path)["step"] == 0
    checkpoint = sampling.read_checkpoint(path)
    assert checkpoint.config == tiny_config and checkpoint.memory is None


# ----------------------------------------------------------------------------- optimizer states


@pytest.fixture(scope="module")
def stepped_gan_record(tiny_config: Config, vocab: Vocabulary) -> dict[str, Any]:
    """A GAN checkpoint whose Adam states hold moments: one step of each optimizer on unit
    gradients."""
    state = gan.build_state(tiny_config, True, torch.device("cpu"))
    for optimizer in (state.optimizer_g, state.optimizer_d):
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.ones_like(param)
        optimizer.step()
    encoders = gan.Encoders(None, None, "models/damsm-no-memory-no-oaie.pt", None)
    info = gan.RunInfo(tiny_config, gan.Switches(use_memory=False, use_objects=False), encoders,
                       len(vocab), steps_per_epoch=5, total_steps=10)
    return copy.deepcopy(gan.make_checkpoint(state, info))


def in_moment(key: str, value: Callable[[Tensor], Any], part: str = "optimizer_g") -> Edit:
    """The entry ``key`` of the first parameter's state in ``part`` replaced by ``value(it)``."""
    def edit(record: dict[str, Any]) -> None:
        optimizer = copy.deepcopy(record[part])
        first = optimizer["state"][0]
        first[key] = value(first[key])
        record[part] = optimizer
    return edit


FIRST_PARAM = "optimizer state 'exp_avg' of parameter 0"
OPTIMIZER_DEFECTS: dict[str, tuple[Edit, str]] = {
    "a moment of another shape": (in_moment("exp_avg", lambda t: torch.zeros(5, 5)),
                                  f"{FIRST_PARAM} has shape (5, 5), the parameter ("),
    "a NaN moment": (in_moment("exp_avg", lambda t: torch.full_like(t, float("nan"))),
                     f"{FIRST_PARAM} is not finite floating-point"),
    "an infinite moment in D's optimizer": (
        in_moment("exp_avg", lambda t: torch.full_like(t, float("inf")), "optimizer_d"),
        f"{FIRST_PARAM} is not finite floating-point"),
    "a string moment": (in_moment("exp_avg", lambda t: "w"),
                        f"{FIRST_PARAM} is not a dense tensor"),
    "a sparse moment": (in_moment("exp_avg", lambda t: t.to_sparse()),
                        f"{FIRST_PARAM} is not a dense tensor"),
    "a negative second moment": (in_moment("exp_avg_sq", lambda t: -torch.ones_like(t)),
                                 "optimizer state 'exp_avg_sq' of parameter 0 holds negative"),
    "a negative step": (in_moment("step", lambda t: torch.tensor(-1.0)),
                        "optimizer state 'step' of parameter 0 is not a non-negative scalar"),
    "a step of two values": (in_moment("step", lambda t: torch.ones(2)),
                             "optimizer state 'step' of parameter 0 is not a non-negative"),
}


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("defect", sorted(OPTIMIZER_DEFECTS))
def test_checkpoint_with_unfit_optimizer_state_is_refused_at_resume(
        tmp_path: Path, tiny_config: Config, stepped_gan_record: dict[str, Any],
        defect: str) -> None:
    """Adam's load_state_dict takes any per-parameter state; without the check a moment of
    another shape crashed the first step with a traceback, and a NaN one made G NaN."""
    edit, phrase = OPTIMIZER_DEFECTS[defect]
    path = tmp_path / "checkpoint.pt"
    gan.save_checkpoint(path, edited(stepped_gan_record, edit))
    fresh = gan.build_state(tiny_config, True, torch.device("cpu"))
    refusal(lambda: gan.restore_state(fresh, gan.read_checkpoint(path), path), path,
            f"checkpoint does not fit this run ({phrase}")


def test_stepped_checkpoint_restores_its_moments(tmp_path: Path, tiny_config: Config,
                                                 stepped_gan_record: dict[str, Any]) -> None:
    path = tmp_path / "checkpoint.pt"
    gan.save_checkpoint(path, stepped_gan_record)
    fresh = gan.build_state(tiny_config, True, torch.device("cpu"))
    gan.restore_state(fresh, gan.read_checkpoint(path), path)
    restored = fresh.optimizer_g.state_dict()["state"][0]
    saved = stepped_gan_record["optimizer_g"]["state"][0]
    assert torch.equal(restored["exp_avg"], saved["exp_avg"])
    assert float(restored["step"]) == 1.0


# ------------------------------------------------- epoch checkpoints: detector, captioner, DAMSM


def in_part(part: str, key: str, value: Any) -> Edit:
    """``record[part][key]`` set to ``value``, ``record[part]`` copied first."""
    def edit(record: dict[str, Any]) -> None:
        record[part] = {**record[part], key: value}
    return edit


def in_group(key: str, value: Any) -> Edit:
    """The optimizer's first parameter group's ``key`` set to ``value``."""
    def edit(record: dict[str, Any]) -> None:
        optimizer = copy.deepcopy(record["optimizer"])
        optimizer["param_groups"][0][key] = value
        record["optimizer"] = optimizer
    return edit


def restoring(state: Any, record: dict[str, Any], path: Path) -> Callable[[], None]:
    """What the trainers do with a matched checkpoint: ``state.restore`` under the refusal."""
    def restore() -> None:
        with refusing_unfit_checkpoint(path):
            state.restore(record)
    return restore


def detector_run(tiny_config: Config) -> detector.TrainState:
    """A detector training run at toy size with a weight average, as train_detector starts it."""
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config.detector, train_average_decay=0.9)
    return detector._new_run(Darknet.from_cfg_file(CFG), config, total_steps=10)


@pytest.fixture(scope="module")
def detector_run_record(tiny_config: Config) -> dict[str, Any]:
    """models/detector.ckpt.pt after epoch 1 of 2, one image recorded as failed."""
    run = detector_run(tiny_config)
    run.epoch, run.seen, run.failed = 1, 16, {5: "truncated JPEG"}
    return copy.deepcopy(run.to_checkpoint({"epochs": 2}))


FAILED = "'failed_ids' and 'failed_reasons' must be lists of image ids and messages of one"
SWITCHED = "weight averaging was switched on or off since it was written"
DETECTOR_RUN_DEFECTS: dict[str, tuple[Edit, str]] = {
    "epoch past the run's epochs": (replacing("epoch", 3),
                                    "'epoch' must be an integer from 0 up to 2"),
    "epoch a string": (replacing("epoch", "1"), "'epoch' must be an integer from 0 up to 2"),
    "seen negative": (replacing("seen", -1), "'seen' must be an integer from 0, got -1"),
    "seen a float": (replacing("seen", 16.0), "'seen' must be an integer from 0"),
    "average_updates a tensor": (replacing("average_updates", torch.tensor(3)),
                                 "'average_updates' must be an integer from 0"),
    "no average while averaging is on": (replacing("average", None), SWITCHED),
    "a failed id as a string": (replacing("failed_ids", ["5"]), FAILED),
    "a failed reason as a number": (replacing("failed_reasons", [404]), FAILED),
    "more failed ids than reasons": (replacing("failed_ids", [5, 6]), FAILED),
    "failed ids a tensor": (replacing("failed_ids", torch.tensor([5])), FAILED),
    "the schedule's position a string": (in_part("scheduler", "last_epoch", "3"),
                                         "'last_epoch' must be an integer from 0"),
    "the schedule's step count negative": (in_part("scheduler", "_step_count", -2),
                                           "'_step_count' must be an integer from 0"),
    "a NaN base rate": (in_part("scheduler", "base_lrs", [float("nan")] * 2),
                        "the schedule's 'base_lrs' must be a list of finite numbers"),
    "a base rate too few": (in_part("scheduler", "base_lrs", [1e-3]),
                            "the schedule's 'base_lrs' must be 2 rates of at least 0"),
    "other Adam betas": (in_group("betas", (0.5, 0.9)),
                         "optimizer setting 'betas' of group 0 is (0.5, 0.9), this run (0.9,"),
    "an unknown optimizer setting": (in_group("nesterov", True),
                                     "optimizer setting 'nesterov' of group 0 is True, this run "
                                     "None"),
    "a NaN learning rate": (in_group("lr", float("nan")),
                            "optimizer learning rate of group 0 is nan"),
}


@pytest.mark.parametrize("defect", sorted(DETECTOR_RUN_DEFECTS))
def test_unfit_detector_checkpoint_is_refused_at_resume(tmp_path: Path, tiny_config: Config,
                                                        detector_run_record: dict[str, Any],
                                                        defect: str) -> None:
    edit, phrase = DETECTOR_RUN_DEFECTS[defect]
    path = tmp_path / "detector.ckpt.pt"
    refusal(restoring(detector_run(tiny_config), edited(detector_run_record, edit), path),
            path, f"checkpoint does not fit this run ({phrase}")


def test_detector_checkpoint_restores(tiny_config: Config,
                                      detector_run_record: dict[str, Any]) -> None:
    run = detector_run(tiny_config)
    run.restore(detector_run_record)
    assert (run.epoch, run.seen, run.failed) == (1, 16, {5: "truncated JPEG"})


def captioner_run() -> captioner.TrainState:
    config = AttentionConfig(embed_dim=8, hidden_dim=8, attention_dim=8, dropout=0.0)
    torch.manual_seed(0)
    model = captioner.build_captioner(*CAPTIONER_SIZES.values(), config)
    return captioner.TrainState(model, torch.optim.Adam(model.parameters()), 0, [], [])


@pytest.fixture(scope="module")
def captioner_run_record() -> dict[str, Any]:
    """models/captioner.ckpt.pt after two epochs."""
    run = captioner_run()
    run.epoch, run.train_loss, run.val_loss = 2, [1.5, 1.2], [1.6, 1.4]
    return copy.deepcopy(run.to_checkpoint({}))


LOSSES = "must be a list of finite numbers"
CAPTIONER_RUN_DEFECTS: dict[str, tuple[Edit, str]] = {
    "train_loss a tensor": (replacing("train_loss", torch.tensor([1.5, 1.2])),
                            f"'train_loss' {LOSSES}"),
    "a NaN val_loss": (replacing("val_loss", [float("nan"), 1.4]), f"'val_loss' {LOSSES}"),
    "a string among the losses": (replacing("train_loss", ["1.5", 1.2]), f"'train_loss' {LOSSES}"),
    "a loss short": (replacing("val_loss", [1.6]),
                     "'train_loss' and 'val_loss' must hold one loss per epoch (2)"),
}


@pytest.mark.parametrize("defect", sorted(CAPTIONER_RUN_DEFECTS))
def test_unfit_captioner_checkpoint_is_refused_at_resume(tmp_path: Path,
                                                         captioner_run_record: dict[str, Any],
                                                         defect: str) -> None:
    edit, phrase = CAPTIONER_RUN_DEFECTS[defect]
    path = tmp_path / "captioner.ckpt.pt"
    refusal(restoring(captioner_run(), edited(captioner_run_record, edit), path), path,
            f"checkpoint does not fit this run ({phrase}")


def damsm_run(tiny_config: Config, vocab: Vocabulary) -> damsm.TrainState:
    """A DAMSM run (no memory, no objects) with a weight average, as train_damsm starts it."""
    torch.manual_seed(0)
    text = damsm.build_text_encoder(len(vocab), tiny_config.encoder, None)
    image = damsm.build_image_encoder(tiny_config.encoder, None)
    parameters = [p for p in [*text.parameters(), *image.parameters()] if p.requires_grad]
    run = damsm.TrainState(text, image, torch.optim.Adam(parameters, betas=damsm.ADAM_BETAS))
    run.average = WeightAverage(run.encoders(), 0.99, 1.0, follow=run.learned_keys())
    return run


@pytest.fixture(scope="module")
def damsm_run_record(tiny_config: Config, vocab: Vocabulary) -> dict[str, Any]:
    """models/damsm-no-memory-no-oaie.ckpt.pt after one epoch, one image recorded as failed."""
    run = damsm_run(tiny_config, vocab)
    run.epoch, run.history = 1, [{"epoch": 1.0, "train_loss": 3.2, "r_precision": 0.4}]
    run.failed, run.failed_indices = {9: "truncated JPEG"}, {4}
    return copy.deepcopy(run.to_checkpoint({}))


HISTORY = "'history' must hold one dict of metrics per epoch (1)"
DAMSM_RUN_DEFECTS: dict[str, tuple[Edit, str]] = {
    "history a row short": (replacing("history", []), HISTORY),
    "history a dict": (replacing("history", {"epoch": 1.0}), HISTORY),
    "a number as a metric's name": (replacing("history", [{1: 0.4}]), HISTORY),
    "a NaN metric": (replacing("history", [{"r_precision": float("nan")}]),
                     f"'history' metrics {LOSSES}"),
    "a string metric": (replacing("history", [{"r_precision": "0.4"}]),
                        f"'history' metrics {LOSSES}"),
    "a failed index as a string": (replacing("failed_indices", ["4"]),
                                   "'failed_indices' must be a list of dataset positions"),
    "a negative failed index": (replacing("failed_indices", [-4]),
                                "'failed_indices' must be a list of dataset positions"),
    "fewer failed reasons than ids": (replacing("failed_reasons", []), FAILED),
    "no average while averaging is on": (replacing("average", None), SWITCHED),
    "negative average updates": (in_part("average", "updates", -1),
                                 "'updates' must be an integer from 0, got -1"),
    "other Adam betas": (in_group("betas", (0.9, 0.999)),
                         "optimizer setting 'betas' of group 0 is (0.9, 0.999), this run ("),
}


@pytest.mark.parametrize("defect", sorted(DAMSM_RUN_DEFECTS))
def test_unfit_damsm_checkpoint_is_refused_at_resume(tmp_path: Path, tiny_config: Config,
                                                     vocab: Vocabulary,
                                                     damsm_run_record: dict[str, Any],
                                                     defect: str) -> None:
    edit, phrase = DAMSM_RUN_DEFECTS[defect]
    path = tmp_path / "damsm.ckpt.pt"
    refusal(restoring(damsm_run(tiny_config, vocab), edited(damsm_run_record, edit), path),
            path, f"checkpoint does not fit this run ({phrase}")


def test_damsm_checkpoint_restores(tiny_config: Config, vocab: Vocabulary,
                                   damsm_run_record: dict[str, Any]) -> None:
    run = damsm_run(tiny_config, vocab)
    run.restore(damsm_run_record)
    assert run.history == [{"epoch": 1.0, "train_loss": 3.2, "r_precision": 0.4}]
    assert (run.failed, run.failed_indices) == ({9: "truncated JPEG"}, {4})


# ----------------------------------------------------------------------------- DAMSM encoders


@pytest.fixture(scope="module")
def encoder_record(tmp_path_factory: pytest.TempPathFactory, tiny_config: Config,
                   vocab: Vocabulary) -> dict[str, Any]:
    """models/damsm-no-memory-no-oaie.pt as train_damsm writes it, at tiny sizes."""
    models = tmp_path_factory.mktemp("models")
    path = write_encoder_file(models, vocab, tiny_config, seed=0)
    return torch.load(path, weights_only=True)


def in_config(key: str, value: Any) -> Edit:
    return replacing(key, value, "config")


TEXT_WEIGHT = "embedding.weight"
IMAGE_WEIGHT = "backbone.body.0.0.weight"
LACKS = "its 'config' lacks the encoder sizes"
DO_NOT_FIT = "weights do not fit the recorded sizes"
ENCODER_DEFECTS: dict[str, tuple[Edit, str]] = {
    "a list, not a dict": (replaced_by([1, 2]), "not a DAMSM encoder file (format 1 expected)"),
    "format a tensor of two values": (setting("format", torch.tensor([1, 1])),
                                      "not a DAMSM encoder file (format 1 expected)"),
    "config a list": (setting("config", [8, 8]), LACKS),
    "no config": (without("config"), LACKS),
    "config without text_dim": (without("text_dim", "config"), LACKS),
    "config without use_objects": (without("use_objects", "config"), LACKS),
    "no text_encoder": (without("text_encoder"), "'text_encoder' is not a state dict of tensors"),
    "text_encoder a tensor": (setting("text_encoder", torch.zeros(2)),
                              "'text_encoder' is not a state dict of tensors"),
    "a string in image_encoder": (replacing(IMAGE_WEIGHT, "w", "image_encoder"),
                                  "'image_encoder' is not a state dict of tensors"),
    "recorded for more words": (in_config("vocab_size", 12),
                                "encoders were trained for 12 words, the vocabulary has 11"),
    "a text weight missing": (without(TEXT_WEIGHT, "text_encoder"), DO_NOT_FIT),
    "a text weight of another shape": (replacing(TEXT_WEIGHT, torch.zeros(11, 9), "text_encoder"),
                                       DO_NOT_FIT),
    "an unexpected text weight": (setting("extra.weight", torch.zeros(1), "text_encoder"),
                                  DO_NOT_FIT),
    "an image weight missing": (without(IMAGE_WEIGHT, "image_encoder"), DO_NOT_FIT),
    "an unexpected image weight": (setting("extra.weight", torch.zeros(1), "image_encoder"),
                                   DO_NOT_FIT),
    "vocab_size a string": (in_config("vocab_size", "11"),
                            "its 'config' has an invalid vocab_size ('11')"),
    "a zero backbone_width": (in_config("backbone_width", 0),
                              "its 'config' has an invalid backbone_width (0)"),
    "an unknown backbone": (in_config("backbone", "vgg"),
                            "its 'config' has an invalid backbone ('vgg')"),
    "use_memory a string": (in_config("use_memory", "no"),
                            "its 'config' has an invalid use_memory ('no')"),
    "regions a number": (in_config("regions", 3),
                         "its 'config' has no usable region settings (3)"),
    "use_objects without regions": (in_config("use_objects", True),
                                    "its 'config' has no usable region settings (None)"),
    "a NaN text weight": (poisoned(TEXT_WEIGHT, "text_encoder"),
                          f"'text_encoder' entry '{TEXT_WEIGHT}' holds NaN or infinite values"),
    "an infinite image weight": (
        poisoned(IMAGE_WEIGHT, "image_encoder", float("-inf")),
        f"'image_encoder' entry '{IMAGE_WEIGHT}' holds NaN or infinite values"),
}


@pytest.mark.parametrize("defect", sorted(ENCODER_DEFECTS))
def test_malformed_encoder_file_is_refused(tmp_path: Path, encoder_record: dict[str, Any],
                                           tiny_config: Config, vocab: Vocabulary,
                                           defect: str) -> None:
    edit, phrase = ENCODER_DEFECTS[defect]
    path = save(tmp_path / "damsm.pt", edited(encoder_record, edit))
    refusal(lambda: damsm.load_pretrained_encoders(path, vocab, tiny_config), path, phrase)


@pytest.mark.parametrize("pooling", ["median", ["max"]])
def test_encoder_file_of_unknown_sentence_pooling_is_refused(
        tmp_path: Path, encoder_record: dict[str, Any], vocab: Vocabulary, pooling: Any) -> None:
    """Without a config to compare with, the file's own pooling must be one the code knows."""
    record = edited(encoder_record, in_config("sentence_pooling", pooling))
    path = save(tmp_path / "damsm.pt", record)
    refusal(lambda: damsm.load_pretrained_encoders(path, vocab), path,
            f"unknown sentence pooling {pooling!r}")


UNBUILDABLE_SIZES: dict[str, tuple[Edit, str]] = {
    "an odd text_dim": (in_config("text_dim", 7), "text encoder: hidden_dim must be even"),
    "an image_size the classifier backbone cannot take": (
        in_config("image_size", 60), "encoder.image_size / backbone_width: classifier backbone"),
}


@pytest.mark.parametrize("defect", sorted(UNBUILDABLE_SIZES))
def test_encoder_file_of_sizes_the_models_refuse_is_named(
        tmp_path: Path, encoder_record: dict[str, Any], vocab: Vocabulary, defect: str) -> None:
    """Without a config to compare with, a recorded size the encoders cannot be built with is
    refused in the file's name, not as a bare size error."""
    edit, phrase = UNBUILDABLE_SIZES[defect]
    path = save(tmp_path / "damsm.pt", edited(encoder_record, edit))
    refusal(lambda: damsm.load_pretrained_encoders(path, vocab), path, phrase)


SAMPLING_TEXT_DEFECTS: dict[str, tuple[Edit, str]] = {
    "recorded for more words": (in_config("vocab_size", 12),
                                "encoders have vocab_size = 12, the GAN run needs 11"),
    "another word embedding size": (in_config("word_embed_dim", 16),
                                    "encoders have word_embed_dim = 16, the GAN run needs 8"),
    "another text size": (in_config("text_dim", 16),
                          "encoders have text_dim = 16, the GAN run needs 8"),
    "a text weight missing": (without(TEXT_WEIGHT, "text_encoder"),
                              "text encoder weights do not fit the recorded sizes"),
    "a text weight of another shape": (replacing(TEXT_WEIGHT, torch.zeros(11, 9), "text_encoder"),
                                       "text encoder weights do not fit the recorded sizes"),
    "an unexpected text weight": (setting("extra.weight", torch.zeros(1), "text_encoder"),
                                  "text encoder weights do not fit the recorded sizes"),
    "config without word_embed_dim": (without("word_embed_dim", "config"), LACKS),
}


@pytest.mark.parametrize("defect", sorted(SAMPLING_TEXT_DEFECTS))
def test_malformed_encoder_file_to_sample_with_is_refused(
        tmp_path: Path, encoder_record: dict[str, Any], tiny_config: Config, vocab: Vocabulary,
        defect: str) -> None:
    edit, phrase = SAMPLING_TEXT_DEFECTS[defect]
    path = save(tmp_path / "damsm.pt", edited(encoder_record, edit))
    refusal(lambda: sampling.load_text_encoder(path, vocab, tiny_config, None), path, phrase)


def test_valid_encoder_file_loads(tmp_path: Path, encoder_record: dict[str, Any],
                                  tiny_config: Config, vocab: Vocabulary) -> None:
    path = save(tmp_path / "damsm.pt", encoder_record)
    text, image = damsm.load_pretrained_encoders(path, vocab, tiny_config)
    assert not text.uses_memory and not image.use_objects
    assert not sampling.load_text_encoder(path, vocab, tiny_config, None).training
