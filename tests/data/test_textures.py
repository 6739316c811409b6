"""The real-texture task (anomgen.data.textures): MVTec layout, disjoint regions, masks = changed pixels, determinism,
atomicity, the first-third split on it, and the painter kept away from the generators."""

from __future__ import annotations

import ast
import hashlib
import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomgen.data import Folder, MVTecLayout
from anomgen.data import textures as tx
from anomgen.data.tasks import anomalydiffusion_split
from anomgen.errors import DatasetError

SMALL = dict(crop=32, n_train=4, n_test_good=3, n_per_defect=3)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return Path(tx.write_texture_task(tmp_path_factory.mktemp("textures") / "task", **SMALL))


def _layout(root: Path) -> dict:
    return json.loads((root / tx.LAYOUT_FILE).read_text())


def _grey(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path))
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and (rgb == rgb[..., :1]).all()  # RGB, the grey value thrice
    return rgb[..., 0]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_mvtec_parser_reads_the_written_layout(task):
    for parser in (MVTecLayout, Folder):
        train, test = parser(task, split="train"), parser(task, split="test")
        assert train.available_categories == list(tx.TEXTURES)
        assert {(e.category, e.label, e.defect_type) for e in train.entries} == {(c, 0, "good") for c in tx.TEXTURES}
        counts = {}
        for e in test.entries:
            counts[(e.category, e.defect_type)] = counts.get((e.category, e.defect_type), 0) + 1
        assert counts == {(c, d): 3 for c, d in product(tx.TEXTURES, ("good", *tx.DEFECTS))}
    assert len(MVTecLayout(task, "grass", "train")) == 4
    for i, e in enumerate(test.entries):
        if e.label == 0:
            assert e.mask_path is None
            continue
        image, mask = Path(e.image_path), Path(e.mask_path)  # paired by stem, in ground_truth/<defect>/
        assert mask == task / e.category / "ground_truth" / e.defect_type / f"{image.stem}_mask.png"
        values = np.asarray(Image.open(mask))
        assert Image.open(mask).mode == "L" and set(np.unique(values)) == {0, 255}
    record = test[len(test) - 1]
    assert record["label"] == 1 and tuple(record["image"].shape) == (3, 32, 32) and float(record["mask"].sum()) > 0


def test_train_and_test_crops_come_from_disjoint_regions(task):
    layout = _layout(task)
    assert layout["settings"] == {"format": tx.FORMAT, "categories": list(tx.TEXTURES), "defects": list(tx.DEFECTS),
                                  "seed": 0, **SMALL}
    for category in tx.TEXTURES:
        assert layout["regions"][category] == {"train": [0, 0, 256, 512], "test": [256, 0, 512, 512]}
        boxes = {split: [r["box"] for rel, r in layout["files"].items() if rel.startswith(f"{category}/")
                         and r["split"] == split] for split in ("train", "test")}
        assert len(boxes["train"]) == 4 and len(boxes["test"]) == 3 + 3 * 3
        assert all(b[0] >= 0 and b[2] <= 256 for b in boxes["train"])
        assert all(b[0] >= 256 and b[2] <= 512 for b in boxes["test"])
        for (ay0, ax0, ay1, ax1), (by0, bx0, by1, bx1) in product(boxes["train"], boxes["test"]):
            assert ay1 <= by0 or by1 <= ay0 or ax1 <= bx0 or bx1 <= ax0, "a train crop overlaps a test crop"
    # the recorded boxes are where the pixels came from: every good image is its photograph's crop, exactly
    for rel, r in layout["files"].items():
        if rel.split("/")[-2] == "good":
            y0, x0, y1, x1 = r["box"]
            assert np.array_equal(_grey(task / rel), tx.photo(rel.split("/")[0])[y0:y1, x0:x1]), rel


def test_written_masks_are_exactly_the_changed_pixels(task):
    layout = _layout(task)
    defects = {rel: r for rel, r in layout["files"].items() if "defect" in r}
    assert len(defects) == 3 * 3 * 3
    for rel, r in defects.items():
        y0, x0, y1, x1 = r["box"]
        clean = tx.photo(rel.split("/")[0])[y0:y1, x0:x1]
        mask = np.asarray(Image.open(task / r["mask"])) == 255
        assert np.array_equal(mask, _grey(task / rel) != clean), rel
        assert 0 < mask.sum() < mask.size, rel


@pytest.mark.parametrize("kind", tx.DEFECTS)
def test_the_painter_changes_exactly_its_mask(kind):
    """The painter called directly on clean crops kept in memory, flat extremes (where clipping bites) included."""
    rng = np.random.default_rng(7)
    photo = tx.photo("gravel")
    for i in range(12):
        size = (32, 64, 128)[i % 3]
        y, x = rng.integers(0, 512 - size, size=2)
        cleans = [photo[y : y + size, x : x + size].copy()]
        if i < 3:
            cleans += [np.zeros((size, size), np.uint8), np.full((size, size), 255, np.uint8)]
        for clean in cleans:
            before = clean.copy()
            d = tx.paint_defect(clean, kind, np.random.default_rng(i), patch_sources=("brick", "coins"))
            assert np.array_equal(clean, before)  # the clean crop is not painted in place
            assert d.image.dtype == np.uint8 and d.image.shape == clean.shape and d.mask.dtype == bool
            assert np.array_equal(d.mask, d.image != clean)
            assert 0 < d.mask.sum() < 0.25 * d.mask.size
            json.dumps(d.params)
    with pytest.raises(ValueError, match="unknown defect 'crack'"):
        tx.paint_defect(photo[:32, :32], "crack", rng)


def test_the_same_seed_gives_the_same_bytes_and_a_finished_root_is_reused(task, tmp_path):
    again = Path(tx.write_texture_task(tmp_path / "again", **SMALL))
    assert _digest(again) == _digest(task)
    other = Path(tx.write_texture_task(tmp_path / "seed1", **SMALL, seed=1))
    assert _digest(other).keys() == _digest(task).keys() and _digest(other) != _digest(task)
    # reused as is: nothing rewritten
    marker = again / "brick" / "train" / "good" / "000.png"
    stamp = marker.stat().st_mtime_ns
    assert tx.write_texture_task(again, **SMALL) == str(again) and marker.stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match=r"other settings \(crop: 32 there, 48 asked\)"):
        tx.write_texture_task(again, **{**SMALL, "crop": 48})
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="holds no texture task"):
        tx.write_texture_task(tmp_path / "foreign", **SMALL)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failure_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    calls = []

    def failing(clean, kind, rng, patch_sources=tx.PATCH_SOURCES):
        calls.append(kind)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(clean, kind, rng, patch_sources)

    real = tx.paint_defect
    monkeypatch.setattr(tx, "paint_defect", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        tx.write_texture_task(tmp_path / "task", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the root nor its hidden work folder
    monkeypatch.setattr(tx, "paint_defect", real)
    assert MVTecLayout(tx.write_texture_task(tmp_path / "task", **SMALL), split="test")


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    for bad, match in ((dict(categories=("brick", "wood")), "categories must be"),
                       (dict(defects=("patch", "crack")), "defects must be"),
                       (dict(crop=300), "crop must be 16"),
                       (dict(n_per_defect=2), "n_per_defect must be >= 3")):
        with pytest.raises(ValueError, match=match):
            tx.write_texture_task(tmp_path / "t", **{**SMALL, **bad})
    assert not (tmp_path / "t").exists()


def test_the_first_third_split_on_the_texture_task(task, tmp_path):
    root = Path(tx.write_texture_task(tmp_path / "six", categories=("brick",), **{**SMALL, "n_per_defect": 6}))
    train, test = anomalydiffusion_split(MVTecLayout(root, "brick", "test"))
    for d in tx.DEFECTS:
        names = lambda view: [Path(e.image_path).name for e in view.entries if e.defect_type == d]  # noqa: E731
        assert names(train) == ["000.png", "001.png"]
        assert names(test) == ["002.png", "003.png", "004.png", "005.png"]
    assert set(train.indices).isdisjoint(test.indices)
    # the smallest task that can be written (3 per type) splits 1 / 2; one fewer is one clear error naming the type
    train3, test3 = anomalydiffusion_split(MVTecLayout(task, "grass", "test"))
    assert len(train3) == 3 and len(test3) == 6
    for i in range(4):
        (root / "brick" / "test" / "stain" / f"{i:03d}.png").unlink()
    with pytest.raises(DatasetError, match=r"defect type 'stain' has 2 anomalous image\(s\).*0 to train and 2 to "
                                           r"test.*at least 3"):
        anomalydiffusion_split(MVTecLayout(root, "brick", "test"))


def test_no_generator_reaches_the_defect_painter():
    """The painter is the task's ground truth: only the writer's entry points may import anomgen.data.textures."""
    allowed = {"anomgen/data/textures.py", "anomgen/data/__init__.py", "anomgen/runtime.py"}
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(("tests/", ".")) or "/." in rel or rel in allowed:
            continue
        text = path.read_text()
        assert "paint_defect" not in text, f"{rel} mentions the defect painter"
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n.startswith("anomgen.data.textures") for n in names), f"{rel} imports the texture task"
    exported = ast.parse((REPO / "anomgen/data/__init__.py").read_text())
    from_textures = [a.name for n in ast.walk(exported) if isinstance(n, ast.ImportFrom)
                     and n.module == "anomgen.data.textures" for a in n.names]
    assert from_textures == ["write_texture_task"]
