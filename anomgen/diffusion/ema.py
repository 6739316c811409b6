"""Exponential moving average of a model's weights (the score network is sampled with its EMA weights).

shadow ← d · shadow + (1 − d) · param after every optimiser step, with d = ``decay``, or, with ``use_num_updates``
(the reference implementation's default), d = min(decay, (1 + n) / (10 + n)) where n counts the updates so far, so
that the average follows the weights closely early in training. Buffers (e.g. normalisation statistics) are not
averaged: ``update`` copies the model's current buffers. The shadow lives on the model's device.

Evaluation with the averaged weights::

    ema.store(model)      # keep the training weights
    ema.copy_to(model)    # put the averaged weights in
    ...                   # sample / evaluate
    ema.restore(model)    # training weights back

or ``with ema.average_parameters(model): ...``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """EMA of the floating-point parameters of ``model`` (parameters with ``requires_grad=False`` are averaged too)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, use_num_updates: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.use_num_updates = bool(use_num_updates)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.dtype.is_floating_point
        }
        self.buffers: dict[str, torch.Tensor] = {name: b.detach().clone() for name, b in model.named_buffers()}
        self._backup: dict[str, torch.Tensor] | None = None

    def current_decay(self) -> float:
        """The decay the next ``update`` will use."""
        if self.use_num_updates:
            n = self.num_updates + 1
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards ``model``'s current weights; copies its buffers."""
        decay = self.current_decay()
        self.num_updates += 1
        params = self._float_params(model)
        self._check_names(params, self.shadow)
        for name, shadow in self.shadow.items():
            param = params[name].detach()
            if shadow.device != param.device:
                shadow = self.shadow[name] = shadow.to(param.device)
            shadow.lerp_(param.to(shadow.dtype), 1.0 - decay)
        for name, buf in model.named_buffers():
            self.buffers[name] = buf.detach().clone()

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights (and the copied buffers) into ``model``."""
        params = self._float_params(model)
        self._check_names(params, self.shadow)
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow)
        model_buffers = dict(model.named_buffers())
        for name, buf in self.buffers.items():
            if name in model_buffers:
                model_buffers[name].copy_(buf)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of ``model``'s current weights and buffers, for ``restore``."""
        backup = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
        backup.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
        self._backup = backup

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put the weights kept by ``store`` back into ``model``."""
        if self._backup is None:
            raise RuntimeError("EMA.restore called without a preceding EMA.store")
        for n, p in model.named_parameters():
            p.copy_(self._backup[f"param:{n}"])
        for n, b in model.named_buffers():
            b.copy_(self._backup[f"buffer:{n}"])
        self._backup = None

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context in which ``model`` holds the averaged weights; the training weights come back on exit."""
        self.store(model)
        self.copy_to(model)
        try:
            yield model
        finally:
            self.restore(model)

    def to(self, device=None, dtype=None) -> EMA:
        """Move the shadow (floating-point tensors also to ``dtype``)."""
        self.shadow = {n: s.to(device=device, dtype=dtype) for n, s in self.shadow.items()}
        self.buffers = {
            n: b.to(device=device, dtype=dtype) if b.is_floating_point() else b.to(device=device)
            for n, b in self.buffers.items()
        }
        return self

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "use_num_updates": self.use_num_updates,
            "num_updates": self.num_updates,
            "shadow": {n: s.clone() for n, s in self.shadow.items()},
            "buffers": {n: b.clone() for n, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict``; the shadow's names must match exactly (strict), the tensors keep this EMA's device."""
        self._check_names(state["shadow"], self.shadow)
        self.decay = float(state["decay"])
        self.use_num_updates = bool(state.get("use_num_updates", self.use_num_updates))
        self.num_updates = int(state["num_updates"])
        self.shadow = {n: state["shadow"][n].to(self.shadow[n].device) for n in self.shadow}
        self.buffers = {
            n: b.to(self.buffers[n].device) if n in self.buffers else b.clone() for n, b in state["buffers"].items()
        }

    @staticmethod
    def _float_params(model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p for n, p in model.named_parameters() if p.dtype.is_floating_point}

    @staticmethod
    def _check_names(found: dict, expected: dict) -> None:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        if missing or unexpected:
            raise KeyError(f"EMA parameter names do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
