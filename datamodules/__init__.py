"""LightningDataModules: thin wrappers over anomgen.data."""

from datamodules.anomaly import AnomalyDataModule
from datamodules.classification import ClassificationDataModule
from datamodules.localizer import LocalizerDataModule

__all__ = ["AnomalyDataModule", "ClassificationDataModule", "LocalizerDataModule"]
