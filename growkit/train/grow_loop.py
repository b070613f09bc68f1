"""`growkit train --grow-at STEP:SPEC`: growth points inside one run, one schedule and one data stream.

A point `300:width=2x` grows the model, its AdamW state and the scheduler (`grow_state`) after 300 optimizer steps,
before step 301 reads its batch. A checkpoint saved at step 300 is the model from before that growth, so resuming
from it grows again at the same place; a checkpoint from after a growth holds the grown model (its HF export is
where `--resume` loads it from) and an optimizer with one group per tensor, which `resume_groups` rebuilds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from growkit.errors import GrowkitError
from growkit.pipeline import growth_of_model
from growkit.train.freeze import FREEZE_MODES, Freeze, FrozenEntries
from growkit.train.integrations import grow_prepared_run

def _refuse(value: str) -> Any:
    raise ValueError(value)


def _yes_no(value: str) -> bool:
    return value.lower() in ("yes", "true") if value.lower() in ("yes", "no", "true", "false") else _refuse(value)


#: What a SPEC value must be, for the keys whose parser says more than "a number".
_WANTS = {"untie-head": "yes or no", "freeze": f"one of {', '.join(FREEZE_MODES)}"}


#: SPEC keys: what `--grow-at` says -> (`grow_training_state` option, parser).
_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "width": ("width", str), "hidden": ("hidden", int), "ffn": ("ffn", int), "heads": ("heads", int),
    "kv-heads": ("kv_heads", int), "layers": ("layers", str), "method": ("method", str),
    "depth-method": ("depth_method", str), "seed": ("seed", int), "untie-head": ("untie_head", _yes_no),
    "freeze": ("freeze", lambda v: v if v in FREEZE_MODES else _refuse(v)),
    "noise": ("noise_snr_db", lambda v: None if v.lower() == "none" else float(v)),
}
#: Symmetric noise on cloned readers unless the spec says otherwise: a noiseless clone never uses its new width.
DEFAULT_NOISE_SNR_DB = 10.0
#: Operators whose maps need no weights, so a schedule of them can be checked on shapes alone before training.
_SHAPE_ONLY = ("clone", "net2net", "copy-pad")


@dataclass(frozen=True)
class GrowthPoint:
    step: int
    request: dict[str, Any]
    spec: str


def parse_grow_at(specs: Sequence[str]) -> list[GrowthPoint]:
    """`["300:width=2x", "900:layers=2x,depth-method=identity"]` -> growth points in step order."""
    points = []
    for spec in specs:
        step_text, sep, body = spec.partition(":")
        if not sep or not step_text.strip().isdigit() or not body.strip():
            raise GrowkitError(f"--grow-at {spec!r}: expected STEP:KEY=VALUE[,KEY=VALUE...], e.g. 300:width=2x")
        request: dict[str, Any] = {"noise_snr_db": DEFAULT_NOISE_SNR_DB}
        for item in body.split(","):
            key, eq, value = (part.strip() for part in item.partition("="))
            if key not in _KEYS or not eq or not value:
                raise GrowkitError(f"--grow-at {spec!r}: {item.strip()!r} is not KEY=VALUE with KEY one of "
                                   f"{', '.join(_KEYS)}")
            name, parse = _KEYS[key]
            try:
                request[name] = parse(value)
            except ValueError:
                raise GrowkitError(f"--grow-at {spec!r}: {key} needs {_WANTS.get(key, 'a number')}, got {value!r}") \
                    from None
        points.append(GrowthPoint(int(step_text), request, spec))
    points.sort(key=lambda p: p.step)
    for a, b in zip(points, points[1:]):
        if a.step == b.step:
            raise GrowkitError(f"--grow-at: two growth points at step {a.step} ({a.spec!r}, {b.spec!r}); "
                               "put both changes in one SPEC")
    return points


def check_schedule(config: dict[str, Any], points: Sequence[GrowthPoint], start: int, steps: int) -> None:
    """Every point lies inside the run and asks for a growth its model allows, checked on shapes before training.
    (Points after one whose operator needs the weights to decide are checked when they come.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    for point in points:
        if not start <= point.step < steps:
            raise GrowkitError(f"--grow-at {point.spec!r}: step must be in [{start}, {steps}) for this run")
    for point in points:
        if point.request.get("method", "clone") not in _SHAPE_ONLY:
            return
        model_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
        request = {k: v for k, v in point.request.items() if k != "freeze"}  # freezing is not part of the growth
        config = growth_of_model(model, source=f"--grow-at {point.spec!r}", **request).config


def growths_before(resume_from: Path | None, points: Sequence[GrowthPoint]) -> int:
    """How many of `points` a run had carried out when it saved the checkpoint `resume_from` (0 without one)."""
    if resume_from is None:
        return 0
    step = json.loads((Path(resume_from) / "trainer_state.json").read_text())["step"]
    return sum(point.step < step for point in points)


def resume_model_dir(checkpoint: Path, resume_from: Path | None, specs: Sequence[str]) -> Path:
    """Where a run's model is loaded from: its input checkpoint, or the checkpoint it resumes from when the run had
    already grown there (that model has the grown shapes; `accelerator.load_state` then fills in the rest)."""
    return Path(resume_from) if resume_from is not None and growths_before(resume_from, parse_grow_at(specs)) \
        else checkpoint


def resume_groups(model: Any, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The group layout `grow_state` gives a grown optimizer (one per trainable tensor, `named_parameters` order),
    for loading that optimizer's saved state; the values are placeholders that loading replaces."""
    template = {k: v for k, v in groups[0].items() if k not in ("params", "param_names")}
    return [{**template, "params": [p], "param_names": [name]}
            for name, p in model.named_parameters() if p.requires_grad]


class LoopGrowth:
    """The growth points of one `fit` run; `at` carries out those due at a step, on every process alike."""

    def __init__(self, specs: Sequence[str], accelerator: Any, log: Callable[[str], None]) -> None:
        self.points = parse_grow_at(specs)
        self.accelerator = accelerator
        self.log = log
        self.done: list[dict[str, Any]] = []
        # Saved with every checkpoint (so resuming lists the same objects whether or not anything is frozen yet).
        self.frozen = FrozenEntries()
        accelerator.register_for_checkpointing(self.frozen)
        self.freeze_restored = False

    def groups(self, model: Any, groups: list[dict[str, Any]], resume_from: Path | None) -> list[dict[str, Any]]:
        """The optimizer groups to build: `groups`, or the grown layout when resuming after a growth."""
        return resume_groups(model, groups) if growths_before(resume_from, self.points) else groups

    def at(self, step: int, model: Any, optimizer: Any, scheduler: Any) -> tuple[Any, Any]:
        if not self.freeze_restored:  # a run resumed under a freeze: hold the same entries again
            self.freeze_restored = True
            if self.frozen.masks:
                Freeze(self.accelerator.unwrap_model(model), optimizer.optimizer, self.frozen.masks)
        for point in self.points:
            if point.step == step:
                before = sum(p.numel() for p in model.parameters())
                model, optimizer, _, grown = grow_prepared_run(self.accelerator, model, optimizer, scheduler,
                                                               **point.request)
                self.frozen.masks = grown.trainable
                after = sum(p.numel() for p in model.parameters())
                self.log(f"grew at step {step} ({point.spec}): {before:,} -> {after:,} parameters")
                self.done.append({"step": step, "spec": point.spec, "parameters": [before, after]})
        return model, optimizer
