"""Reading and writing checkpoints."""

from growkit.checkpoint.reader import Checkpoint, load_checkpoint

__all__ = ["Checkpoint", "load_checkpoint"]
