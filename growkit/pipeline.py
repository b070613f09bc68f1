"""The growth pipeline: checkpoint -> architecture -> plan -> operator maps -> apply -> writer.

`grow` streams a checkpoint on disk tensor by tensor into a new one; `grow_model` does the same in memory for
training pipelines. Both share `plan_growth` and `grown_tensors`, so the two can never disagree.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from growkit import __version__
from growkit.apply import ApplyOptions, apply_tensor
from growkit.arch.moe import expert_kernel_note
from growkit.arch.registry import family_for
from growkit.arch.spec import Family, Sizes, TensorSpec, parameter_count, rms_stream
from growkit.arch.validate import check_source_config, config_problem, size_type_problem
from growkit.checkpoint.experts import split_fused_experts
from growkit.checkpoint.files import check_support_files, copy_support_files
from growkit.checkpoint.outputs import check_output
from growkit.checkpoint.reader import Checkpoint, StateDictCheckpoint, load_checkpoint
from growkit.checkpoint.writer import CheckpointWriter, TensorEntry, parse_size, scan_temporaries
from growkit.errors import GrowkitError
from growkit.maps import GrowthMaps
from growkit.operators import get_operator
from growkit.operators.base import Candidates, Operator
from growkit.plan import Direction, GrowthPlan, check_limits, check_loadable, make_plan
from growkit.resources import check_disk, check_memory
from growkit.verify import empty_model, fill_model, next_token_loss, verify_growth

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Growth:
    """Everything decided before the first weight is read."""

    ckpt: Checkpoint
    family: Family
    specs: list[TensorSpec]
    plan: GrowthPlan
    operator: Operator
    maps: GrowthMaps
    opts: ApplyOptions
    config: dict[str, Any]

    def entries(self, dtype: torch.dtype) -> list[tuple[TensorEntry, TensorSpec, int | None]]:
        """Output tensors in write order: globals, then layer by layer, with their specs and new layer index."""
        target = self.plan.target
        out = []
        for layer in [None, *range(target.layers)]:
            for spec in self.specs:
                if spec.per_layer == (layer is not None):
                    shape = target.shape(spec)
                    out.append((TensorEntry(spec.at(layer), shape, dtype), spec, layer))
        return out


@dataclass
class GrowResult:
    out_dir: Path
    provenance: dict[str, Any]
    plan: GrowthPlan


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise GrowkitError(f"--dtype: expected one of {', '.join(_DTYPE_NAMES)}, got {dtype!r}")
    return _DTYPE_NAMES[dtype]


def check_tensors(ckpt: Checkpoint, family: Family, specs: list[TensorSpec], sizes: Sizes) -> None:
    """Every expected tensor is present with the shape the config implies; nothing unknown is silently dropped."""
    names = set(ckpt.names())
    expected: set[str] = set()
    for spec, layer in ((spec, layer) for spec in specs for layer in (range(sizes.layers) if spec.per_layer else [None])):
        # Checked as they are listed, so a config claiming 10**12 layers fails at the first missing one.
        name, shape = spec.at(layer), sizes.shape(spec)
        expected.add(name)
        if name not in names:
            raise GrowkitError(f"{ckpt.source}: tensor {name} is missing (expected for a {ckpt.model_type} model "
                               f"with this config)")
        if ckpt.shape(name) != shape:
            raise GrowkitError(f"{ckpt.source}: tensor {name} has shape {list(ckpt.shape(name))}, but the config "
                               f"implies {list(shape)}")
        if not ckpt.dtype(name).is_floating_point:
            raise GrowkitError(f"{ckpt.source}: tensor {name} has non-float dtype {ckpt.dtype(name)}")
    tied_head = {"lm_head.weight"} if family.tied(ckpt.config) else set()
    for name in sorted(names - expected):
        if name in tied_head or any(name.endswith(s) for s in family.ignorable):
            continue
        raise GrowkitError(f"{ckpt.source}: unexpected tensor {name} for a {ckpt.model_type} model with this config")


@contextmanager
def config_errors(source: str) -> Iterator[None]:
    """A config field that is missing or of the wrong type becomes a one-line error naming the checkpoint.

    The families read their fields plainly (`int(config["n_embd"])`); this is the one place that turns what such a
    read raises on a malformed config.json into a message, instead of validating every field twice.
    """
    try:
        yield
    except GrowkitError as exc:  # the families' own checks say "config: ..."; say which checkpoint's
        message = str(exc)
        raise GrowkitError(message if message.startswith(source) else f"{source}: {message}") from None
    except KeyError as exc:
        raise GrowkitError(f"{source}: config has no {exc.args[0]!r} field") from None
    except ZeroDivisionError as exc:
        raise GrowkitError(f"{source}: config has a size of zero ({exc})") from None
    except (TypeError, ValueError, ArithmeticError, IndexError, AttributeError) as exc:
        raise GrowkitError(f"{source}: config has a malformed field ({type(exc).__name__}: {exc})") from None


#: torch's generators take a seed in [0, 2**64); numpy's (training) in [0, 2**32). Grow and shrink accept what torch
#: does up to the largest signed 64-bit value, which every seed-taking library accepts as an integer.
MAX_SEED = 2**63 - 1


def check_seed(seed: int, option: str = "--seed", maximum: int = MAX_SEED) -> None:
    """A seed outside what the random generators take is refused here rather than as an overflow deep inside."""
    if not 0 <= seed <= maximum:
        raise GrowkitError(f"{option} must be an integer from 0 to {maximum}, got {seed}")


def check_noise_snr_db(snr_db: float | None) -> None:
    """Symmetric noise cancels across copies only up to rounding, and that rounding error scales with the noise: at
    0 dB it is as large as the output dtype's rounding of the weights themselves, below that the noise, not the
    weights, sets how far the written model is from the source (and far enough below, noise overflows to Inf)."""
    if snr_db is None:
        return
    if not math.isfinite(snr_db) or snr_db < 0:
        raise GrowkitError(f"--noise-snr-db must be a finite number of at least 0 dB (noise no larger than the "
                           f"weights it perturbs), got {snr_db}")


def checked_sizes(sizes: Sizes, source: str) -> Sizes:
    """Every size the plan uses must be positive (a config with n_head 0 or hidden -1 is not a model)."""
    for name, value in sizes.as_dict().items():
        if value <= 0:
            raise GrowkitError(f"{source}: config gives {name} = {value}; it must be positive")
    return sizes


def clean_temporaries(out: Path) -> None:
    """Remove temporary directories that crashed runs left beside `out`; report those whose owner may be alive."""
    for tmp in scan_temporaries(out):
        if tmp.state == "stale":
            print(f"growkit: removing {tmp.describe()}", file=sys.stderr)
            shutil.rmtree(tmp.path, ignore_errors=True)
        else:
            print(f"growkit: note: {tmp.describe()}", file=sys.stderr)


def plan_growth(ckpt: Checkpoint, *, width: str | float | None = None, hidden: int | None = None,
                ffn: int | None = None, heads: int | None = None, kv_heads: int | None = None,
                layers: str | int | None = None, method: str = "clone", depth_method: str = "stack",
                noise_snr_db: float | None = None, seed: int = 0, direction: Direction = "grow",
                operator_options: Mapping[str, Any] | None = None) -> Growth:
    """Validate a request against a checkpoint and decide every axis map; reads headers only (and whatever weights
    an operator needs to decide, such as a fitted measure)."""
    check_seed(seed)
    check_noise_snr_db(noise_snr_db)
    family = family_for(ckpt.config, ckpt.source)
    if (problem := size_type_problem(ckpt.config)) is not None:
        raise GrowkitError(f"{ckpt.source}: config: {problem}")
    with config_errors(ckpt.source):
        source = checked_sizes(family.sizes(ckpt.config), ckpt.source)
        specs = family.tensors(ckpt.config, ckpt.names())
    check_tensors(ckpt, family, specs, source)
    check_source_config(family, ckpt.config, ckpt.source)
    if ckpt.root is not None:
        check_support_files(ckpt.root)
    request = dict(width=width, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers, method=method,
                   depth_method=depth_method, direction=direction)
    try:
        plan = make_plan(family, source, **request)
        operator = get_operator(method, **dict(operator_options or {}))
        inexact = check_limits(family, ckpt.config, plan)
        refusal = family.refusal(ckpt.config, plan)
        if refusal is not None:
            raise GrowkitError(refusal)
        check_loadable(family, ckpt.config, plan, request, operator.check)
        operator.check(plan)
    except GrowkitError as exc:  # name the checkpoint the impossible request was made of
        raise GrowkitError(f"{ckpt.source}: {exc}") from None
    for note in inexact if direction == "grow" else []:
        print(f"growkit: note: {note}", file=sys.stderr)
    maps = operator.build_maps(ckpt, family, specs, plan, seed)
    if isinstance(maps, Candidates):
        maps = best_candidate(ckpt, family, specs, plan, operator, maps, seed)
    return growth_with_maps(ckpt, family, specs, plan, operator, maps, seed, noise_snr_db)


def best_candidate(ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan, operator: Operator,
                   candidates: Candidates, seed: int) -> GrowthMaps:
    """The candidate maps whose model has the lowest next-token loss on the held-out tokens, each built in memory
    (written over the last one's model while their configs agree); the operator is told the choice and the losses."""
    losses: dict[str, float] = {}
    model, config = None, None
    for name, maps in candidates.maps.items():
        growth = growth_with_maps(ckpt, family, specs, plan, operator, maps, seed)
        model = grown_model(growth, into=model if growth.config == config else None).eval()
        config = growth.config
        losses[name] = next_token_loss(model, candidates.heldout, batch_size=1)
    del model
    best = min(losses, key=losses.__getitem__)
    operator.chosen(best, losses)
    return candidates.maps[best]


def growth_with_maps(ckpt: Checkpoint, family: Family, specs: list[TensorSpec], plan: GrowthPlan,
                     operator: Operator, maps: GrowthMaps, seed: int = 0,
                     noise_snr_db: float | None = None) -> Growth:
    """The growth that a set of axis maps makes: the new config and the apply options (an operator that tries
    several candidate maps, such as subclone's `rescale="auto"`, builds each candidate through this)."""
    with config_errors(ckpt.source):
        config = family.rewrite_config(ckpt.config, plan.target, maps.layer_src)
    problem = config_problem(family, config)
    if problem is not None:  # the plan's config passed; this one differs only by the layer map
        raise GrowkitError(f"{ckpt.source}: the {plan.direction} would write a config that does not load: {problem}")
    opts = ApplyOptions(tied=family.tied(ckpt.config), rms_stream=rms_stream(specs), seed=seed,
                        noise_snr_db=noise_snr_db)
    return Growth(ckpt, family, specs, plan, operator, maps, opts, config)


def grown_tensors(growth: Growth, dtype: torch.dtype, quiet: bool = True,
                  allow_nonfinite: bool = False) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """Yield each output tensor in write order, computed in fp32 from its one source tensor."""
    entries = growth.entries(dtype)
    checked: set[str] = set()
    for entry, spec, layer in tqdm(entries, desc="growing", unit="tensor", disable=quiet, file=sys.stderr):
        src_layer = None if layer is None else growth.maps.layer_src[layer]
        src_name = spec.at(src_layer)
        x = growth.ckpt.get(src_name)
        if not allow_nonfinite and src_name not in checked:
            if not all_finite(x):
                raise GrowkitError(f"{growth.ckpt.source}: tensor {src_name} contains NaN or Inf "
                                   "(pass --allow-nonfinite to grow it anyway)")
            checked.add(src_name)
        y = apply_tensor(x, spec, layer, growth.plan.source, growth.maps, growth.opts)
        out = y.to(dtype)
        if not all_finite(out) and (not allow_nonfinite or all_finite(x)):
            raise GrowkitError(f"{growth.ckpt.source}: output tensor {entry.name} {_nonfinite_cause(y, dtype)}; "
                               "nothing was written")
        yield entry, out


def _nonfinite_cause(grown: torch.Tensor, dtype: torch.dtype) -> str:
    """Why a grown tensor (fp32, before the cast to `dtype`) is not finite once cast."""
    if not all_finite(grown):
        return "would contain NaN or Inf after growth (from --noise-snr-db or the operator)"
    top = float(grown.abs().max())
    name = str(dtype).removeprefix("torch.")
    return (f"would overflow to Inf: value {top:.4g} exceeds {name}'s range (max {torch.finfo(dtype).max:.4g}); "
            "use --dtype bf16 or fp32")


@contextmanager
def single_threaded() -> Iterator[None]:
    """Growth is gathers and copies bound by memory and disk, not arithmetic: torch's intra-op threads add nothing
    there and, on a busy machine, their spin-waiting cost 5x the CPU and 3x the wall time (GPT-2 small -> medium:
    30 s with 2 threads, 11 s with 1, on a loaded 2-core machine). The previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in `x`. A sum is finite exactly when every term is, unless it overflows (then check exactly):
    one pass with no allocation, where `isfinite(x).all()` writes a boolean tensor as large as `x`."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _config_with_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    name = str(dtype).removeprefix("torch.")
    config = dict(config)
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    if "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = name
    return config


def provenance_for(growth: Growth, source_path: str, command: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The growkit.json record: enough to reproduce the growth and to recover the small model's shapes (µP)."""
    plan = growth.plan
    rows = {k: [old, new] for k, old, new in plan.rows()}
    return {
        "growkit_version": __version__,
        "kind": plan.direction,
        "source": {"path": source_path, "model_type": growth.ckpt.model_type, "config": growth.ckpt.config,
                   "config_inferred": growth.ckpt.config_inferred, "hub_id": options.get("base_model"),
                   **growth.ckpt.origin()},
        "sizes": rows,
        "operator": plan.method,
        "depth_method": plan.depth_method,
        "layer_map": growth.maps.layer_src,
        "identity_layers": sorted(growth.maps.identity_layers),
        "options": {k: v for k, v in options.items() if k != "base_model"},
        "parameters": [parameter_count(growth.specs, plan.source), parameter_count(growth.specs, plan.target)],
        "command": command or "python api",
        "verification": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


#: the default output's suffix, by what is done to the source
_OUTPUT_SUFFIX = {"grow": "grown", "shrink": "shrunk", "upcycle": "moe"}


def default_output(src: Path, kind: Direction | Literal["upcycle"] = "grow") -> Path:
    """`small.safetensors` -> `small-grown/` beside it; `dir/` -> `dir-grown/` (`-shrunk`, `-moe` likewise)."""
    base = src.stem if src.is_file() else src.resolve().name
    return src.parent / f"{base}-{_OUTPUT_SUFFIX[kind]}"


def checked_arguments(src: Path, out: str | Path | None, kind: Direction | Literal["upcycle"],
                      config: str | Path | Mapping[str, Any] | None, operator_options: Mapping[str, Any] | None,
                      overwrite: bool, seed: int, dtype: str | torch.dtype | None,
                      max_shard_size: str | int) -> tuple[Path, int, torch.dtype | None]:
    """Checks of the arguments alone, made before the source is loaded (loading can be costly: a GGUF file is
    dequantized whole): shard size, seed, dtype, and an output path (default `default_output`) that may be written.
    Returns (out, shard bytes, the dtype asked for or None)."""
    shard_bytes = parse_size(max_shard_size)
    check_seed(seed)
    asked_dtype = parse_dtype(dtype)
    out = Path(out) if out is not None else default_output(src, kind)
    check_output(out, input_paths(src, config, operator_options), overwrite)
    return out, shard_bytes, asked_dtype


def grow(src: str | Path, out: str | Path | None = None, *, width: str | float | None = None,
         hidden: int | None = None, ffn: int | None = None, heads: int | None = None, kv_heads: int | None = None,
         layers: str | int | None = None, method: str = "clone", depth_method: str = "stack",
         noise_snr_db: float | None = None, seed: int = 0, dtype: str | torch.dtype | None = None,
         max_shard_size: str | int = "5GB", overwrite: bool = False, quiet: bool = False,
         config: str | Path | Mapping[str, Any] | None = None, verify: bool = False, allow_pickle: bool = False,
         allow_nonfinite: bool = False, base_model: str | None = None, command: str | None = None,
         direction: Direction = "grow", operator_options: Mapping[str, Any] | None = None) -> GrowResult:
    """Grow the checkpoint at `src` into a new Hugging Face checkpoint directory `out`, streamed and atomic."""
    src = Path(src)
    check_noise_snr_db(noise_snr_db)
    out, shard_bytes, asked_dtype = checked_arguments(src, out, direction, config, operator_options, overwrite, seed,
                                                      dtype, max_shard_size)
    ckpt = load_checkpoint(src, config=config, allow_pickle=allow_pickle, quiet=quiet)
    growth = plan_growth(ckpt, width=width, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers,
                         method=method, depth_method=depth_method, noise_snr_db=noise_snr_db, seed=seed,
                         direction=direction, operator_options=operator_options)
    out_dtype = asked_dtype or ckpt.storage_dtype()
    options = {"seed": seed, "noise_snr_db": noise_snr_db, "dtype": str(out_dtype).removeprefix("torch."),
               "base_model": base_model, **dict(operator_options or {}), **growth.operator.settings()}
    provenance = provenance_for(growth, str(src), command, options)
    new_config = _config_with_dtype(growth.config, out_dtype)
    if (kernel := expert_kernel_note(new_config, out_dtype)) is not None:
        print(f"growkit: note: {kernel}", file=sys.stderr)
        provenance["notes"] = [kernel]
    metadata = {"format": "pt", "growkit": json.dumps({k: provenance[k] for k in ("growkit_version", "operator",
                                                                                    "sizes", "options")}),
                "config": json.dumps(new_config, sort_keys=True)}
    clean_temporaries(out)
    entries = [e for e, _, _ in growth.entries(out_dtype)]
    with CheckpointWriter(out, entries, shard_bytes, metadata, overwrite=overwrite) as writer:
        check_fits(growth, out, out_dtype, verify)  # once the writer knows the output's directory is writable
        write_weights_and_config(writer, grown_tensors(growth, out_dtype, quiet=quiet,
                                                       allow_nonfinite=allow_nonfinite), new_config, ckpt)
        if verify:
            provenance["verification"] = verify_growth(ckpt, writer.tmp, seed=seed)
            provenance["verification"]["config_inferred"] = ckpt.config_inferred is not None
        writer.add_file("growkit.json", json.dumps(provenance, indent=2) + "\n")
        with writer.guard("README.md"):
            _write_card(writer.tmp, provenance)
        out_dir = writer.commit()
    return GrowResult(out_dir=out_dir, provenance=provenance, plan=growth.plan)


def write_weights_and_config(writer: CheckpointWriter, tensors: Iterator[tuple[TensorEntry, torch.Tensor]],
                             config: dict[str, Any], ckpt: Checkpoint) -> None:
    """Stream the output's tensors into `writer` (single-threaded), then its config.json and the source's tokenizer
    and generation files: what every command that writes a checkpoint from a source does, in this order."""
    with single_threaded():
        for entry, tensor in tensors:
            writer.add(entry.name, tensor)
    writer.finish_weights()
    writer.add_file("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if ckpt.root is not None:
        copy_support_files(ckpt.root, writer)


def check_fits(growth: Growth, out: Path, dtype: torch.dtype, verify: bool = False) -> None:
    """Refuse, before allocating, an output that cannot fit on disk or a tensor that cannot fit in memory (peak: one
    output tensor in fp32, its cast to `dtype` if that differs, and its source tensor; `verify` holds both whole
    models in fp32)."""
    entries = growth.entries(dtype)
    params = parameter_count(growth.specs, growth.plan.target)
    name = str(dtype).removeprefix("torch.")
    check_disk(out, sum(e.nbytes for e, _, _ in entries), f"the output ({params:,} parameters in {name})")
    fp32 = torch.float32.itemsize
    peak, largest = 0, entries[0][0]
    for entry, spec, layer in entries:
        src = growth.ckpt.shape(spec.at(None if layer is None else growth.maps.layer_src[layer]))
        need = (math.prod(entry.shape) + math.prod(src)) * fp32 + (entry.nbytes if dtype != torch.float32 else 0)
        if need > peak:
            peak, largest = need, entry
    check_memory(growth.ckpt.source, peak, f"growing tensor {largest.name} {list(largest.shape)}")
    if verify:
        both = (parameter_count(growth.specs, growth.plan.source) + params) * fp32
        check_memory(growth.ckpt.source, both, "--verify (source and output models in fp32)")


def _write_card(directory: Path, provenance: dict[str, Any]) -> None:
    """A model card with the growth's provenance, once the hub module that writes it is installed."""
    try:
        from growkit.hub.card import write_model_card
    except ImportError:
        return
    write_model_card(directory, provenance)


def input_paths(src: Path, config: str | Path | Mapping[str, Any] | None,
                operator_options: Mapping[str, Any] | None) -> list[str | Path]:
    """Every file or directory a growth reads: the source, a --config file, calibration text and its tokenizer."""
    options = dict(operator_options or {})
    calibration = options.get("calibration") or []
    return [src, *([config] if isinstance(config, (str, Path)) else []),
            *([calibration] if isinstance(calibration, (str, Path)) else calibration),
            *([options["tokenizer"]] if options.get("tokenizer") else [])]


def grow_model(model: Any, *, width: str | float | None = None, hidden: int | None = None, ffn: int | None = None,
               heads: int | None = None, kv_heads: int | None = None, layers: str | int | None = None,
               method: str = "clone", depth_method: str = "stack", noise_snr_db: float | None = None,
               seed: int = 0, direction: Direction = "grow",
               operator_options: Mapping[str, Any] | None = None) -> Any:
    """A new `transformers` model grown from `model` in memory (fp32), for training pipelines."""
    growth = growth_of_model(model, width=width, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads,
                             layers=layers, method=method, depth_method=depth_method, noise_snr_db=noise_snr_db,
                             seed=seed, direction=direction, operator_options=operator_options)
    return grown_model(growth).to(next(model.parameters()).device)


def growth_of_model(model: Any, *, untie_head: bool = False, source: str = "<model>", **request: Any) -> Growth:
    """The growth of an in-memory `transformers` model (`request`: `plan_growth`'s keyword options).

    `untie_head` grows a tied model as the untied one that computes the same function (its state dict already holds
    the head as a copy of the embedding): the grown model gets a head of its own, exactly.
    """
    config = model.config.to_dict()
    if untie_head:
        config["tie_word_embeddings"] = False
    return plan_growth(split_fused_experts(StateDictCheckpoint(model.state_dict(), config, source)), **request)


def grown_model(growth: Growth, into: Any | None = None) -> Any:
    """The grown model as a `transformers` model in memory (fp32, on the CPU), tensor by tensor. `into`: a model of
    the grown config to overwrite in place instead of making a new one (to try several candidate growths)."""
    model = into if into is not None else empty_model(growth.config)
    with single_threaded():
        tensors = ((entry.name, tensor) for entry, tensor in grown_tensors(growth, torch.float32))
        missing, unexpected = fill_model(model, tensors, growth.opts.tied)
    if missing or unexpected:
        raise RuntimeError(f"grown state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    return model
