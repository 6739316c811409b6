"""Progress bars for the long loops (sampling for FID checks, feature extraction, DDIM inversion, SDE sampling): one
helper, one switch.

Bars are drawn when standard error is a terminal and left out otherwise (a log file, a CI job, a test's captured
output). ``ANOMGEN_PROGRESS=0`` turns them off, ``ANOMGEN_PROGRESS=1`` on even without a terminal. train.py and
evaluate.py give Lightning's own bar (fit, validation, predict: the export) the same answer
(:func:`progress_enabled`) unless the config sets ``trainer.enable_progress_bar``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

#: 0 / false / no / off: no bars; 1 / true / yes / on: bars even when standard error is not a terminal
PROGRESS_ENV = "ANOMGEN_PROGRESS"


def progress_enabled() -> bool:
    """Whether bars are drawn: :data:`PROGRESS_ENV` when set, else whether standard error is a terminal."""
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable, desc: str | None = None, total: int | None = None, leave: bool = False,
             enabled: bool = True, **kwargs) -> Iterable:
    """``iterable`` with a tqdm bar (``desc``, ``total`` when ``len`` cannot tell), when :func:`progress_enabled`
    and ``enabled`` (a caller's own switch); the bar is cleared when done unless ``leave``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not (enabled and progress_enabled()),
                **kwargs)
