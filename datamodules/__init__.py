"""LightningDataModules: thin wrappers over anomgen.data."""

from datamodules.anomaly import AnomalyDataModule
from datamodules.classification import ClassificationDataModule
from datamodules.defect_types import DefectTypeDataModule

__all__ = ["AnomalyDataModule", "ClassificationDataModule", "DefectTypeDataModule"]
