"""anomgen: make anomalies nobody has collected, and use them to train, localize, validate and select detectors.

The core library is plain torch (plus diffusers, transformers and open_clip where a method needs them).
It never imports lightning: the LightningModules in ``models/`` and the DataModules in ``datamodules/`` are thin
wrappers around it.
"""

__version__ = "0.1.0"
