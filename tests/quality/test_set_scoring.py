"""Scoring a synthetic set's anomalies into its manifest, and keeping the top fraction as a new set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anomgen.data.synthetic import SyntheticSet, read_manifest, subset_set, write_set
from anomgen.encoders import RawPixels
from anomgen.errors import SyntheticSetError
from anomgen.quality.base import QualityScorer
from anomgen.quality.set_scoring import score_set, select_top


class NegativeDistanceToLabelled(QualityScorer):
    """Quality = minus the distance to the nearest labelled anomaly (a stand-in with an obvious right answer)."""

    def _fit(self, X, y):
        self.anomalies_ = X[y == 1]

    def _score(self, X_aux):
        d = np.linalg.norm(X_aux[:, None, :] - self.anomalies_[None], axis=-1)
        return -d.min(axis=1)


def _records(values, label):
    return [{"image": torch.full((3, 4, 4), v), "label": label, "mask": torch.zeros(4, 4)} for v in values]


@pytest.fixture
def a_set(tmp_path):
    samples = [dict(id=f"{i:06d}", image=torch.full((3, 4, 4), v), label=1, generator="g", category="c",
                    defect_type="g") for i, v in enumerate([0.9, 0.1, 0.5, 0.8, 0.3, 0.6])]
    samples.append(dict(id="000006", image=torch.full((3, 4, 4), 0.2), label=0, generator="real", category="c"))
    return write_set(tmp_path / "set", samples, {"generator": "g"})


def test_score_set_writes_each_anomaly_score(a_set):
    normals, labelled = _records([0.0, 0.05, 0.1], 0), _records([1.0], 1)
    scores = score_set(a_set, NegativeDistanceToLabelled(), RawPixels(), normals, labelled, key="q")
    rows = {r["id"]: r for r in read_manifest(a_set)}
    assert set(scores) == {f"{i:06d}" for i in range(6)}  # the normal row is not scored
    assert "q" not in rows["000006"]["scores"]
    for sample_id, value in scores.items():
        pixel = round(float(SyntheticSet(a_set)[int(sample_id)]["image"][0, 0, 0]) * 255) / 255
        assert value == pytest.approx(-abs(1.0 - pixel) * 4, abs=1e-6)  # 16 grey pixels: distance = 4·|Δ|
        assert rows[sample_id]["scores"]["q"] == pytest.approx(value)


def test_select_top_keeps_normals_and_the_best_third(a_set, tmp_path):
    score_set(a_set, NegativeDistanceToLabelled(), RawPixels(), _records([0.0], 0), _records([1.0], 1), key="q")
    top = select_top(a_set, tmp_path / "top", key="q", keep_fraction=1 / 3)
    kept = {r["id"] for r in read_manifest(top)}
    assert kept == {"000000", "000003", "000006"}  # the two closest to 1.0 (0.9, 0.8) and the normal row
    info = json.loads((top / "set.json").read_text())
    assert info["selection"] == {"score": "q", "keep_fraction": 1 / 3, "kept": 2, "of": 6}
    assert info["counts"]["total"] == 3 and info["parent_set"].endswith("set")
    assert torch.equal(SyntheticSet(top)[0]["image"], SyntheticSet(a_set)[0]["image"])


def test_select_top_refuses_unscored_sets(a_set, tmp_path):
    with pytest.raises(ValueError, match="no 'eap' score"):
        select_top(a_set, tmp_path / "top")


def test_subset_set_errors(a_set, tmp_path):
    with pytest.raises(SyntheticSetError, match="999999"):
        subset_set(a_set, ["999999"], tmp_path / "sub")
    with pytest.raises(SyntheticSetError, match="empty subset"):
        subset_set(a_set, [], tmp_path / "sub")
    subset_set(a_set, ["000001"], tmp_path / "sub")
    with pytest.raises(SyntheticSetError, match="already exists"):
        subset_set(a_set, ["000002"], tmp_path / "sub")
    assert [r["id"] for r in read_manifest(tmp_path / "sub")] == ["000001"]
    assert len(read_manifest(a_set)) == 7  # the parent is untouched


def test_score_set_needs_labelled_anomalies(a_set):
    with pytest.raises(ValueError, match="labelled real anomalies"):
        score_set(a_set, NegativeDistanceToLabelled(), RawPixels(), _records([0.0], 0), [], key="q")


def test_the_quality_filter_refuses_a_run_without_an_export_before_it_when_the_run_starts(tmp_path):
    """The missing export callback was found at predict end, after fitting and generating; it is now refused in
    setup, which Lightning calls before fitting."""
    from types import SimpleNamespace

    from anomgen.errors import ConfigError
    from callbacks import QualityFilter, SyntheticSetExport

    quality = QualityFilter(NegativeDistanceToLabelled(), RawPixels(), labelled_anomalies=[])
    export = SyntheticSetExport(dirpath=str(tmp_path / "set"))
    for callbacks in ([quality], [quality, export]):
        with pytest.raises(ConfigError, match="list callbacks.synthetic_set_export before it"):
            quality.setup(SimpleNamespace(callbacks=callbacks), None, "fit")
    quality.setup(SimpleNamespace(callbacks=[export, quality]), None, "fit")
