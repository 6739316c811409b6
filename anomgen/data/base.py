"""Shared machinery of the parsers: a dataset over ``Entry`` rows, image / mask loading and resizing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from anomgen.data.record import Entry, make_record
from anomgen.errors import DatasetError

ImageSize = int | Sequence[int] | None


def as_hw(image_size: ImageSize) -> tuple[int, int] | None:
    """``None`` (keep), an int (square) or (height, width)."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


#: PIL modes of 16-bit grey images (16-bit grey PNG / TIFF; ``I`` is how PIL opens some of them): values / 65535
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as float 3×H×W RGB in [0, 1]. A file PIL cannot decode is an error naming the file.

    8-bit images are divided by 255. A 16-bit grey image (:data:`WIDE_GREY_MODES`) is divided by 65535 and repeated
    to three channels (PIL's own conversion to RGB would clip every value above 255 to white); a value outside
    [0, 65535] (a 32-bit integer image) is an error naming the file. PIL opens a 16-bit RGB PNG as 8-bit RGB (the
    high bytes) itself. A 32-bit float grey image (PIL mode ``F``, e.g. a float TIFF) is read as it is when its
    values lie in [0, 1] (PIL's conversion would round them to 0 or 1 of 255: black); other values (or NaN) are an
    error naming the file, never clipped."""
    grey = floats = None
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in WIDE_GREY_MODES:
                grey = np.asarray(img).astype(np.float64)
            elif img.mode == "F":
                floats = np.asarray(img, dtype=np.float32)
            else:
                array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"cannot read image file {path}: {err}") from err
    if grey is not None:
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise DatasetError(f"image file {path}: grey values span [{grey.min():.0f}, {grey.max():.0f}]; "
                               "expected 8- or 16-bit values (0 to 65535)")
        return torch.from_numpy(grey / 65535.0).float()[None].repeat(3, 1, 1)
    if floats is not None:
        finite = bool(np.isfinite(floats).all())
        if floats.size and not (finite and floats.min() >= 0 and floats.max() <= 1):
            raise DatasetError(f"image file {path}: float values span [{np.nanmin(floats):g}, {np.nanmax(floats):g}]"
                               f"{'' if finite else ' with NaN or inf'}; expected a float image in [0, 1] (or an 8- "
                               "or 16-bit image)")
        return torch.from_numpy(floats.copy())[None].repeat(3, 1, 1)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def read_mask(path: str | Path) -> torch.Tensor:
    """Read a mask file as float H×W in {0, 1}, binarised with ``> 0`` (VisA masks hold small integers; a float mask,
    PIL mode ``F``, is read as its values: PIL's conversion to 8 bits would round a soft edge below 0.5 to 0)."""
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img.convert("L") if img.mode not in ("L", "1", "P", "I", "I;16", "F") else img)
    except FileNotFoundError:
        raise DatasetError(f"mask file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"cannot read mask file {path}: {err}") from err
    if array.ndim == 3:
        array = array.max(axis=-1)
    return torch.from_numpy((array > 0).astype(np.float32))


def resize_image(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Bilinear (antialiased) resize of a 3×H×W image; a no-op when the size already matches."""
    if size is None or tuple(image.shape[-2:]) == size:
        return image
    out = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return out.clamp_(0.0, 1.0)


def resize_mask(mask: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Nearest-neighbour resize of an H×W {0,1} mask, so that it stays binary."""
    if size is None or tuple(mask.shape[-2:]) == size:
        return mask
    return F.interpolate(mask[None, None], size=size, mode="nearest")[0, 0]


def require_dir(path: Path, dataset: str, layout: str) -> Path:
    """Fail with the expected layout when a dataset folder is missing."""
    if not path.is_dir():
        raise DatasetError(f"{dataset}: folder not found: {path}\nexpected layout:\n{layout}")
    return path


def require_file(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{dataset}: file not found: {path}\nexpected layout:\n{layout}")
    return path


def check_category(category: str | None, valid: Sequence[str], dataset: str) -> None:
    if category is not None and category not in valid:
        raise DatasetError(f"{dataset}: unknown category {category!r}; valid categories: {', '.join(valid)}")


def check_split(split: str, valid: Sequence[str], dataset: str) -> None:
    if split not in valid:
        raise DatasetError(f"{dataset}: unknown split {split!r}; valid splits: {', '.join(valid)}")


class RecordDataset(Dataset):
    """A dataset over a list of :class:`Entry` rows; ``__getitem__`` loads pixels and returns the record.

    Subclasses fill ``self.entries`` and, for data held in memory, override :meth:`load_image`.
    """

    name = "dataset"

    def __init__(self, image_size: ImageSize = None) -> None:
        self.image_size = as_hw(image_size)
        self.entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def categories(self) -> list[str]:
        """The categories present, in first-seen order."""
        return list(dict.fromkeys(e.category for e in self.entries))

    def load_image(self, entry: Entry) -> torch.Tensor:
        return read_image(entry.image_path)

    def load_mask(self, entry: Entry, image: torch.Tensor) -> torch.Tensor | None:
        if not entry.mask_path:
            return None
        mask = read_mask(entry.mask_path)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise DatasetError(
                f"{self.name}: mask {entry.mask_path} has size {tuple(mask.shape)} (H, W) but its image "
                f"{entry.image_path} has {tuple(image.shape[-2:])}"
            )
        return mask

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        image = self.load_image(entry)
        mask = self.load_mask(entry, image)
        image = resize_image(image, self.image_size)
        if mask is not None:
            mask = resize_mask(mask, self.image_size)
        return make_record(
            image=image,
            label=entry.label,
            mask=mask,
            image_path=entry.image_path,
            mask_path=entry.mask_path,
            category=entry.category,
            source=entry.source,
            defect_type=entry.defect_type,
        )


class ArrayRecordDataset(RecordDataset):
    """A multi-class dataset held in memory as uint8 arrays (N×H×W grey or N×H×W×3 RGB).

    ``image_path`` of each record is a stable id ``<prefix>:<index>``; ``category`` holds the class name and
    ``label`` is -1 (unknown) until a task protocol says which class is normal.
    """

    def __init__(
        self,
        images: np.ndarray,
        class_ids: np.ndarray,
        class_names: Sequence[str],
        id_prefix: str,
        indices: Sequence[int],
        image_size: ImageSize = None,
    ) -> None:
        super().__init__(image_size)
        self._images = images
        self._index_of: dict[str, int] = {}
        for i in indices:
            path = f"{id_prefix}:{int(i):05d}"
            self._index_of[path] = int(i)
            self.entries.append(Entry(path, -1, class_names[int(class_ids[i])], class_names[int(class_ids[i])]))

    def load_image(self, entry: Entry) -> torch.Tensor:
        array = self._images[self._index_of[entry.image_path]]
        image = torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)
        if image.dim() == 2:
            return image[None].expand(3, -1, -1).contiguous()
        return image.permute(2, 0, 1).contiguous()
