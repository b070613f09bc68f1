"""Model cards: the README.md every growkit checkpoint carries, built from its provenance (growkit.json).

Why: a grown model on the Hub is only useful if readers can see what it was grown from, how, whether the function
was preserved, and how to make it again. The YAML front matter comes from `huggingface_hub.ModelCardData`, so the
Hub's model tree links the checkpoint to its source (`base_model`) when the source's Hub id is known.

Provenance keys beyond the core format (CONTRACT.md), all optional:
  "training":   the summary growkit.train writes into growkit.json: {"steps", "tokens", "train_loss" (mean of the
                 last 20 steps), "eval_loss", "elapsed_s", "mup", "mup_base", "data", "eval_data",
                 "config": {"lr", "batch_size", "seq_len", "schedule", ...}}
  "evaluation": {"loss": float, "source_loss": float, "tokens": int, "seq_len": int, "data": str}
  "recipe":     the recipe that made the checkpoint, as a dict (shown as YAML under "Reproduce")
  "source": {"license": str} overrides the license read from the source's own README.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml


AXES = ("hidden", "ffn", "heads", "kv_heads", "head_dim", "layers", "vocab")
# The Hub's model tree knows adapter / merge / quantized / finetune; a grown model is a derived full checkpoint
# whose weights come from the base, which the Hub files under "finetune".
BASE_MODEL_RELATION = "finetune"
_TRAINING_LABELS = {
    "steps": "optimizer steps",
    "tokens": "tokens seen",
    "train_loss": "final training loss (mean of the last 20 steps)",
    "eval_loss": "final validation loss",
    "elapsed_s": "wall time (s)",
    "processes": "processes",
    "mup": "µP learning-rate groups",
    "mup_base": "µP base shapes from",
    "data": "training data",
    "eval_data": "validation data",
}
_TRAINING_CONFIG = ("lr", "batch_size", "grad_accum", "seq_len", "schedule", "warmup", "weight_decay", "seed")


def write_model_card(out_dir: Path, provenance: dict, title: str | None = None) -> Path:
    """Write `out_dir/README.md` (front matter + body) from `provenance`; returns the path.

    The title defaults to one made from the provenance, not from `out_dir`'s name: the writer calls this inside its
    temporary directory, whose name is not the checkpoint's.
    """
    from huggingface_hub import ModelCard

    out_dir = Path(out_dir)
    data = card_data(provenance)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(provenance, title)}")
    path = out_dir / "README.md"
    card.save(path)
    return path


def card_data(provenance: dict) -> Any:
    """The card's front matter as a `ModelCardData`."""
    from huggingface_hub import ModelCardData

    source = provenance.get("source") or {}
    hub_id = source.get("hub_id")
    model_type = source.get("model_type") or (source.get("config") or {}).get("model_type")
    operator = provenance.get("operator")
    tags = ["growkit", "model-growth"]
    tags += ["model-shrinking"] if provenance.get("kind") == "shrink" else []
    tags += [t for t in (model_type, operator) if t]
    extra: dict[str, Any] = {}
    if hub_id:
        extra["base_model_relation"] = BASE_MODEL_RELATION
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        base_model=hub_id or None,
        license=source.get("license") or source_license(source.get("path")),
        **extra,
    )


def source_license(source_path: str | None) -> str | None:
    """The license in the source checkpoint's own README.md front matter, if it has one (read locally only)."""
    from huggingface_hub import metadata_load

    if not source_path:
        return None
    readme = Path(source_path) / "README.md"
    if not readme.is_file():
        return None
    try:
        meta = metadata_load(readme) or {}
    except (ValueError, yaml.YAMLError, UnicodeDecodeError):
        return None  # a broken source card should not stop us writing ours
    license_ = meta.get("license")
    return license_ if isinstance(license_, str) else None


def card_body(provenance: dict, title: str | None = None) -> str:
    """Markdown body: what was grown from what, how, how faithfully, what training followed, how to reproduce."""
    source = provenance.get("source") or {}
    source_name = source.get("hub_id") or (Path(source["path"]).name if source.get("path") else "an unnamed checkpoint")
    if provenance.get("kind") == "train":  # `growkit train` on a checkpoint growkit did not make: no growth to show
        parts = [f"# {title or f'{source_name}, trained with growkit'}", "",
                 f"This checkpoint was trained from `{source_name}` with growkit {provenance.get('growkit_version', '')}"
                 " (`growkit train`).", "", "## Training", "", _training(provenance.get("training") or {}),
                 "", "## Reproduce", "", _reproduce(provenance)]
        return "\n".join(parts) + "\n"
    verb = "grown" if provenance.get("kind", "grow") != "shrink" else "shrunk"
    title = title or f"{source_name}, {verb} with growkit ({provenance.get('operator')})"
    parts = [f"# {title}", ""]
    parts.append(
        f"This {source.get('model_type') or 'model'} checkpoint was {verb} zero-shot from `{source_name}` with "
        f"growkit {provenance.get('growkit_version', '')}: its weights were computed from the source's weights, "
        "not trained from scratch."
    )
    parts += ["", "## Sizes", "", _sizes_table(provenance.get("sizes") or {}, provenance.get("parameters"))]
    parts += ["", "## Method", "", _method(provenance)]
    parts += ["", "## Function preservation", "", _verification(provenance.get("verification"))]
    if provenance.get("training"):
        parts += ["", "## Training after growth", "", _training(provenance["training"])]
    if provenance.get("evaluation"):
        parts += ["", "## Evaluation", "", _evaluation(provenance["evaluation"])]
    parts += ["", "## Reproduce", "", _reproduce(provenance)]
    return "\n".join(parts) + "\n"


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.4f}".rstrip("0").rstrip(".")


def _sizes_table(sizes: dict, parameters: list | None) -> str:
    rows = ["| axis | source | new | ratio |", "|---|---:|---:|---:|"]
    ordered = [a for a in AXES if a in sizes] + sorted(a for a in sizes if a not in AXES)
    for axis in ordered:
        pair = sizes.get(axis)
        if not pair or pair[0] is None or pair[1] is None:
            continue
        old, new = pair
        ratio = f"{new / old:.3g}x" if old else "-"
        rows.append(f"| {axis} | {_num(old)} | {_num(new)} | {ratio} |")
    if parameters and len(parameters) == 2 and parameters[0]:
        old, new = parameters
        rows.append(f"| **parameters** | {_num(old)} | {_num(new)} | {new / old:.3g}x |")
    return "\n".join(rows)


def _method(provenance: dict) -> str:
    options = dict(provenance.get("options") or {})
    lines = [f"- operator: `{provenance.get('operator', 'unknown')}`"]
    if provenance.get("depth_method"):
        lines.append(f"- depth method: `{provenance['depth_method']}`")
    if provenance.get("layer_map") and provenance.get("depth_method"):
        lines.append(f"- source layer of each new layer: {provenance['layer_map']}")
    if provenance.get("identity_layers"):
        lines.append(f"- layers initialised as identity (residual writers zeroed): {provenance['identity_layers']}")
    lines.append(f"- seed: {options.pop('seed', 'not recorded')}")
    for key in sorted(options):
        value = options[key]
        if isinstance(value, dict):  # e.g. subclone's loss per rescale candidate: one sub-item each, in order
            lines.append(f"- {key}:")
            lines += [f"  - `{k}`: {v}" for k, v in value.items()]
        elif value is not None:
            lines.append(f"- {key}: {value}")
    return "\n".join(lines)


def _verification(verification: dict | None) -> str:
    if not verification:
        return "Not measured for this checkpoint (`growkit grow --verify` measures it)."
    lines = ["Grown model vs. source on the same input (fp32):", ""]
    labels = {"max_abs_dlogits": "max \\|Δlogits\\|", "dloss": "Δloss (grown − source)",
              "source_loss": "source loss", "grown_loss": "grown loss", "tokens": "input tokens",
              "max_abs_logit": "max \\|logit\\| (for scale)"}
    for key, value in verification.items():
        if value is not None and value != []:
            lines.append(f"- {labels.get(key, key)}: {_num(value)}")
    return "\n".join(lines)


def _training(training: dict) -> str:
    lines = []
    for key, label in _TRAINING_LABELS.items():
        value = training.get(key)
        if isinstance(value, list):
            value = ", ".join(f"`{Path(str(v)).name}`" for v in value) or None
        if value is not None:
            lines.append(f"- {label}: {_num(value)}")
    config = training.get("config") or {}
    settings = [f"{k}={config[k]}" for k in _TRAINING_CONFIG if config.get(k) is not None]
    if settings:
        lines.append(f"- settings: {', '.join(settings)}")
    return "\n".join(lines) or "Trained after growth (no summary recorded)."


def _evaluation(evaluation: dict) -> str:
    tokens, data = evaluation.get("tokens"), evaluation.get("data")
    head = "Validation loss (mean next-token cross-entropy, nats)"
    head += f" on {_num(tokens)} tokens" if tokens else ""
    head += f" of {data}" if data else ""
    lines = [head + ":", ""]
    lines.append(f"- this model: {_num(evaluation.get('loss'))}")
    if evaluation.get("source_loss") is not None:
        lines.append(f"- source model: {_num(evaluation['source_loss'])}")
    return "\n".join(lines)


def _reproduce(provenance: dict) -> str:
    command = provenance.get("command")
    recipe = provenance.get("recipe")
    lines = []
    if recipe:
        lines += ["Recipe:", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    if command and command != "python api":
        lines += ["```bash", command, "```"]
    elif not recipe:
        lines += ["Made with the Python API; the equivalent call:", "", "```python", _api_call(provenance), "```"]
    return "\n".join(lines).rstrip()


def _api_call(provenance: dict) -> str:
    """`growkit.grow(...)` with every changed size spelled out, so it reproduces the growth from the card alone."""
    source = (provenance.get("source") or {}).get("path") or "SOURCE"
    args = [repr(source)]
    for axis, pair in (provenance.get("sizes") or {}).items():
        if axis in ("hidden", "ffn", "heads", "kv_heads", "layers") and pair and pair[0] != pair[1]:
            args.append(f"{axis}={pair[1]}")
    args.append(f"method={provenance.get('operator')!r}")
    if provenance.get("depth_method"):
        args.append(f"depth_method={provenance['depth_method']!r}")
    options = provenance.get("options") or {}
    args += [f"{k}={options[k]!r}" for k in ("seed", "noise_snr_db") if options.get(k) is not None]
    fn = "shrink" if provenance.get("kind") == "shrink" else "grow"
    return f"import growkit\n\ngrowkit.{fn}({', '.join(args)})"

