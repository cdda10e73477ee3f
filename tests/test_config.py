from pathlib import Path

import pytest

from cpgan.config import config_defaults, fill_new_keys, load_config
from cpgan.errors import CpganError


def test_presets_carry_the_design_values():
    paper = load_config("paper")
    assert (paper.detector.input_size, paper.detector.num_regions, paper.detector.feature_dim) == (416, 36, 1024)
    assert (paper.gan.gf_dim, paper.gan.df_dim, paper.gan.r_num, paper.gan.batch_size) == (48, 96, 3, 72)
    assert (paper.encoder.gamma1, paper.encoder.gamma2, paper.encoder.gamma3) == (4.0, 5.0, 10.0)
    assert paper.gan.base_size * 2 ** (paper.gan.stages - 1) == 256
    assert (paper.gan.beta1, paper.gan.beta2, paper.gan.lr_g, paper.gan.lr_d, paper.gan.tiscl_lambda) == (0.5, 0.999, 2e-4, 2e-4, 50.0)
    toy = load_config("toy")
    assert toy.preset == "toy" and toy.detector.input_size < paper.detector.input_size


def test_user_file_overrides_preset(tmp_path: Path):
    user = tmp_path / "mine.toml"
    user.write_text("seed = 7\n[memory]\ntopk = 9\n[gan]\nlr_d = 1\n")
    config = load_config("toy", user)
    assert config.seed == 7 and config.memory.topk == 9
    assert config.gan.lr_d == 1.0 and isinstance(config.gan.lr_d, float)
    assert config.gan.batch_size == load_config("toy").gan.batch_size


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[memory]\ntopkk = 3\n", "unknown config key 'memory.topkk'"),
        ("[memroy]\ntopk = 3\n", "unknown config key 'memroy'"),
        ("[memory]\ntopk = 'five'\n", "memory.topk: expected int"),
        ("memory = 3\n", "expected a [memory] table"),
        ("[memory\n", "not valid TOML"),
        (None, "config file not found"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path: Path, text: str | None, fragment: str):
    user = tmp_path / "bad.toml"
    if text is not None:
        user.write_text(text)
    with pytest.raises(CpganError, match=None) as info:
        load_config("toy", user)
    message = str(info.value)
    assert fragment in message and str(user) in message and "\n" not in message


def test_overrides_and_unknown_preset():
    assert load_config("toy", overrides={"memory.topk": 3}).memory.topk == 3
    with pytest.raises(CpganError, match="unknown config key 'memory.nope'"):
        load_config("toy", overrides={"memory.nope": 3})
    with pytest.raises(CpganError, match="unknown preset"):
        load_config("huge")


def test_a_renamed_key_names_its_successors(tmp_path: Path):
    user = tmp_path / "old.toml"
    user.write_text("[gan]\nlr = 1e-3\n")
    with pytest.raises(CpganError, match=r"old.toml: unknown config key 'gan.lr' \(now gan.lr_g "
                                         r"and gan.lr_d\)"):
        load_config("toy", user)


def test_a_key_a_record_predates_is_filled_with_its_default_and_nothing_else():
    defaults = config_defaults("encoder", "gan")
    assert set(defaults) == {"encoder", "gan"} and defaults["gan"]["d_norm"] == "batch"
    current = {"run": "cpgan", "gan": {"d_norm": "spectral", "lr_g": 1e-3, "novel": 1},
               "encoder": {"gamma1": 4.0}, "limit": None}
    stored = {"run": "cpgan", "gan": {"lr_g": 1e-3}, "limit": None}
    filled = fill_new_keys(stored, current, defaults)
    # d_norm and the whole encoder section come from the defaults; "novel" has none
    assert filled == {"run": "cpgan", "gan": {"lr_g": 1e-3, "d_norm": "batch"},
                      "encoder": defaults["encoder"], "limit": None}
    assert stored == {"run": "cpgan", "gan": {"lr_g": 1e-3}, "limit": None}  # not modified
    recorded = {"gan": {"lr_g": 5e-4}}
    assert fill_new_keys(recorded, current, defaults)["gan"]["lr_g"] == 5e-4  # kept as recorded
    assert fill_new_keys(None, current, defaults) is None
