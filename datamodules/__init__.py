"""LightningDataModules: thin wrappers over anomgen.data."""

from datamodules.anomaly import AnomalyDataModule
from datamodules.classification import ClassificationDataModule
from datamodules.defect_types import DefectTypeDataModule
from datamodules.localizer import LocalizerDataModule

__all__ = ["AnomalyDataModule", "ClassificationDataModule", "DefectTypeDataModule", "LocalizerDataModule"]
