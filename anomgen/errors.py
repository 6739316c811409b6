"""Errors that name what was wrong and what was expected."""


class AnomgenError(Exception):
    """Base class of the project's own errors."""


class ConfigError(AnomgenError, ValueError):
    """The run's configuration asks for something inconsistent or impossible. The message names the key(s)."""


class DatasetError(AnomgenError, ValueError):
    """A dataset on disk is missing, incomplete or malformed. The message names the file or folder."""


class SyntheticSetError(AnomgenError, ValueError):
    """A synthetic set folder is incomplete, malformed, or would be overwritten."""


class PretrainedNotFoundError(AnomgenError, FileNotFoundError):
    """Pretrained weights could not be found. The message names the id and how to supply it."""


class UnsafeFileError(AnomgenError, ValueError):
    """A torch file holds more than tensors and plain containers, so reading it would mean unpickling code."""


class MetricError(AnomgenError, ValueError):
    """A metric cannot be computed from what it was given (e.g. no anomalous sample)."""
