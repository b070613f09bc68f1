"""Continued training of (grown) checkpoints: data blocks, µP groups, the Accelerate loop, metrics.

`growkit.train` is both this package and the training entry point: the module is callable, so
`growkit.train(ckpt, data, out, steps=...)` works whether or not a submodule was imported first (importing a
submodule rebinds the package attribute `growkit.train` to this module, which would otherwise shadow a function).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from growkit._lazy import lazy_getattr

__all__ = ["train", "fit", "grow_training_state", "clip_grown_grad_norm_", "mup_param_groups", "TrainConfig", "TrainResult", "TokenBlocks", "evaluate"]

_LAZY = {
    "train": "growkit.train.loop",
    "fit": "growkit.train.loop",
    "evaluate": "growkit.train.loop",
    "TrainConfig": "growkit.train.loop",
    "TrainResult": "growkit.train.loop",
    "mup_param_groups": "growkit.train.mup",
    "grow_training_state": "growkit.train.grow_state",
    "clip_grown_grad_norm_": "growkit.train.grad_clip",
    "TokenBlocks": "growkit.train.blocks",
}


__getattr__ = lazy_getattr("growkit.train", _LAZY)


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any):
        """Same as `growkit.train.loop.train`."""
        from growkit.train.loop import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
