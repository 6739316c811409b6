"""Seeds of generated samples: every random draw of sample ``index`` comes from a generator seeded by the index.

The stream of sample ``i`` depends only on ``(base_seed, i)``, never on the batch it falls in, the device count or
the rank, so that a synthetic set is the same whether it was made on 1 device or 4.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_seed(base_seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index``, independent streams for different indices (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(base_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def sample_generator(base_seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` for sample ``index``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(sample_seed(base_seed, index))
    return gen
