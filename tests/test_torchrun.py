"""``cpgan-train --stage gan`` under ``torchrun --nproc_per_node 2 --standalone`` (gloo, CPU).

Two processes split every epoch between them (half the steps of one process), rank 0 alone
writes the run folder and prints, and the saved modules are the plain (unwrapped) ones.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cpgan.config import load_config
from cpgan.pipeline.toy import generate_toy_coco
from cpgan.trainer import gan

from builders import toy_vocabulary, write_encoder_file

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
TINY = """
[encoder]
word_embed_dim = 8
text_dim = 8
image_size = 64
backbone_width = 4

[gan]
base_size = 8
stages = 2
gf_dim = 4
df_dim = 4
r_num = 1
z_dim = 4
condition_dim = 4
fgcd_patches = 2
batch_size = 2
epochs = 1
"""

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and TORCHRUN.is_file()),
    reason="torch.distributed with gloo (and torchrun) is not available")


@pytest.fixture(scope="module")
def artifacts_root(tmp_path_factory) -> Path:
    """vocab.json, the toy COCO and untrained --no-memory --no-oaie encoders in the
    train_damsm file format."""
    root = tmp_path_factory.mktemp("torchrun")
    coco = generate_toy_coco(root / "toy-coco", train_images=12, val_images=4, image_size=64,
                             seed=5, progress=False)
    vocab = toy_vocabulary(coco, save_to=root / "vocab.json")
    (root / "tiny.toml").write_text(TINY)
    config = load_config("toy", root / "tiny.toml")
    write_encoder_file(root / "models", vocab, config)  # no memory, no detector
    return root


def _args(root: Path, *extra: str) -> list[str]:
    return ["--stage", "gan", "--artifacts", str(root), "--config", str(root / "tiny.toml"),
            "--no-memory", "--no-oaie", "--checkpoint-every", "1", "--log-every", "1", *extra]


def test_two_gloo_processes_train_and_rank_zero_alone_writes(artifacts_root, tmp_path):
    logs = tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--standalone", "--log-dir", str(logs),
               "--redirects", "3", "-m", "cpgan.cli.train",
               *_args(artifacts_root, "--name", "ddp")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]

    folder = artifacts_root / "runs" / "ddp"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # 12 images / 2 ranks / batch 2, once each
    stdout = {p.parent.name: p.read_text() for p in logs.rglob("stdout.log")}
    assert set(stdout) == {"0", "1"}
    assert "gan [ddp]: 1 epochs (3 steps" in stdout["0"] and "x2 processes" in stdout["0"]
    assert stdout["1"] == ""
    record = json.loads((folder / "gan.provenance.json").read_text())
    assert record["params"]["processes"] == 2 and record["stage"] == "gan"
    assert not list(folder.rglob(".tmp-*"))

    config = load_config("toy", artifacts_root / "tiny.toml")
    single = gan.train_gan(artifacts_root / "toy-coco", artifacts_root, config,
                           _vocab(artifacts_root), gan.Switches(False, False, True),
                           name="single", progress=False, threads=1)
    assert single.steps == 6
    ddp, alone = _load(folder / "checkpoint.pt"), _load(single.checkpoint)
    for part in ("generator", "generator_ema", "discriminators"):
        assert _shapes(ddp[part]) == _shapes(alone[part]), part  # no DDP "module." prefixes
    assert _count(ddp["generator"]) == _count(alone["generator"]) > 0
    assert ddp["step"] == 3 and ddp["finished"] and ddp["epoch"] == 1


def _vocab(root: Path):
    from cpgan.pipeline.text import Vocabulary

    return Vocabulary.load(root / "vocab.json")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _count(state: dict) -> int:
    return sum(v.numel() for k, v in state.items() if v.is_floating_point()
               and "running_" not in k)
