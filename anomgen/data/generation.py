"""What a generator is asked to make: one request per synthetic sample, identified by its global index."""

from __future__ import annotations

from torch.utils.data import Dataset


class GenerationRequests(Dataset):
    """Request ``i`` = global index ``i`` + the support image it starts from (``sources[i % len(sources)]``).

    The sample's randomness is seeded by the index (see :mod:`anomgen.seeding`), so a request gives the same sample
    whichever device or batch handles it.
    """

    def __init__(self, sources: Dataset, num_samples: int | None = None) -> None:
        if len(sources) == 0:
            raise ValueError("generation needs at least one source image, the support set is empty")
        self.sources = sources
        self.num_samples = len(sources) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "source": self.sources[index % len(self.sources)]}
