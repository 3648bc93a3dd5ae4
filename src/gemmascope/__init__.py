"""gemmascope: an open, trainable, local Gemma Scope."""

__version__ = "0.1.0"
