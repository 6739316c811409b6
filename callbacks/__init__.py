"""Lightning callbacks: synthetic-set export, image logging, quality filtering, FID early stopping."""

from callbacks.export import SyntheticSetExport
from callbacks.fid_early_stopping import FIDEarlyStopping
from callbacks.image_log import LogGeneratedImages
from callbacks.quality import QualityFilter

__all__ = ["FIDEarlyStopping", "LogGeneratedImages", "QualityFilter", "SyntheticSetExport"]
