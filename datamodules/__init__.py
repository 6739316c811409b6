"""LightningDataModules: thin wrappers over anomgen.data."""

from datamodules.anomaly import AnomalyDataModule

__all__ = ["AnomalyDataModule"]
