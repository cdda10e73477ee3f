"""Tests of the Darknet cfg builder and the .weights reader/writer (DESIGN "Detection")."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpgan.errors import CpganError
from cpgan.model.darknet import (
    ConvLayer,
    Darknet,
    default_feature_layer,
    describe_weights,
    expected_weights_bytes,
    format_description,
    parse_cfg,
    plan_network,
    read_cfg,
    read_weights,
    read_weights_header,
    write_weights,
)

CFG_DIR = Path(__file__).resolve().parent.parent / "configs" / "darknet"
YOLOV3, TINY, TOY = (CFG_DIR / f"{n}.cfg" for n in ("yolov3", "yolov3-tiny", "yolov3-toy"))


@pytest.fixture(scope="module")
def yolov3() -> Darknet:
    """yolov3.cfg on the meta device: shapes and sizes without allocating 62M floats."""
    with torch.device("meta"):
        return Darknet.from_cfg_file(YOLOV3)


def _randomized(cfg: Path, seed: int) -> Darknet:
    """A real model whose every stored tensor (BN statistics included) is random."""
    torch.manual_seed(seed)
    model = Darknet.from_cfg_file(cfg)
    with torch.no_grad():
        for layer in model.conv_layers():
            for tensor in layer.weight_tensors():
                tensor.copy_(torch.rand_like(tensor) + 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def toy_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Darknet, Path]:
    model = _randomized(TOY, seed=1)
    path = tmp_path_factory.mktemp("weights") / "toy.weights"
    write_weights(model, path, seen=12345)
    return model, path


def _stored(model: Darknet) -> list[torch.Tensor]:
    return [t.detach().clone() for layer in model.conv_layers() for t in layer.weight_tensors()]


# ----------------------------------------------------------------------------- structure


def test_yolov3_structure(yolov3: Darknet) -> None:
    assert len(yolov3.layers) == 107
    assert [s.layer for s in yolov3.yolo_specs] == [82, 94, 106]
    assert [s.stride for s in yolov3.yolo_specs] == [32, 16, 8]
    assert [s.mask for s in yolov3.yolo_specs] == [(6, 7, 8), (3, 4, 5), (0, 1, 2)]
    assert yolov3.yolo_specs[0].anchors == ((116, 90), (156, 198), (373, 326))
    assert yolov3.yolo_specs[2].anchors == ((10, 13), (16, 30), (33, 23))
    assert (yolov3.input_width, yolov3.input_height, yolov3.num_classes) == (416, 416, 80)
    assert yolov3.input_size == 416 and yolov3.max_stride == 32
    assert [yolov3.layer_info[i].sources for i in (83, 86, 95, 98)] == [(79,), (85, 61), (91,), (97, 36)]


def test_yolov3_shapes_at_416_and_layer_74(yolov3: Darknet) -> None:
    x = torch.empty(2, 3, 416, 416, device="meta")
    heads, kept = yolov3(x, keep_layers=(74, 61, 36))
    assert [tuple(h.shape) for h in heads] == [(2, 3, g, g, 85) for g in (13, 26, 52)]
    assert tuple(kept[74].shape) == (2, 1024, 13, 13)  # last stride-32 backbone layer
    assert tuple(kept[61].shape) == (2, 512, 26, 26)
    assert tuple(kept[36].shape) == (2, 256, 52, 52)
    info = yolov3.layer_info
    assert info[74].kind == "shortcut" and info[75].kind == "convolutional"
    assert max(i for i in range(82) if info[i].kind == "shortcut") == 74


def test_exact_weight_file_sizes(yolov3: Darknet) -> None:
    assert expected_weights_bytes(yolov3) == 248_007_048
    assert sum(p.numel() for p in yolov3.parameters()) + sum(
        b.numel() for n, b in yolov3.named_buffers() if "running" in n) == 62_001_757
    assert expected_weights_bytes(yolov3, cutoff=74) == 162_482_580  # darknet53.conv.74
    assert expected_weights_bytes(yolov3, major=0, minor=1) == 248_007_044
    with torch.device("meta"):
        tiny = Darknet.from_cfg_file(TINY)
    assert expected_weights_bytes(tiny) == 35_434_956


def test_tiny_structure_and_forward() -> None:
    torch.manual_seed(0)
    tiny = Darknet.from_cfg_file(TINY).eval()
    assert len(tiny.layers) == 24
    assert [s.layer for s in tiny.yolo_specs] == [16, 23]
    assert [s.mask for s in tiny.yolo_specs] == [(3, 4, 5), (1, 2, 3)]
    assert tiny.layer_info[11].stride == tiny.layer_info[10].stride == 32  # stride-1 maxpool
    assert tiny.layer_info[20].sources == (19, 8) and tiny.layer_info[8].stride == 16
    with torch.no_grad():
        heads, kept = tiny(torch.rand(1, 3, 64, 64), keep_layers=(11, 12))
    assert [tuple(h.shape) for h in heads] == [(1, 3, 2, 2, 85), (1, 3, 4, 4, 85)]
    assert tuple(kept[11].shape) == (1, 512, 2, 2) and tuple(kept[12].shape) == (1, 1024, 2, 2)


def test_toy_cfg_budget_and_feature_layer() -> None:
    torch.manual_seed(0)
    toy = Darknet.from_cfg_file(TOY).eval()
    assert (toy.input_width, toy.num_classes) == (128, 8)
    assert [s.layer for s in toy.yolo_specs] == [24, 32, 40]
    assert [s.stride for s in toy.yolo_specs] == [32, 16, 8]
    anchors = [a for s in toy.yolo_specs for a in s.anchors]
    assert min(min(a) for a in anchors) >= 0.15 * 128 - 1 and max(max(a) for a in anchors) <= 0.45 * 128 + 1
    assert 300_000 <= sum(p.numel() for p in toy.parameters()) <= 1_500_000
    kinds = {info.kind for info in toy.layer_info}
    assert kinds >= {"convolutional", "shortcut", "route", "upsample", "yolo"}
    with torch.no_grad():
        heads, kept = toy(torch.rand(2, 3, 128, 128), keep_layers=(20,))
    assert tuple(kept[20].shape) == (2, 256, 4, 4)
    assert [tuple(h.shape) for h in heads] == [(2, 3, g, g, 13) for g in (4, 8, 16)]


WIRING_CFG = """[net]
width=32
height=32
channels=3
[convolutional]
filters=4
size=3
stride=2
pad=1
activation=linear
[convolutional]
filters=4
size=3
stride=1
pad=1
activation=leaky
[maxpool]
size=2
stride=2
[upsample]
stride=2
[shortcut]
from=-3
activation=leaky
[route]
layers=-1,-5
[convolutional]
size=1
stride=1
pad=1
filters=7
activation=linear
[yolo]
mask=0
anchors=5,6
classes=2
num=1
"""


def test_forward_wiring_matches_hand_composition() -> None:
    torch.manual_seed(3)
    net = Darknet(parse_cfg(WIRING_CFG, "wiring.cfg")).eval()
    x = torch.randn(2, 3, 32, 32)
    convs = net.layers
    with torch.no_grad():
        heads, kept = net(x, keep_layers=(4, 5))
        a = convs[0].conv(x)
        b = F.leaky_relu(convs[1].conv(a), 0.1)
        up = F.interpolate(F.max_pool2d(b, 2, 2), scale_factor=2, mode="nearest")
        short = F.leaky_relu(up + b, 0.1)
        route = torch.cat([short, a], dim=1)
        head = convs[6].conv(route).view(2, 1, 7, 16, 16).permute(0, 1, 3, 4, 2)
    assert net.layer_info[5].sources == (4, 0)
    assert torch.allclose(kept[4], short, atol=1e-6)
    assert torch.allclose(kept[5], route, atol=1e-6)
    assert torch.allclose(heads[0], head, atol=1e-6)


def test_forward_rejects_bad_input_and_layers() -> None:
    net = Darknet(parse_cfg(WIRING_CFG, "wiring.cfg"))
    with pytest.raises(ValueError, match="multiple of stride 4"):
        net(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match="layer 7 is not a feature layer"):
        net(torch.zeros(1, 3, 32, 32), keep_layers=(7,))


def test_stride1_maxpool_matches_darknet_minus_inf_padding() -> None:
    """yolov3-tiny's size-2 stride-1 pool: last row/column take the max of valid cells only."""
    cfg = WIRING_CFG.replace("[maxpool]\nsize=2\nstride=2\n[upsample]\nstride=2\n",
                             "[maxpool]\nsize=2\nstride=1\n[maxpool]\nsize=1\nstride=1\n")
    net = Darknet(parse_cfg(cfg, "pool.cfg"))
    pool = net.layers[2]
    x = -torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # all negative: zero padding would give 0
    expected = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]])
    expected = torch.maximum(torch.maximum(expected, F.pad(expected[1:], (0, 0, 0, 1), value=-99)),
                             F.pad(expected[:, 1:], (0, 1), value=-99))
    expected = torch.maximum(expected, F.pad(expected[1:, 1:], (0, 1, 0, 1), value=-99))
    assert torch.equal(pool(x)[0, 0], expected)
    assert pool(x)[0, 0, 2, 2].item() == -9.0 and pool(x)[0, 0, 0, 2].item() == -3.0


def test_stride2_maxpool_on_odd_input_uses_darknet_output_size() -> None:
    pool = Darknet(parse_cfg(WIRING_CFG, "pool.cfg")).layers[2]
    x = torch.arange(25.0).view(1, 1, 5, 5)
    out = pool(x)[0, 0]  # Darknet: (5 + 1 - 2) // 2 + 1 = 3, last window only sees column 4
    assert out.shape == (3, 3)
    assert out[0].tolist() == [6.0, 8.0, 9.0] and out[2].tolist() == [21.0, 23.0, 24.0]


# ----------------------------------------------------------------------------- cfg errors


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("[maxpool]", "[local]"), r"bad\.cfg:17: unknown or malformed section"),
        (("size=3\nstride=1\npad=1\nactivation=leaky", "size=3\nstride=1\npad=1\ngroups=2\nactivation=leaky"),
         r"bad\.cfg:16: \[convolutional\] groups=2 cannot be honoured"),
        (("activation=leaky", "activation=mish"), r"bad\.cfg:16: \[convolutional\] activation=mish"),
        (("stride=1\npad=1\nactivation=leaky", "stride=1\nxnor=1\npad=1\nactivation=leaky"),
         r"bad\.cfg:15: \[convolutional\] key 'xnor' is not supported"),
        (("filters=7", "filters=8"), r"bad\.cfg:\d+: \[yolo\] classes=2 .*7 filters"),
        (("layers=-1,-5", "layers=-1,7"), r"bad\.cfg:26: \[route\] layers=-1,7 .*layer 7 is not an earlier"),
        (("layers=-1,-5", "layers=-1,-3"), r"\[route\] layers=-1,-3 .*different strides"),
        (("from=-3", "from=-2"), r"bad\.cfg:23: \[shortcut\] from=-2 .*does not match"),
        (("width=32", "width=30"), r"bad\.cfg:2: \[net\] width=30 .*multiple of the network's stride 4"),
        (("anchors=5,6", "anchors=5"), r"\[yolo\] anchors=5 .*need 2 values"),
        (("size=2\nstride=2", "size=2\nstride=2\nstride=3"), r"key 'stride' repeated"),
        (("pad=1\nactivation=linear", "pad=1\nactivation linear"), r"bad\.cfg:10: expected key=value"),
    ],
)
def test_cfg_errors_name_file_and_line(edit: tuple[str, str], message: str) -> None:
    text = WIRING_CFG.replace(edit[0], edit[1], 1)
    assert text != WIRING_CFG
    with pytest.raises(CpganError, match=message) as info:
        Darknet(parse_cfg(text, "bad.cfg"))
    assert "\n" not in str(info.value)


def test_missing_cfg_file_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(CpganError, match="missing.cfg: cannot read Darknet cfg"):
        Darknet.from_cfg_file(tmp_path / "missing.cfg")


def test_training_only_keys_are_accepted() -> None:
    text = WIRING_CFG.replace("num=1", "num=1\njitter=.3\nignore_thresh = .7\nrandom=1")
    text = text.replace("[net]", "[net]\n# comment\nbatch=64\nlearning_rate=0.001\nsteps=400000,450000")
    assert Darknet(parse_cfg(text, "ok.cfg")).yolo_specs[0].anchors == ((5.0, 6.0),)


# ----------------------------------------------------------------------------- weights


def test_weights_round_trip(toy_weights: tuple[Darknet, Path]) -> None:
    model, path = toy_weights
    assert path.stat().st_size == expected_weights_bytes(model)
    fresh = _randomized(TOY, seed=2)
    assert not torch.equal(_stored(fresh)[0], _stored(model)[0])
    header = read_weights(fresh, path)
    assert (header.major, header.minor, header.revision, header.seen) == (0, 2, 0, 12345)
    for a, b in zip(_stored(model), _stored(fresh)):
        assert torch.equal(a, b)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)[0][2], fresh(x)[0][2])


def test_weights_file_layout_is_darknet_order(toy_weights: tuple[Darknet, Path]) -> None:
    """Header then BN beta, gamma, mean, var, conv weight of layer 0, as Darknet writes."""
    model, path = toy_weights
    raw = path.read_bytes()
    assert np.frombuffer(raw[:12], "<i4").tolist() == [0, 2, 0]
    assert np.frombuffer(raw[12:20], "<i8").tolist() == [12345]
    first = model.layers[0]
    n = first.conv.out_channels
    floats = np.frombuffer(raw[20:], "<f4")
    assert np.array_equal(floats[:n], first.bn.bias.detach().numpy())
    assert np.array_equal(floats[n:2 * n], first.bn.weight.detach().numpy())
    assert np.array_equal(floats[2 * n:3 * n], first.bn.running_mean.numpy())
    assert np.array_equal(floats[3 * n:4 * n], first.bn.running_var.numpy())
    assert np.array_equal(floats[4 * n:4 * n + first.conv.weight.numel()],
                          first.conv.weight.detach().numpy().ravel())
    head = model.layers[model.yolo_specs[-1].layer - 1]  # no BN: bias then weight, at the end
    tail = floats[-(head.conv.weight.numel() + head.conv.out_channels):]
    assert np.array_equal(tail[:head.conv.out_channels], head.conv.bias.detach().numpy())


def test_header_with_32bit_seen(tmp_path: Path) -> None:
    model = _randomized(TOY, seed=4)
    path = tmp_path / "old.weights"
    size = write_weights(model, path, major=0, minor=1, revision=7, seen=99)
    assert size == path.stat().st_size == expected_weights_bytes(model, major=0, minor=1)
    assert size == expected_weights_bytes(model) - 4
    assert np.frombuffer(path.read_bytes()[:16], "<i4").tolist() == [0, 1, 7, 99]
    fresh = _randomized(TOY, seed=5)
    header = read_weights(fresh, path)
    assert (header.minor, header.revision, header.seen, header.nbytes) == (1, 7, 99, 16)
    assert all(torch.equal(a, b) for a, b in zip(_stored(model), _stored(fresh)))


def test_large_seen_survives_64bit_header(tmp_path: Path) -> None:
    model = _randomized(TOY, seed=6)
    path = tmp_path / "seen.weights"
    write_weights(model, path, seen=2**40 + 3)
    assert read_weights_header(path).seen == 2**40 + 3


@pytest.mark.parametrize("delta", [-4, -1, 4])
def test_wrong_size_refused_before_loading(toy_weights: tuple[Darknet, Path], tmp_path: Path,
                                           delta: int) -> None:
    model, path = toy_weights
    data = path.read_bytes()
    bad = tmp_path / "bad.weights"
    bad.write_bytes(data[:delta] if delta < 0 else data + b"\0" * delta)
    fresh = _randomized(TOY, seed=7)
    before = _stored(fresh)
    expected = expected_weights_bytes(model)
    with pytest.raises(CpganError) as info:
        read_weights(fresh, bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: expected {expected} bytes for {TOY}")
    assert f"found {expected + delta} bytes" in message and "\n" not in message
    assert all(torch.equal(a, b) for a, b in zip(before, _stored(fresh)))


def test_weights_for_another_cfg_refused(toy_weights: tuple[Darknet, Path]) -> None:
    with torch.device("meta"):
        tiny = Darknet.from_cfg_file(TINY)
    with pytest.raises(CpganError, match=f"expected 35434956 bytes for {TINY}"):
        read_weights(tiny, toy_weights[1])


def test_short_or_missing_file_refused(tmp_path: Path) -> None:
    model = _randomized(TOY, seed=8)
    short = tmp_path / "short.weights"
    short.write_bytes(b"\0" * 10)
    with pytest.raises(CpganError, match="short.weights: 10 bytes is too short"):
        read_weights(model, short)
    with pytest.raises(CpganError, match="nothing.weights: cannot read Darknet weights"):
        read_weights(model, tmp_path / "nothing.weights")


def test_non_finite_weights_refused(toy_weights: tuple[Darknet, Path], tmp_path: Path) -> None:
    data = bytearray(toy_weights[1].read_bytes())
    data[100:104] = np.array([np.nan], "<f4").tobytes()
    bad = tmp_path / "nan.weights"
    bad.write_bytes(bytes(data))
    with pytest.raises(CpganError, match="NaN or infinite"):
        read_weights(_randomized(TOY, seed=9), bad)


def test_negative_batchnorm_variance_refused(toy_weights: tuple[Darknet, Path],
                                              tmp_path: Path) -> None:
    model, path = toy_weights
    first = model.conv_layers()[0]
    beta, gamma, mean, _var, _weight = first.weight_tensors()
    offset = 20 + 4 * (beta.numel() + gamma.numel() + mean.numel())  # first running variance
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = np.array([-0.5], "<f4").tobytes()
    bad = tmp_path / "negvar.weights"
    bad.write_bytes(bytes(data))
    target = _randomized(TOY, seed=9)
    before = _stored(target)
    with pytest.raises(CpganError, match="negative batch-norm variance"):
        read_weights(target, bad)
    assert all(torch.equal(a, b) for a, b in zip(before, _stored(target)))


@pytest.mark.parametrize("cfg, layer, channels", [(YOLOV3, 74, 1024), (TINY, 12, 1024), (TOY, 20, 256)])
def test_default_feature_layer_is_the_stride32_backbone_output(cfg: Path, layer: int,
                                                               channels: int) -> None:
    plans = plan_network(read_cfg(cfg))[0]
    chosen = default_feature_layer(plans)
    assert chosen == layer
    assert plans[chosen].channels == channels and plans[chosen].stride == 32


def test_backbone_cutoff_round_trip(toy_weights: tuple[Darknet, Path], tmp_path: Path) -> None:
    model, full = toy_weights
    cutoff = 21  # the toy backbone: layers 0..20, like darknet53.conv.74 for yolov3
    path = tmp_path / "toy.conv.21"
    size = write_weights(model, path, cutoff=cutoff)
    assert size == path.stat().st_size == expected_weights_bytes(model, cutoff=cutoff)
    assert size < expected_weights_bytes(model)
    fresh = _randomized(TOY, seed=10)
    before = {id(t): t.clone() for layer in fresh.conv_layers() for t in layer.weight_tensors()}
    read_weights(fresh, path, cutoff=cutoff)
    for i, (mine, theirs) in enumerate(zip(fresh.layers, model.layers)):
        if not isinstance(mine, ConvLayer):
            continue
        for a, b in zip(mine.weight_tensors(), theirs.weight_tensors()):
            assert torch.equal(a, b if i < cutoff else before[id(a)])
    with pytest.raises(CpganError, match=r"\(cutoff 21, header v0\.2\), found"):
        read_weights(fresh, full, cutoff=cutoff)
    with pytest.raises(CpganError, match=r"\(all layers"):
        read_weights(fresh, path)


def test_describe_weights(toy_weights: tuple[Darknet, Path], tmp_path: Path) -> None:
    model, path = toy_weights
    full = describe_weights(TOY, path)
    assert full["total_params"] == sum(p.numel() for p in model.parameters())
    assert full["expected_bytes"] == full["actual_bytes"] == path.stat().st_size
    assert full["verdict"].startswith("OK")
    assert [row["output"] for row in full["layers"]][20] == "4x4x256"
    text = format_description(full)
    assert f"total parameters: {full['total_params']:,}" in text and full["verdict"] in text
    assert "   20  shortcut" in text
    partial = tmp_path / "toy.conv.21"
    write_weights(model, partial, cutoff=21)
    verdict = describe_weights(TOY, partial)
    assert verdict["matching_cutoffs"] == [20, 21]  # layer 20 is a shortcut: no weights
    assert verdict["verdict"].startswith("PARTIAL: ") and "cutoff 20..21" in verdict["verdict"]
    truncated = tmp_path / "cut.weights"
    truncated.write_bytes(path.read_bytes()[:-3])
    broken = describe_weights(TOY, truncated)
    assert broken["verdict"] == (f"MISMATCH: expected {full['expected_bytes']} bytes, "
                                 f"found {full['expected_bytes'] - 3} bytes (truncated)")


def test_cpu_inference_folding_keeps_outputs() -> None:
    """Folding BN into the convolutions (and NHWC order) changes only float rounding."""
    import copy

    from cpgan.model.darknet import for_cpu_inference

    torch.manual_seed(0)
    model = Darknet.from_cfg_file(TOY).eval()
    for layer in model.conv_layers():
        if layer.bn is not None:  # non-trivial statistics, or folding would be a no-op
            layer.bn.running_mean.uniform_(-0.5, 0.5)
            layer.bn.running_var.uniform_(0.5, 2.0)
            layer.bn.weight.data.uniform_(0.5, 1.5)
            layer.bn.bias.data.uniform_(-0.2, 0.2)
    folded = for_cpu_inference(copy.deepcopy(model))
    assert all(layer.bn is None for layer in folded.conv_layers())
    x = torch.rand(2, 3, model.input_size, model.input_size)
    with torch.no_grad():
        heads, kept = model(x, keep_layers=(20,))
        folded_heads, folded_kept = folded(x, keep_layers=(20,))
    for a, b in zip([*heads, kept[20]], [*folded_heads, folded_kept[20]]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
