"""YAML recipes: one file that reproduces a whole growth run (grow, optional train, eval, optional push).

Why a file: people share and rerun growth runs the way mergekit users share merge configs, and a file can be
checked before hours of work start. Every section is validated with pydantic (unknown keys are errors, so a typo
never silently falls back to a default) and every error names the field, e.g. `recipe.yaml: grow.width: ...`.

Relative paths in a recipe are relative to the recipe file; paths given on the command line (`--source`,
`--out`) are relative to the current directory. Without `out`, the result goes to `out/<recipe name>` under the
current directory.

    source: ../models/tiny-gpt2        # or leave it out and pass --source PATH
    base_model: null                   # the source's Hub id, for the model card's base_model (model tree)
    grow: {width: 2x, method: clone}   # the options of growkit.grow
    train: {data: [stdlib:train], steps: 200, lr: 3e-3}   # optional; options of growkit.train
    eval: {data: [stdlib:val], blocks: 64, seq_len: 128}  # validation loss, the checkpoint's own tokenizer
    push: {repo_id: you/tiny-gpt2-2x}  # optional; the token comes from HF_TOKEN or the login, never the file

Data lists take files, directories, or `stdlib:train` / `stdlib:val`: this interpreter's standard-library source,
split as in growkit.train.data (the text the bundled models were trained on).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import shlex
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import typer
import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationError, ValidationInfo, field_validator,
    model_validator,
)

from growkit import interrupts
from growkit.errors import GrowkitError, Interrupted
from growkit.hub.push import REPO_ID_PATTERN

STDLIB_PREFIX = "stdlib:"
# Keys whose values are paths (or lists of them): resolved against the recipe file, or the cwd for overrides.
PATH_KEYS = ("source", "out", "grown_out", "grow.config", "train.data", "train.eval_data", "eval.data")
_NOT_TRAIN_OPTIONS = {"checkpoint", "out", "accelerator", "resume", "options"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrowSection(_Section):
    """The options of `growkit.grow` (sizes, operator, noise, seed, output format)."""

    width: float | str | None = None
    hidden: PositiveInt | None = None
    ffn: PositiveInt | None = None
    heads: PositiveInt | None = None
    kv_heads: PositiveInt | None = None
    layers: PositiveInt | str | None = None
    method: str = "clone"
    depth_method: str = "stack"
    noise_snr_db: float | None = None
    seed: int = 0
    dtype: str | None = None
    max_shard_size: str | int = "5GB"
    verify: bool = True
    config: str | None = None
    allow_pickle: bool = False
    operator_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _asks_for_something(self) -> "GrowSection":
        if all(getattr(self, k) is None for k in ("width", "hidden", "ffn", "heads", "kv_heads", "layers")):
            raise ValueError("give width or at least one of hidden, ffn, heads, kv_heads, layers")
        return self

    @field_validator("method", "depth_method")
    @classmethod
    def _known_name(cls, value: str, info: ValidationInfo) -> str:
        from growkit.operators import OPERATORS
        from growkit.operators.depth import DEPTH_METHODS

        known = sorted(OPERATORS) if info.field_name == "method" else list(DEPTH_METHODS)
        if value not in known:
            what = "method" if info.field_name == "method" else "depth method"
            raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(known)}")
        return value


class EvalSection(_Section):
    """Validation loss of the result (and of the source, to compare) on held-out text."""

    data: list[str] = Field(min_length=1)
    seq_len: PositiveInt = 128
    blocks: PositiveInt = 64
    batch_size: PositiveInt = 8
    compare_source: bool = True
    max_bytes: PositiveInt | None = 2_000_000  # of each stdlib split used (the whole val split is ~0.5 MB)


class PushSection(_Section):
    """Where `growkit.push` uploads the result; the token never belongs in a recipe."""

    repo_id: str = Field(pattern=REPO_ID_PATTERN)
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    endpoint: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and "token" in data:
            raise ValueError("token: a token does not belong in a recipe file; set HF_TOKEN or run `hf auth login`")
        return data


class Recipe(_Section):
    name: str | None = None
    description: str | None = None
    source: str | None = None
    base_model: str | None = None
    out: str | None = None
    grown_out: str | None = None
    overwrite: bool = False
    grow: GrowSection
    train: dict[str, Any] | None = None
    eval: EvalSection | None = None
    push: PushSection | None = None
    _as_written: dict[str, Any] = PrivateAttr(default_factory=dict)  # overrides applied, paths not resolved

    def as_written(self) -> dict[str, Any]:
        """The recipe as its author wrote it (plus command-line overrides): what the model card shows."""
        return copy.deepcopy(self._as_written)


@dataclass
class RecipeResult:
    """What a run did; `plan` holds the validated growth plan (also for a dry run)."""

    recipe: Recipe
    out_dir: Path
    dry_run: bool
    plan: Any = None
    provenance: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    pushed: Any = None
    summary: list[str] = field(default_factory=list)


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe; `overrides` maps dotted keys (`grow.seed`, `source`) to values."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GrowkitError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise GrowkitError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise GrowkitError(f"{path}: a recipe is a YAML mapping with at least `grow:`")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value, path)
    raw.setdefault("name", path.stem)
    resolved = copy.deepcopy(raw)
    for key in PATH_KEYS:
        in_cwd = key in (overrides or {})
        _resolve_paths(resolved, key, Path.cwd() if in_cwd else path.resolve().parent)
    try:
        recipe = Recipe.model_validate(resolved)
    except ValidationError as exc:
        raise GrowkitError(f"{path}: {_describe(exc)}") from None
    recipe._as_written = raw
    if recipe.train is not None:
        _check_train_options(recipe.train, path)
    return recipe


def _describe(exc: ValidationError) -> str:
    """Every problem as `field: message`, unknown fields first (a typo also makes the real field look missing)."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    parts = []
    for err in errors[:5]:
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field" + _did_you_mean(loc)
        elif err["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _did_you_mean(loc: list[str]) -> str:
    import difflib

    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)
                  and issubclass(a, BaseModel)]
        if not nested:
            return ""
        model = nested[0]
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(model.model_fields)})"


def _set_dotted(raw: dict, key: str, value: Any, path: Path) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise GrowkitError(f"{path}: {key}: cannot set inside {part}, which is not a mapping")
        node = child
    node[leaf] = value


def _resolve_paths(raw: dict, key: str, base: Path) -> None:
    """Make the path (or list of paths) at dotted `key` absolute against `base`; `stdlib:` entries stay as they are."""
    *parents, leaf = key.split(".")
    node: Any = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or node.get(leaf) is None:
        return

    def one(p: Any) -> Any:
        if not isinstance(p, str) or p.startswith(STDLIB_PREFIX):
            return p
        return str(base / Path(p).expanduser())

    value = node[leaf]
    node[leaf] = [one(p) for p in value] if isinstance(value, list) else one(value)


def _train_options() -> set[str]:
    """The keyword options growkit.train accepts: its named parameters plus its TrainConfig fields."""
    try:
        from growkit.train import TrainConfig
        from growkit.train.loop import train
    except ImportError:
        raise GrowkitError("train: growkit.train is not available in this installation") from None
    named = set(inspect.signature(train).parameters) - _NOT_TRAIN_OPTIONS
    return named | {f.name for f in dataclasses.fields(TrainConfig)}


def _read_float_options(train: dict[str, Any], path: Path) -> None:
    """PyYAML reads YAML 1.1, where `3e-3` (no dot) is a string, not a number: a float option written so is read
    as the number it spells, as YAML 1.2 does; a string that spells no number is refused naming the field."""
    from growkit.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for key, value in train.items():
        hint = hints.get(key)
        if isinstance(value, str) and (hint is float or float in typing.get_args(hint)):
            try:
                train[key] = float(value)
            except ValueError:
                raise GrowkitError(f"{path}: train.{key}: {value!r} is not a number") from None


def _check_train_options(train: dict[str, Any], path: Path) -> None:
    allowed = _train_options()
    for key in train:
        if key not in allowed:
            raise GrowkitError(f"{path}: train.{key}: not an option of growkit.train "
                               f"(options: {', '.join(sorted(allowed))})")
    _read_float_options(train, path)
    if not train.get("data"):
        raise GrowkitError(f"{path}: train.data: required (files, directories, or stdlib:train)")
    if "report_to" in train:  # a tracker that cannot start is refused before the growth, not after it
        from growkit.train.trackers import check_report_to

        try:
            check_report_to(train["report_to"])
        except GrowkitError as exc:
            raise GrowkitError(f"{path}: train.report_to: {exc}") from None


def run_recipe(path: str | Path, dry_run: bool = False, overrides: dict[str, Any] | None = None, *,
               quiet: bool = False, command: str | None = None,
               echo: Callable[[str], None] | None = None) -> RecipeResult:
    """Run a recipe: grow the source, optionally train, evaluate, write growkit.json and the card, optionally push.

    `dry_run` validates everything that can be checked without computing (the recipe, the source's config and
    tensor headers, the growth plan, the data paths, the push target) and returns the plan. `command` is what the
    card shows to reproduce the run; by default it is rebuilt from `path` and `overrides`. `echo` receives the plan
    before any work starts (the CLI prints it).
    """
    path = Path(path)
    recipe = load_recipe(path, overrides)
    if recipe.source is None:
        raise GrowkitError(f"{path}: source: not set; give it in the recipe or on the command line with --source PATH")
    source = Path(recipe.source)
    out = Path(recipe.out) if recipe.out else Path.cwd() / "out" / str(recipe.name)
    grown_out = Path(recipe.grown_out) if recipe.grown_out else (out.parent / f"{out.name}-grown" if recipe.train
                                                                 else out)
    command = command or _command(path, overrides)
    grow_opts = recipe.grow.model_dump()

    from growkit.checkpoint.reader import load_checkpoint
    from growkit.pipeline import grow, plan_growth

    # The same planning growkit.grow does first: config, tensor headers, sizes, operator; no weights are read.
    ckpt = load_checkpoint(source, config=recipe.grow.config, allow_pickle=recipe.grow.allow_pickle)
    planning = set(inspect.signature(plan_growth).parameters)
    try:
        growth = plan_growth(ckpt, **{k: v for k, v in grow_opts.items() if k in planning})
    except GrowkitError as exc:  # the planner speaks in CLI flags; say which recipe section it is about
        raise GrowkitError(f"{path}: grow: {exc}") from None
    result = RecipeResult(recipe=recipe, out_dir=out, dry_run=dry_run, plan=growth.plan)
    result.summary = _plan_lines(recipe, source, growth, grown_out, out)
    if echo is not None:
        for line in result.summary:
            echo(line)
    _check_data(recipe)
    if recipe.push is not None:
        from growkit.hub.push import preflight

        preflight()
    from growkit.checkpoint.outputs import check_output, check_path
    from growkit.checkpoint.writer import name_stem

    inputs = _inputs(path, recipe)
    for target in dict.fromkeys([grown_out, out]):
        if target.exists() and not recipe.overwrite:
            raise GrowkitError(f"{target}: output already exists (set overwrite: true or pass --overwrite)")
        check_output(target, inputs, recipe.overwrite, "out")
    cache = out.parent / f".{name_stem(out.name)}-data"  # stdlib text written once for training and evaluation
    check_path(cache, inputs, "out")
    if dry_run:
        return result
    for target in (grown_out, out):
        target.parent.mkdir(parents=True, exist_ok=True)

    grown = grow(source, grown_out, **grow_opts, overwrite=recipe.overwrite, quiet=quiet,
                 base_model=recipe.base_model, command=command)
    provenance = grown.provenance
    if recipe.train is not None:
        from growkit.checkpoint.writer import publish_directory, signals_held, temporary_name
        from growkit.pipeline import clean_temporaries

        interrupts.arm()  # the grown checkpoint is complete; training is interruptible again
        clean_temporaries(out)
        # Over an earlier output, train beside it and swap the result in at the end: a failed run keeps the old one.
        work = out.parent / temporary_name(out.name) if out.exists() else out
        try:
            provenance = _train(recipe, grown, work, cache, quiet)
            interrupts.arm()
            provenance = _finish(recipe, provenance, work, source, cache, command, result)
            if work != out:
                with signals_held():  # as the writer's commit: the swap happens whole, or not at all
                    interrupts.raise_if_pending()
                    publish_directory(work, out, overwrite=True)
                    interrupts.published()
        except BaseException:
            if work != out:
                shutil.rmtree(work, ignore_errors=True)
            raise
    else:
        interrupts.arm()
        provenance = _finish(recipe, provenance, out, source, cache, command, result)
    result.provenance = provenance
    if recipe.push is not None:
        from growkit.hub.push import push

        result.pushed = push(out, **recipe.push.model_dump())  # the token: HF_TOKEN or the login, as preflight found
    return result


def _finish(recipe: Recipe, provenance: dict[str, Any], out: Path, source: Path, cache: Path, command: str,
            result: RecipeResult) -> dict[str, Any]:
    """Evaluate the model in `out` (and the source) and rewrite its growkit.json and card with all the recipe did."""
    if recipe.eval is not None:
        compare = source if recipe.eval.compare_source else None
        result.evaluation = provenance["evaluation"] = evaluate_recipe(recipe.eval, out, compare, cache)
    provenance["recipe"] = recipe.as_written()
    provenance["command"] = command
    _write_provenance(out, provenance)
    return provenance


def _inputs(path: Path, recipe: Recipe) -> list[str]:
    """Every path a recipe reads: the recipe file, the source, a grow config, training and evaluation data."""
    found = [str(path), *(p for p in (recipe.source, recipe.grow.config) if p)]
    for key in ("data", "eval_data"):
        value = (recipe.train or {}).get(key) or []
        found += value if isinstance(value, list) else [value]
    return found + list(recipe.eval.data if recipe.eval else [])


def _plan_lines(recipe: Recipe, source: Path, growth: Any, grown_out: Path, out: Path) -> list[str]:
    from growkit.arch.spec import parameter_count

    plan = growth.plan
    old_n, new_n = parameter_count(growth.specs, plan.source), parameter_count(growth.specs, plan.target)
    lines = [f"recipe {recipe.name}: {source} ({growth.ckpt.model_type}) -> {grown_out}"]
    lines += [f"  {axis:9s} {old:>7} -> {new:<7}" for axis, old, new in plan.rows() if old != new]
    lines.append(f"  parameters {old_n:,} -> {new_n:,} ({new_n / old_n:.2f}x); method {plan.method}"
                 + (f", depth {plan.depth_method}" if plan.depth_method else ""))
    if recipe.train is not None:
        lines.append(f"  train {recipe.train.get('steps', 'default')} steps -> {out}")
    if recipe.eval is not None:
        lines.append(f"  eval on {', '.join(recipe.eval.data)} ({recipe.eval.blocks} blocks of {recipe.eval.seq_len})")
    if recipe.push is not None:
        branch = f" ({recipe.push.revision})" if recipe.push.revision else ""
        lines.append(f"  push to {recipe.push.repo_id}{branch}")
    return lines


def _check_data(recipe: Recipe) -> None:
    """Every data path exists now, not after an hour of growing and training."""
    lists = [("eval.data", recipe.eval.data if recipe.eval else [])]
    if recipe.train:
        for key in ("data", "eval_data"):
            value = recipe.train.get(key) or []
            lists.append((f"train.{key}", value if isinstance(value, list) else [value]))
    for key, paths in lists:
        for p in paths:
            if isinstance(p, str) and p.startswith(STDLIB_PREFIX):
                if p.removeprefix(STDLIB_PREFIX) not in ("train", "val"):
                    raise GrowkitError(f"{key}: {p!r}: expected stdlib:train or stdlib:val")
            elif not Path(p).exists():
                raise GrowkitError(f"{key}: {p}: no such file or directory")


def _materialise(paths: list[str], cache: Path, max_bytes: int | None) -> list[str]:
    """`stdlib:SPLIT` entries become one text file of that split under `cache` (written once)."""
    out = []
    for p in paths:
        if isinstance(p, str) and p.startswith(STDLIB_PREFIX):
            from growkit.train.data import write_stdlib_corpus

            split = p.removeprefix(STDLIB_PREFIX)
            target = cache / f"stdlib-{split}-{max_bytes or 'all'}.txt"
            if not target.is_file():
                write_stdlib_corpus(target, split, max_bytes)
            out.append(str(target))
        else:
            out.append(p)
    return out


def _train(recipe: Recipe, grown: Any, out: Path, cache: Path, quiet: bool) -> dict[str, Any]:
    """Continue training the grown checkpoint into `out`; returns the provenance there, which growkit.train
    completes with its "training" summary (steps, losses, µP base, settings)."""
    from growkit.train import train

    options = dict(recipe.train or {})
    for key in ("data", "eval_data"):
        if options.get(key):
            value = options[key]
            options[key] = _materialise(value if isinstance(value, list) else [value], cache, None)
    options.setdefault("quiet", quiet)
    result = train(grown.out_dir, out=out, **options)
    written = out / "growkit.json"  # written by growkit.train when the run finished
    provenance = json.loads(written.read_text(encoding="utf-8")) if written.is_file() else dict(grown.provenance)
    provenance.setdefault("training", {"steps": result.steps, "train_loss": result.train_loss,
                                       "eval_loss": result.eval_loss})
    return provenance


def evaluate_recipe(spec: EvalSection, model_dir: Path, source: Path | None, cache: Path) -> dict[str, Any]:
    """Mean next-token loss of `model_dir` (and of `source`) on the first `spec.blocks` blocks of the data."""
    files = _materialise(spec.data, cache, spec.max_bytes)
    result: dict[str, Any] = {"data": ", ".join(spec.data), "seq_len": spec.seq_len}
    result["loss"], result["tokens"] = validation_loss(model_dir, files, spec.seq_len, spec.blocks, spec.batch_size,
                                                       cache)
    if source is not None:
        result["source_loss"], _ = validation_loss(source, files, spec.seq_len, spec.blocks, spec.batch_size, cache)
    return result


def validation_loss(model_dir: Path, files: list[str], seq_len: int, blocks: int, batch_size: int,
                    cache: Path) -> tuple[float, int]:
    """Loss with the checkpoint's own tokenizer, through growkit.train's blocks and evaluation (the numbers the
    bundled models' README reports); returns (loss, tokens scored). Tokenized data is cached under `cache`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from growkit.train.blocks import load_blocks
    from growkit.train.loop import evaluate

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - any loader failure means the directory lacks a usable tokenizer
        raise GrowkitError(f"{model_dir}: eval needs the checkpoint's tokenizer, which does not load "
                           f"({type(exc).__name__})") from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise GrowkitError(f"eval.seq_len: {seq_len} exceeds the {positions} positions of {model_dir}")
    data = load_blocks(files, tokenizer, seq_len, cache)
    n = min(blocks, len(data))
    with torch.no_grad():
        loss = evaluate(model, data, batch_size=batch_size, max_blocks=n)
    return loss, n * (seq_len - 1)


def _write_provenance(out: Path, provenance: dict[str, Any]) -> None:
    """Rewrite growkit.json (atomically) and the card with what the recipe added."""
    from growkit.hub.card import write_model_card

    tmp = out / ".growkit.json.tmp"
    tmp.write_text(json.dumps(provenance, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / "growkit.json")
    write_model_card(out, provenance)


def _command(path: Path, overrides: dict[str, Any] | None) -> str:
    """The `growkit run` command line that reproduces a run with these overrides."""
    args = ["growkit", "run", str(path)]
    for key, value in (overrides or {}).items():
        if key in ("source", "out"):
            args += [f"--{key}", str(value)]
        elif key == "overwrite" and value is True:
            args.append("--overwrite")
        elif key == "push" and value is None:
            args.append("--no-push")
        else:
            args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return shlex.join(args)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs from the command line; values are YAML (`grow.seed=3` is an int, `push=null` removes)."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GrowkitError(f"--set {item!r}: expected KEY=VALUE, e.g. grow.seed=3")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise GrowkitError(f"--set {item!r}: value is not valid YAML") from None
    return parsed


def run_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe, source and plan; compute nothing."),
    source: str | None = typer.Option(None, "--source", help="Source checkpoint (overrides the recipe's)."),
    out: str | None = typer.Option(None, "--out", "-o", help="Output directory (overrides the recipe's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    no_push: bool = typer.Option(False, "--no-push", help="Skip the recipe's push section."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: KEY=VALUE with a dotted key (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run a YAML recipe: grow, optionally train, evaluate, write the model card, optionally push."""
    overrides: dict[str, Any] = {}
    if source is not None:
        overrides["source"] = source
    if out is not None:
        overrides["out"] = out
    if overwrite:
        overrides["overwrite"] = True
    if no_push:
        overrides["push"] = None
    overrides.update(parse_set(set_))
    try:
        result = run_recipe(recipe, dry_run=dry_run, overrides=overrides, quiet=quiet, echo=typer.echo)
    except KeyboardInterrupt as exc:  # typer would swallow it into a silent exit 130
        raise Interrupted(f"{recipe}: run interrupted by {str(exc) or 'SIGINT'}; finished steps keep their outputs, "
                          "the interrupted step wrote no final output") from None
    if dry_run:
        typer.echo("dry run: recipe, source and plan are valid; nothing was written")
        return
    if result.provenance and result.provenance.get("verification"):
        v = result.provenance["verification"]
        typer.echo(f"function preservation: max |dlogits| {v.get('max_abs_dlogits'):.3g}, dloss {v.get('dloss'):.3g}")
    if result.evaluation:
        e = result.evaluation
        src = f" (source {e['source_loss']:.4f})" if e.get("source_loss") is not None else ""
        typer.echo(f"validation loss {e['loss']:.4f}{src} on {e['tokens']:,} tokens")
    typer.echo(f"wrote {result.out_dir}")
    if result.pushed is not None:
        typer.echo(f"pushed to {result.pushed.repo_id}: {result.pushed.commit_url}")
