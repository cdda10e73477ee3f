"""pt_inception-2015-12-05 (pytorch-fid's FID Inception): layout, pool branches, loader, wiring.

The real weights file is not available offline: the layout test pins the parameter names and
shapes the file fits (torchvision's 1008-class Inception-v3), and a randomly initialised
network stands in for it everywhere else.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import inception_v3
from torchvision.models.inception import InceptionA, InceptionC, InceptionE

from cpgan.errors import CpganError
from cpgan.model.fid_inception import (
    FidInception,
    FidInceptionA,
    FidInceptionC,
    FidInceptionE,
    load_fid_inception,
)


def _randomise(model: FidInception, seed: int) -> FidInception:
    """He-scaled random weights and batch-norm statistics: torchvision's uninitialised
    defaults shrink the pool3 features to ~1e-8, where every comparison would pass."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.net.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) \
                * (2 / fan_in) ** 0.5
        elif isinstance(module, nn.BatchNorm2d):
            module.bias.data = torch.randn(module.bias.shape, generator=generator) * 0.1
            module.running_var.data = torch.rand(module.running_var.shape,
                                                 generator=generator) + 0.5
    return model


def _cheap_state(model: FidInception) -> dict[str, Tensor]:
    """The model's keys and shapes as one-element expanded tensors (tiny files to refuse)."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape)
            for k, v in model.net.state_dict().items()}


@pytest.fixture(scope="module")
def model() -> FidInception:
    return _randomise(FidInception(), 0)


@pytest.fixture(scope="module")
def weights(model: FidInception, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fid") / "pt_inception.pth"
    torch.save(model.net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def features(model: FidInception, images: Tensor) -> Tensor:
    with torch.no_grad():
        return model(images)


def _refusal(path: Path) -> str:
    with pytest.raises(CpganError) as info:
        load_fid_inception(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_layout_is_torchvision_inception_v3_with_1008_classes(model: FidInception):
    reference = inception_v3(weights=None, num_classes=1008, aux_logits=False,
                             init_weights=False).state_dict()
    ours = model.net.state_dict()
    assert list(ours) == list(reference)
    assert all(ours[k].shape == reference[k].shape for k in reference)
    assert tuple(ours["fc.weight"].shape) == (1008, 2048)
    net = model.net
    assert all(type(getattr(net, n)) is FidInceptionA for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"))
    assert all(type(getattr(net, n)) is FidInceptionC
               for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"))
    assert type(net.Mixed_7b) is FidInceptionE and not net.Mixed_7b.max_pool
    assert type(net.Mixed_7c) is FidInceptionE and net.Mixed_7c.max_pool


@pytest.mark.parametrize("fid_block, tv_block, pool_channels", [
    (lambda: FidInceptionA(192, pool_features=32), lambda: InceptionA(192, pool_features=32), 32),
    (lambda: FidInceptionC(768, channels_7x7=128), lambda: InceptionC(768, channels_7x7=128), 192),
    (lambda: FidInceptionE(1280, max_pool=False), lambda: InceptionE(1280), 192),
])
def test_average_pool_branches_ignore_the_padding(fid_block, tv_block, pool_channels):
    """A valid-pixel average of a constant image is that constant, corners included; counting
    the zero padding (torchvision) shrinks the corners to 4/9 of it."""
    torch.manual_seed(2)
    ours, theirs = fid_block().eval(), tv_block().eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.full((1, ours.branch1x1.conv.in_channels, 5, 5), 0.7)
    with torch.no_grad():
        expected = ours.branch_pool(x)
        assert expected.abs().sum() > 0
        assert torch.allclose(ours(x)[:, -pool_channels:], expected, atol=1e-5)
        assert not torch.allclose(theirs(x)[:, -pool_channels:], expected, atol=1e-3)
        # the other branches are torchvision's, unchanged
        assert torch.allclose(ours(x)[:, :-pool_channels], theirs(x)[:, :-pool_channels])


def test_mixed_7c_pool_branch_max_pools():
    """One positive spike per channel at the centre of a zero image: a 3x3 max pool copies it
    over the centre's 3x3 neighbourhood, built here by hand."""
    torch.manual_seed(3)
    block = FidInceptionE(2048, max_pool=True).eval()
    spikes = torch.rand(2048) + 0.5
    x = torch.zeros(1, 2048, 5, 5)
    x[0, :, 2, 2] = spikes
    pooled = torch.zeros_like(x)
    pooled[0, :, 1:4, 1:4] = spikes[:, None, None]
    averaging = FidInceptionE(2048, max_pool=False).eval()
    averaging.load_state_dict(block.state_dict())
    with torch.no_grad():
        expected = block.branch_pool(pooled)
        assert torch.allclose(block(x)[:, -192:], expected, atol=1e-5)
        assert not torch.allclose(averaging(x)[:, -192:], expected, atol=1e-3)


def test_whole_network_features_depend_on_mixed_7c_max_pool(model, images, features):
    swapped = FidInception()
    swapped.net.load_state_dict(model.net.state_dict())
    averaging = FidInceptionE(2048, max_pool=False)
    averaging.load_state_dict(model.net.Mixed_7c.state_dict())
    swapped.net.Mixed_7c = averaging.eval()
    with torch.no_grad():
        assert not torch.allclose(swapped(images[:1]), features[:1], atol=1e-3)


def test_features_are_pool3_of_a_bilinear_299_resize(model, images, features):
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert features.abs().mean() > 0.1
    resized = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(model(resized), features, atol=1e-5)
        logits, pool = model.predict(images[:1])
    assert logits.shape == (1, 1008) and torch.allclose(pool, features[:1], atol=1e-5)
    assert not features[0].allclose(features[1])


def test_state_dict_round_trips(model, weights, images, features):
    loaded = load_fid_inception(weights)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(images), features)
        other = _randomise(FidInception(), 4)
        assert not torch.allclose(other(images[:1]), features[:1], atol=1e-3)


def test_batch_norm_counters_may_be_absent(model, tmp_path):
    """Files saved before torch 0.4.1 lack num_batches_tracked; eval mode never reads it."""
    state = {k: v for k, v in model.net.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    loaded = load_fid_inception(path).net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_wrong_shape_missing_and_extra_keys_are_refused(model, tmp_path):
    state = _cheap_state(model)
    torch.save(state, tmp_path / "fits.pth")
    assert load_fid_inception(tmp_path / "fits.pth").net.fc.weight.shape == (1008, 2048)
    wrong = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(wrong, tmp_path / "wrong.pth")
    assert "fc.weight" in _refusal(tmp_path / "wrong.pth")
    missing = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.conv.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    assert "Mixed_7c.branch_pool.conv.weight" in _refusal(tmp_path / "missing.pth")
    extra = dict(state, **{"AuxLogits.fc.weight": torch.zeros(1000, 768)})
    torch.save(extra, tmp_path / "extra.pth")
    assert "AuxLogits.fc.weight" in _refusal(tmp_path / "extra.pth")
    dtype = dict(state, **{"fc.weight": state["fc.weight"].to(torch.int32)})
    torch.save(dtype, tmp_path / "dtype.pth")
    assert "fc.weight" in _refusal(tmp_path / "dtype.pth")


def test_non_state_dicts_and_missing_file_are_refused(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    assert "state dict" in _refusal(tmp_path / "list.pth")
    torch.save({"fc.weight": torch.zeros(3), "epoch": 3}, tmp_path / "mixed.pth")
    assert "state dict" in _refusal(tmp_path / "mixed.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert "readable" in _refusal(tmp_path / "text.pth")
    assert "not found" in _refusal(tmp_path / "absent.pth")


def test_weights_with_nan_are_refused(model, tmp_path):
    """A NaN weight would turn every FID feature into NaN; the file is named instead."""
    state = _cheap_state(model)
    state["Mixed_6e.branch7x7_1.conv.weight"] = state["Mixed_6e.branch7x7_1.conv.weight"].clone()
    state["Mixed_6e.branch7x7_1.conv.weight"].view(-1)[5] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    assert "entry 'Mixed_6e.branch7x7_1.conv.weight' holds NaN" in _refusal(tmp_path / "nan.pth")


class _Payload:
    """Unpickling this opens (creates) ``marker``: code a weights file must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live))).close()
    assert live.exists()  # the payload is real when unpickled
    marker = tmp_path / "marker"
    raw, saved = tmp_path / "raw.pth", tmp_path / "saved.pth"
    raw.write_bytes(pickle.dumps({"fc.weight": _Payload(marker)}, protocol=2))
    torch.save({"fc.weight": _Payload(marker)}, saved)
    for path in (raw, saved):
        _refusal(path)
        assert not marker.exists()


def test_evaluation_takes_fid_features_from_pt_inception(model, weights, images, features,
                                                         tmp_path):
    from cpgan.model.classifier import InceptionScorer
    from cpgan.trainer.evaluate import load_scoring

    with pytest.raises(CpganError, match=re.escape(str(weights))):
        load_scoring("toy", tmp_path / "classifier.pt", None, 64, weights)
    torch.manual_seed(5)
    inception = tmp_path / "inception.pth"
    torch.save(InceptionScorer().net.state_dict(), inception)
    plain = load_scoring("paper", tmp_path / "classifier.pt", inception, 64)
    assert plain.fid_network is None and "not comparable" in plain.fid_features
    scoring = load_scoring("paper", tmp_path / "classifier.pt", inception, 64, weights)
    assert "pt_inception-2015-12-05" in scoring.fid_features
    probs, pool = scoring.score(images[:1])
    assert probs.shape == (1, 1000) and torch.allclose(probs.sum(1), torch.ones(1))
    assert torch.equal(pool, features[:1])
