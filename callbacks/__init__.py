"""Lightning callbacks: synthetic-set export, image logging."""

from callbacks.export import SyntheticSetExport
from callbacks.image_log import LogGeneratedImages
from callbacks.quality import QualityFilter

__all__ = ["LogGeneratedImages", "QualityFilter", "SyntheticSetExport"]
