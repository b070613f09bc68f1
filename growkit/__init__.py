"""growkit: grow or shrink trained language-model checkpoints zero-shot."""

__version__ = "0.1.0"
