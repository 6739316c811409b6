"""anomgen.progress: bars on a terminal, none in a log or a test's captured output, ANOMGEN_PROGRESS decides."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from anomgen.progress import PROGRESS_ENV, progress, progress_enabled


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("env", "terminal", "expected"), [
    (None, True, True), (None, False, False), ("0", True, False), ("off", True, False), ("1", False, True),
    ("true", False, True),
])
def test_bars_follow_the_terminal_unless_the_env_says(monkeypatch, env, terminal, expected):
    if env is None:
        monkeypatch.delenv(PROGRESS_ENV, raising=False)
    else:
        monkeypatch.setenv(PROGRESS_ENV, env)
    monkeypatch.setattr(sys, "stderr", _Terminal() if terminal else io.StringIO())
    assert progress_enabled() is expected
    assert list(progress(range(3), desc="work")) == [0, 1, 2]  # the items either way
    assert ("work" in sys.stderr.getvalue()) is expected


def test_a_caller_can_turn_its_bar_off(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert list(progress(range(2), desc="quiet", enabled=False)) == [0, 1]
    assert sys.stderr.getvalue() == ""


def test_ddim_inversion_shows_a_bar_over_its_timesteps(monkeypatch, capsys):
    from anomgen.diffusion.ddim import DDIMSchedule, ddim_invert

    monkeypatch.setenv(PROGRESS_ENV, "1")
    schedule = DDIMSchedule(num_inference_steps=3, num_train_timesteps=30)
    ddim_invert(lambda x, t: torch.zeros_like(x), torch.zeros(1, 3, 4, 4), schedule)
    err = capsys.readouterr().err
    assert "DDIM inversion" in err and "/2" in err  # 3 timesteps: 2 steps up from the clean image
    monkeypatch.setenv(PROGRESS_ENV, "0")
    ddim_invert(lambda x, t: torch.zeros_like(x), torch.zeros(1, 3, 4, 4), schedule)
    assert "DDIM inversion" not in capsys.readouterr().err


def test_feature_extraction_shows_a_bar(monkeypatch, capsys):
    from anomgen.encoders.base import extract_features

    monkeypatch.setenv(PROGRESS_ENV, "1")
    feats = extract_features(torch.nn.Flatten(), [{"image": torch.zeros(2, 3, 2, 2)}] * 3, desc="bank")
    assert feats.shape == (6, 12) and "bank" in capsys.readouterr().err
