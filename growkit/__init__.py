"""growkit: grow or shrink trained language-model checkpoints zero-shot."""

__version__ = "0.1.0"

from growkit._lazy import lazy_getattr

_LAZY = {
    "grow": "growkit.pipeline",
    "grow_model": "growkit.pipeline",
    "grow_training_state": "growkit.train.grow_state",
    "shrink": "growkit.shrink_command",
    "load_checkpoint": "growkit.checkpoint.reader",
    "GrowkitError": "growkit.errors",
    "push": "growkit.hub.push",
    "run_recipe": "growkit.recipe",
    "write_model_card": "growkit.hub.card",
    "train": "growkit.train",
    "mup_param_groups": "growkit.train.mup",
    "inspect": "growkit.measure.report",
    "upcycle": "growkit.upcycle",
}


#: Import the public API lazily, so `import growkit` stays cheap (torch and transformers load on first use).
__getattr__ = lazy_getattr("growkit", _LAZY)
