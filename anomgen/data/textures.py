"""A localization task in the MVTec AD layout, built from scikit-image's real texture photographs.

scikit-image ships three real texture photographs (``brick``, ``grass``, ``gravel``: 512×512 grey) that load
offline. :func:`write_texture_task` cuts crops from them and writes ``<root>/<category>/{train/good, test/good,
test/<defect>, ground_truth/<defect>}`` as MVTec AD does (images as RGB PNGs, the grey value in all three channels;
masks 0 / 255 L-mode PNGs, ``<stem>_mask.png``). :class:`anomgen.data.MVTecLayout` reads it; categories are the
texture names.

- **Regions.** Normal training crops come from the **top half** of each photograph (rows 0 … H/2 − 1), test crops
  (good and defective) from the **bottom half** (rows H/2 … H − 1). Every crop lies wholly inside its half, so no
  training crop shares a pixel with a test crop. Crop positions are random, seeded per (seed, category, folder):
  changing one count does not move the crops of another folder.
- **Defects.** The defect painter below (:func:`paint_defect`) makes every anomaly: ``patch`` (a blob of another
  real photograph pasted in), ``stroke`` (a thin curved line, darker or brighter) and ``stain`` (a smooth local
  intensity change under a blob). Each mask is exactly the set of changed pixels: never empty, never the whole crop.
  **The painter is the ground truth of an evaluation task: no generator may call it.** A generator that learnt from
  (or borrowed) the painter would be graded on its own recipe; generators see only the files (their training third
  of each defect type, through :func:`anomgen.data.tasks.anomalydiffusion_split`).
- **Record.** ``<root>/layout.json`` holds the settings, the two regions and, for every file, its crop box
  ``[y0, x0, y1, x1]`` in the photograph (and, for a defect, its mask and the painter's parameters). It is written
  last, inside a folder that is renamed into place when complete (:func:`anomgen.files.atomic_dir`): a failure
  leaves nothing that looks finished; a finished root with the same settings is reused as is.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from anomgen.errors import DatasetError
from anomgen.files import atomic_dir, write_json

TEXTURES = ("brick", "grass", "gravel")
TEXTURE_SIZE = 512  # each of them is 512×512
DEFECTS = ("patch", "stroke", "stain")
#: photographs a ``patch`` defect is cut from (a category's own photograph is never its patch source)
PATCH_SOURCES = ("brick", "grass", "gravel", "camera", "coins")
LAYOUT_FILE = "layout.json"
#: bump when the painter or the crop rule changes: a cached task of another format is refused, not silently reused
FORMAT = 1


# -- the photographs ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise DatasetError(f"scikit-image has no image {name!r}")
    image = np.asarray(loader())
    if image.ndim == 3:  # a colour photograph as patch source: its luminance
        image = (image[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114]).round().astype(np.uint8)
    image = np.ascontiguousarray(image, dtype=np.uint8)
    image.setflags(write=False)
    return image


def photo(name: str) -> np.ndarray:
    """scikit-image's grey photograph ``name`` (uint8 H×W, read-only; a colour one as its luminance)."""
    return _photo(name)


def regions(height: int) -> dict[str, tuple[int, int]]:
    """The row ranges ``[start, stop)`` that the crops of each split come from: train the top half, test the bottom."""
    return {"train": (0, height // 2), "test": (height // 2, height)}


def _rng(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), *(zlib.crc32(p.encode()) for p in parts)])


def _boxes(rng: np.random.Generator, shape: tuple[int, int], rows: tuple[int, int], crop: int, n: int) -> list:
    """``n`` random crop boxes ``[y0, x0, y1, x1]`` lying wholly inside rows ``[rows[0], rows[1])``."""
    y0 = rng.integers(rows[0], rows[1] - crop + 1, size=n)
    x0 = rng.integers(0, shape[1] - crop + 1, size=n)
    return [[int(y), int(x), int(y) + crop, int(x) + crop] for y, x in zip(y0, x0)]


def _cut(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    y0, x0, y1, x1 = box
    return image[y0:y1, x0:x1]


# -- the defect painter (evaluation ground truth: generators never call it) ----------------------------------------


@dataclass
class Defect:
    """A painted crop: ``image`` (uint8 H×W), ``mask`` (bool H×W, exactly the pixels that differ from the clean
    crop) and the painter's ``params`` (JSON data, recorded in ``layout.json``)."""

    image: np.ndarray
    mask: np.ndarray
    params: dict = field(default_factory=dict)


def _blob(rng: np.random.Generator, size: int, radius: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """An irregular blob (bool size×size) inside the crop, and ``rho``: the distance from its centre relative to its
    boundary (0 at the centre, 1 on the edge). Radius ``radius`` × size, wobbled by three low harmonics, stretched
    and rotated."""
    r0 = rng.uniform(*radius) * size
    amps = rng.uniform(0.0, 0.12, size=3)
    phases = rng.uniform(0.0, 2 * np.pi, size=3)
    squash = rng.uniform(0.6, 1.0)
    angle = rng.uniform(0.0, np.pi)
    reach = r0 * (1.0 + amps.sum())  # the farthest the boundary gets from the centre
    margin = reach + 1.0
    cy, cx = rng.uniform(margin, size - margin, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
    v = ((xx - cx) * np.cos(angle) - (yy - cy) * np.sin(angle)) / squash
    theta, dist = np.arctan2(v, u), np.hypot(u, v)
    boundary = r0 * (1.0 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 4), amps, phases)))
    rho = dist / boundary
    return rho <= 1.0, rho


def _force_change(clean: np.ndarray, out: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Make every pixel of ``region`` differ from ``clean`` (a pixel the paint happened to leave equal moves by one
    grey level), so that the mask, the changed pixels and the painted region are one set."""
    same = region & (out == clean)
    out[same] = np.where(clean[same] < 255, clean[same].astype(np.int16) + 1, 254).astype(np.uint8)
    return out


def _patch(clean: np.ndarray, rng: np.random.Generator, sources: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    size = clean.shape[0]
    region, _ = _blob(rng, size, (0.10, 0.22))
    name = str(sources[int(rng.integers(len(sources)))])
    src = photo(name)
    box = _boxes(rng, src.shape, (0, src.shape[0]), size, 1)[0]
    out = clean.copy()
    out[region] = _cut(src, box)[region]
    return out, region, {"source": name, "source_box": box}


def _distance_to_points(points: np.ndarray, size: int, supersample: int = 4) -> np.ndarray:
    """The distance (px) from each pixel centre of a size×size crop to the nearest of ``points`` (P×2, y x), through
    a Euclidean distance transform on a grid ``supersample`` times finer (error under 0.1 px)."""
    from scipy.ndimage import distance_transform_edt

    fine = np.ones((size * supersample,) * 2, dtype=bool)
    idx = np.clip(np.round(points * supersample).astype(int), 0, size * supersample - 1)
    fine[idx[:, 0], idx[:, 1]] = False
    return distance_transform_edt(fine)[::supersample, ::supersample] / supersample


def _stroke(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    size = clean.shape[0]
    half_width = max(0.75, rng.uniform(0.6, 1.4) * size / 64)
    margin = half_width + 2.0
    while True:  # two ends at least a third of the crop apart
        p0, p2 = rng.uniform(margin, size - margin, size=(2, 2))
        length = float(np.hypot(*(p2 - p0)))
        if length >= size / 3:
            break
    normal = np.array([-(p2 - p0)[1], (p2 - p0)[0]]) / length
    p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.35, 0.35) * length  # quadratic Bézier control point
    t = np.linspace(0.0, 1.0, int(16 * length) + 2)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    curve = np.clip(curve, margin, size - margin)  # keeps the line inside the crop, away from its border
    distance = _distance_to_points(curve, size)
    region = distance <= half_width
    sign = 1.0 if rng.random() < 0.5 else -1.0
    delta = sign * rng.uniform(50.0, 90.0)
    out = np.clip(clean.astype(np.float64) + delta * region, 0, 255).round().astype(np.uint8)
    return out, region, {"delta": float(delta), "half_width": float(half_width)}


def _stain(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    size = clean.shape[0]
    region, rho = _blob(rng, size, (0.14, 0.26))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    amplitude = sign * rng.uniform(30.0, 60.0)
    profile = np.where(region, 1.0 - 0.6 * np.clip(rho, 0.0, 1.0) ** 2, 0.0)  # smooth: 1 at the centre, 0.4 at the edge
    out = np.clip(clean.astype(np.float64) + amplitude * profile, 0, 255).round().astype(np.uint8)
    return out, region, {"amplitude": float(amplitude)}


def paint_defect(clean: np.ndarray, kind: str, rng: np.random.Generator,
                 patch_sources: Sequence[str] = PATCH_SOURCES) -> Defect:
    """Paint one defect of ``kind`` (``patch``, ``stroke`` or ``stain``) on the grey crop ``clean`` (uint8 S×S).

    The ground truth of the texture task: **generators never call this** (see the module's docstring).

    - ``patch``: an irregular blob (radius 0.10–0.22 of the crop) filled with the same blob of a random crop of
      another photograph in ``patch_sources``.
    - ``stroke``: a quadratic Bézier line at least a third of the crop long, 1.5–3 px wide at 64 px (scaled with the
      crop), shifted by ±50–90 grey levels.
    - ``stain``: an irregular blob (radius 0.14–0.26) shifted by ±30–60 grey levels at its centre, falling smoothly
      to 40 % of that at its edge.

    Pixels the paint leaves equal (clipping at 0 / 255, a source pixel equal to the clean one) move by one level, so
    ``mask`` is both the painted region and exactly ``image != clean``.
    """
    clean = np.asarray(clean)
    if clean.dtype != np.uint8 or clean.ndim != 2 or clean.shape[0] != clean.shape[1] or clean.shape[0] < 16:
        raise ValueError(f"paint_defect: clean must be a square uint8 grey crop of at least 16 px, got "
                         f"{clean.dtype} {clean.shape}")
    if kind == "patch":
        if not patch_sources:
            raise ValueError("paint_defect: a patch needs at least one source photograph")
        out, region, params = _patch(clean, rng, patch_sources)
    elif kind == "stroke":
        out, region, params = _stroke(clean, rng)
    elif kind == "stain":
        out, region, params = _stain(clean, rng)
    else:
        raise ValueError(f"paint_defect: unknown defect {kind!r}; known: {', '.join(DEFECTS)}")
    out = _force_change(clean, out, region)
    mask = out != clean
    if not mask.any() or mask.all():  # the blob and line sizes above make both impossible; kept as a guard
        raise AssertionError(f"paint_defect: {kind} mask covers {int(mask.sum())} of {mask.size} pixels")
    return Defect(out, mask, params)


# -- the writer ---------------------------------------------------------------------------------------------------


def _save_grey_rgb(grey: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB").save(path, compress_level=1)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, compress_level=1)


def _settings(categories, defects, crop, n_train, n_test_good, n_per_defect, seed) -> dict:
    categories, defects = [str(c) for c in categories], [str(d) for d in defects]
    unknown = [c for c in categories if c not in TEXTURES]
    if not categories or unknown or len(set(categories)) != len(categories):
        raise ValueError(f"write_texture_task: categories must be distinct names among {', '.join(TEXTURES)}, "
                         f"got {categories}")
    unknown = [d for d in defects if d not in DEFECTS]
    if not defects or unknown or len(set(defects)) != len(defects):
        raise ValueError(f"write_texture_task: defects must be distinct names among {', '.join(DEFECTS)}, "
                         f"got {defects}")
    if not 16 <= int(crop) <= TEXTURE_SIZE // 2:
        raise ValueError(f"write_texture_task: crop must be 16 … {TEXTURE_SIZE // 2} px (half a photograph's height), "
                         f"got {crop}")
    if int(n_train) < 1 or int(n_test_good) < 1:
        raise ValueError(f"write_texture_task: n_train and n_test_good must be >= 1, got {n_train}, {n_test_good}")
    if int(n_per_defect) < 3:
        raise ValueError(f"write_texture_task: n_per_defect must be >= 3 (the disjoint first-third split needs one "
                         f"image to train on and the rest to test), got {n_per_defect}")
    return {"format": FORMAT, "categories": categories, "defects": defects, "crop": int(crop),
            "n_train": int(n_train), "n_test_good": int(n_test_good), "n_per_defect": int(n_per_defect),
            "seed": int(seed)}


def _write(root: Path, settings: dict) -> None:
    crop, seed = settings["crop"], settings["seed"]
    files: dict[str, dict] = {}
    for category in settings["categories"]:
        image = photo(category)
        if image.shape != (TEXTURE_SIZE, TEXTURE_SIZE):
            raise DatasetError(f"scikit-image's {category} is {image.shape}, not {TEXTURE_SIZE}² as this task assumes")
        rows = regions(image.shape[0])
        sources = [s for s in PATCH_SOURCES if s != category]
        parts = [("train/good", "train", settings["n_train"]), ("test/good", "test", settings["n_test_good"])]
        parts += [(f"test/{d}", "test", settings["n_per_defect"]) for d in settings["defects"]]
        for folder, split, n in parts:
            rng = _rng(seed, category, folder)
            for i, box in enumerate(_boxes(rng, image.shape, rows[split], crop, n)):
                rel = f"{category}/{folder}/{i:03d}.png"
                record: dict = {"box": box, "split": split}
                clean = _cut(image, box)
                if folder.endswith("/good"):
                    _save_grey_rgb(clean, root / rel)
                else:
                    defect = folder.split("/", 1)[1]
                    painted = paint_defect(clean, defect, rng, sources)
                    mask_rel = f"{category}/ground_truth/{defect}/{i:03d}_mask.png"
                    _save_grey_rgb(painted.image, root / rel)
                    _save_mask(painted.mask, root / mask_rel)
                    record.update(defect=defect, mask=mask_rel, params=painted.params)
                files[rel] = record
    import skimage

    write_json(root / LAYOUT_FILE, {
        "settings": settings,
        "regions": {c: {split: [start, 0, stop, photo(c).shape[1]] for split, (start, stop)
                        in regions(photo(c).shape[0]).items()} for c in settings["categories"]},
        "region_rule": "boxes [y0, x0, y1, x1]: train crops inside rows [0, H/2) of each photograph, test crops "
                       "inside rows [H/2, H)",
        "source": f"scikit-image {skimage.__version__} data: {', '.join(settings['categories'])}",
        "files": files,
    }, strict=True)


def write_texture_task(
    root: str | Path,
    categories: Sequence[str] = TEXTURES,
    defects: Sequence[str] = DEFECTS,
    crop: int = 128,
    n_train: int = 64,
    n_test_good: int = 32,
    n_per_defect: int = 18,
    seed: int = 0,
) -> str:
    """Write the texture task (see the module's docstring) at ``root``; return ``root`` as a string.

    Per category: ``n_train`` normal crops of ``crop`` px from the top half, ``n_test_good`` normal and
    ``n_per_defect`` defective crops of each type from the bottom half. The defaults give 18 anomalies per type:
    6 to train a generator on and 12 to test, by the first-third split.

    Deterministic (same settings and seed, same bytes), atomic (written under a hidden sibling and renamed when
    complete) and idempotent: a finished root with the same settings is reused as is; one with other settings is a
    :class:`DatasetError` naming the differences (write elsewhere, or delete it). A non-empty folder that is no
    texture task is refused too.
    """
    root = Path(root)
    settings = _settings(categories, defects, crop, n_train, n_test_good, n_per_defect, seed)
    layout = root / LAYOUT_FILE
    if layout.is_file():
        found = json.loads(layout.read_text()).get("settings", {})
        if found != settings:
            diff = ", ".join(f"{k}: {found.get(k)!r} there, {v!r} asked" for k, v in settings.items()
                             if found.get(k) != v)
            raise DatasetError(f"{root} holds a texture task written with other settings ({diff}); write to another "
                               "folder, or delete that one to rewrite it")
        return str(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"{root} exists and holds no texture task ({LAYOUT_FILE} missing, or an unfinished copy); "
                           "give an empty or new folder")
    with atomic_dir(root, exist_ok=True) as tmp:  # another caller may finish first: then its copy is used
        _write(tmp, settings)
    return write_texture_task(root, categories, defects, crop, n_train, n_test_good, n_per_defect, seed)
