"""Lightning callbacks: synthetic-set export, image logging."""

from callbacks.export import SyntheticSetExport
from callbacks.image_log import LogGeneratedImages

__all__ = ["LogGeneratedImages", "SyntheticSetExport"]
