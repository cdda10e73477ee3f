"""The weight average shared by the detector and DAMSM trainers (trainer/averaging.py)."""
import math

import pytest
import torch
from torch import nn

from cpgan.trainer.averaging import WeightAverage


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_the_average_follows_the_ramped_decay_and_copies_integer_state():
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.9, ramp=2.0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    model(torch.randn(5, 3))  # BN statistics and its integer step count move too
    average.update(model)
    d = 0.9 * (1 - math.exp(-1 / 2.0))
    for key, value in average.model.state_dict().items():
        current = model.state_dict()[key]
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, d * start[key] + (1 - d) * current)
        else:
            assert torch.equal(value, current) and int(value) == 1
    assert average.updates == 1
    assert not any(p.requires_grad for p in average.model.parameters())
    assert not average.model.training


def test_the_average_is_a_copy_not_the_model():
    model = _model()
    average = WeightAverage(model, decay=0.5, ramp=1.0)
    with torch.no_grad():
        model[0].weight.zero_()
    assert not torch.equal(average.model[0].weight, model[0].weight)


@pytest.mark.parametrize("decay, ramp", [(0.0, 1.0), (1.0, 1.0), (0.5, 0.0)])
def test_a_decay_outside_zero_one_or_no_ramp_is_refused(decay, ramp):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_model(), decay, ramp)


def test_entries_not_followed_keep_the_copy_s_values():
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.5, ramp=1.0, follow={"0.weight", "0.bias"})
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    average.update(model)
    state = average.model.state_dict()
    assert not torch.equal(state["0.weight"], start["0.weight"])
    torch.testing.assert_close(state["1.weight"], start["1.weight"], rtol=0, atol=0)
    assert average.follow == ["0.weight", "0.bias"]


def test_following_an_entry_the_model_lacks_is_refused():
    with pytest.raises(ValueError, match="no such state entries"):
        WeightAverage(_model(), 0.5, 1.0, follow={"0.weight", "2.weight"})
