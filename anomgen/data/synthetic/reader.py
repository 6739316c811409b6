"""Reading synthetic sets: :class:`SyntheticSet` yields the project's record, so that synthetic and real data flow
through the same code; :func:`check_set` / :func:`is_complete_set` tell a finished set from anything else."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from anomgen.data.base import ImageSize, RecordDataset
from anomgen.data.record import ANOMALOUS, NORMAL, Entry
from anomgen.data.synthetic.format import PathLike, load_set
from anomgen.errors import SyntheticSetError


def check_set(path: PathLike) -> None:
    """Raise :class:`SyntheticSetError` naming what is missing or malformed when ``path`` is not a complete set."""
    load_set(path)


def is_complete_set(path: PathLike) -> bool:
    """Whether ``path`` is a complete, well-formed synthetic set (see :func:`check_set`)."""
    try:
        check_set(path)
    except SyntheticSetError:
        return False
    return True


class SyntheticSet(RecordDataset):
    """A finished synthetic set as a dataset of records (checked with :func:`check_set` on construction).

    Each record has the set's image (resized to ``image_size`` if given), label, mask (zeros when the row has
    none), absolute ``image_path`` / ``mask_path`` (``""`` when none), category, ``source`` = the row's generator,
    and defect type. ``labels=(1,)`` keeps only anomalous rows. ``rows`` are the manifest rows, ``info`` is
    ``set.json`` and ``entries`` let task protocols filter without loading pixels.
    """

    name = "synthetic set"

    def __init__(
        self, root: PathLike, image_size: ImageSize = None, labels: int | Iterable[int] | None = None
    ) -> None:
        super().__init__(image_size)
        self.root = Path(root).absolute()
        info, rows = load_set(self.root)
        if labels is not None:
            keep = {int(labels)} if isinstance(labels, int) else {int(v) for v in labels}
            bad = keep - {NORMAL, ANOMALOUS}
            if bad:
                raise SyntheticSetError(f"labels must be 0 and / or 1, got {sorted(bad)}")
            rows = [r for r in rows if r["label"] in keep]
        self.info: dict = info
        self.rows: list[dict] = rows
        self.entries = [
            Entry(
                image_path=str(self.root / r["image"]),
                label=r["label"],
                category=r["category"],
                defect_type=r["defect_type"],
                mask_path=None if r["mask"] is None else str(self.root / r["mask"]),
                source=r["generator"],
            )
            for r in rows
        ]

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]
