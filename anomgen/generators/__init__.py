"""One file per way of making anomalies."""

from anomgen.generators.noise_patch import NoisePatchGenerator

__all__ = ["NoisePatchGenerator"]
