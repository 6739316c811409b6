"""Tiny copies of the official layouts, written once per test session by ``anomgen.data.layouts``.

The session-wide folders are read-only by convention: a test that breaks a layout on purpose writes its own copy
under ``tmp_path``.
"""

from __future__ import annotations

import pytest

from anomgen.data import layouts

MVTEC_CATEGORIES = ("bottle", "cable")
MVTEC_DEFECTS = ("broken", "crack")
VISA_CATEGORIES = ("candle", "pcb1")


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> str:
    return layouts.write_mvtec(
        tmp_path_factory.mktemp("mvtec"), categories=MVTEC_CATEGORIES, n_train=4, n_test_good=2,
        defects=MVTEC_DEFECTS, n_per_defect=3, size=32,
    )  # fmt: skip


@pytest.fixture(scope="session")
def visa_root(tmp_path_factory) -> str:
    return layouts.write_visa(
        tmp_path_factory.mktemp("visa"), categories=VISA_CATEGORIES, n_train=4, n_test_good=2, n_anomaly=3
    )


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory) -> str:
    return layouts.write_cub(tmp_path_factory.mktemp("cub"), n_per_class=4, n_train_per_class=2)


@pytest.fixture(scope="session")
def flowers_root(tmp_path_factory) -> str:
    return layouts.write_flowers(tmp_path_factory.mktemp("flowers"), n_classes=3, n_train=2, n_val=1, n_test=1)


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> str:
    return layouts.write_cifar(tmp_path_factory.mktemp("cifar10"), "cifar10", n_per_class_train=2, n_per_class_test=1)


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory) -> str:
    return layouts.write_cifar(tmp_path_factory.mktemp("cifar100"), "cifar100", n_per_class_train=1, n_per_class_test=1)


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory) -> str:
    return layouts.write_folder(tmp_path_factory.mktemp("folder"), categories=("widget", "gadget"))


@pytest.fixture
def good_set(tmp_path):
    """A finished synthetic set of two anomalies with masks and one normal (see synthetic_samples)."""
    from synthetic_samples import INFO, make_sample

    from anomgen.data.synthetic import write_set

    return write_set(tmp_path / "set", [make_sample(0), make_sample(1), make_sample(2, label=0)], INFO)
