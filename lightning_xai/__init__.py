"""lightning-xai: explain Vision Transformers while they train."""

__version__ = "0.1.0"
