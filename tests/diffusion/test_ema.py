"""The exponential moving average of weights (anomgen.diffusion.ema)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anomgen.diffusion.ema import EMA


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _set_all(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_shadow_is_the_geometric_average():
    model = _model()
    decay = 0.9
    ema = EMA(model, decay=decay, use_num_updates=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    values = [1.0, -2.0, 0.5]
    for v in values:
        _set_all(model, v)
        ema.update(model)
    # shadow = d³ p0 + d² (1 − d) v1 + d (1 − d) v2 + (1 − d) v3
    tail = sum(decay ** (len(values) - 1 - k) * (1 - decay) * v for k, v in enumerate(values))
    for name, p0 in start.items():
        torch.testing.assert_close(ema.shadow[name], decay ** len(values) * p0 + tail)
    assert ema.num_updates == 3


def test_num_updates_warmup_follows_the_reference_schedule():
    model = _model()
    ema = EMA(model, decay=0.999)  # use_num_updates by default
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k, v in enumerate([3.0, 1.0, 2.0], start=1):
        d = min(0.999, (1 + k) / (10 + k))
        assert ema.current_decay() == pytest.approx(d)
        _set_all(model, v)
        ema.update(model)
        expected = {n: d * e + (1 - d) * v for n, e in expected.items()}
    for name, e in expected.items():
        torch.testing.assert_close(ema.shadow[name], e)
    late = EMA(model, decay=0.99)
    late.num_updates = 10_000
    assert late.current_decay() == 0.99


def test_store_copy_restore_round_trip_and_buffers():
    model = _model()
    ema = EMA(model, decay=0.5, use_num_updates=False)
    model.train()
    model(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))  # moves the BatchNorm running stats
    _set_all(model, 2.0)
    ema.update(model)
    training = {k: v.clone() for k, v in model.state_dict().items()}

    ema.store(model)
    ema.copy_to(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ema.shadow[name])
    torch.testing.assert_close(model[1].running_mean, training["1.running_mean"])  # buffers copied, not averaged
    with torch.no_grad():
        for p in model.parameters():
            p.add_(7.0)  # scribble on the averaged weights
    ema.restore(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, training[key])
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model)

    with ema.average_parameters(model) as averaged:
        torch.testing.assert_close(averaged[0].weight, ema.shadow["0.weight"])
    torch.testing.assert_close(model[0].weight, training["0.weight"])


def test_state_dict_round_trip_is_strict():
    model = _model()
    ema = EMA(model, decay=0.9, use_num_updates=False)
    _set_all(model, 1.5)
    ema.update(model)
    ema.update(model)

    other = EMA(_model(seed=1), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates == 2 and other.use_num_updates is False
    for name, s in ema.shadow.items():
        torch.testing.assert_close(other.shadow[name], s)
    # the state is a copy: updating the original leaves the loaded one alone
    ema.update(model)
    assert not torch.equal(other.shadow["0.weight"], ema.shadow["0.weight"])

    wrong = EMA(nn.Linear(3, 4))
    with pytest.raises(KeyError, match="do not match"):
        wrong.load_state_dict(ema.state_dict())
    with pytest.raises(KeyError, match="do not match"):
        ema.update(nn.Linear(3, 4))


def test_shadow_lives_on_the_models_device_and_dtype():
    model = _model().double()
    ema = EMA(model)
    for name, p in model.named_parameters():
        assert ema.shadow[name].device == p.device and ema.shadow[name].dtype == torch.float64
        assert ema.shadow[name] is not p
    with pytest.raises(ValueError):
        EMA(model, decay=1.5)
