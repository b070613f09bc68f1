"""growkit: grow or shrink trained language-model checkpoints zero-shot."""

__version__ = "0.1.0"

from typing import Any

_LAZY = {
    "grow": "growkit.pipeline",
    "grow_model": "growkit.pipeline",
    "shrink": "growkit.shrink_command",
    "load_checkpoint": "growkit.checkpoint.reader",
    "GrowkitError": "growkit.errors",
    "push": "growkit.hub.push",
    "run_recipe": "growkit.recipe",
    "write_model_card": "growkit.hub.card",
    "train": "growkit.train",
    "mup_param_groups": "growkit.train.mup",
    "inspect": "growkit.measure.report",
}


def __getattr__(name: str) -> Any:
    """Import the public API lazily, so `import growkit` stays cheap (torch and transformers load on first use)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'growkit' has no attribute {name!r}")
