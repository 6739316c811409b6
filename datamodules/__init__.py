"""LightningDataModules: thin wrappers over anomgen.data."""

from datamodules.anomaly import AnomalyDataModule
from datamodules.classification import ClassificationDataModule

__all__ = ["AnomalyDataModule", "ClassificationDataModule"]
