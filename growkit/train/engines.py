"""Which distributed engine a training run uses (DDP, FSDP2, DeepSpeed), set up so that it is the one asked for.

Why a module of its own: accelerate falls back without a word. A multi-process launch on CPU becomes data parallel
whatever FSDP or DeepSpeed plugin it was given, `accelerate launch --num_processes 2` without `--multi_gpu` starts
one process on a machine without GPUs, and FSDP1 leaves an optimizer built before `prepare` on parameters that no
longer train. Here a request is honoured or refused in one line, the engine that runs is stated (log, training.json)
and checked after `prepare` (every optimizer tensor is a parameter of the prepared model; FSDP really sharded it).

On CPU, accelerate 1.15 does not promote a gloo process group to FSDP or DeepSpeed (its state code only does so for
accelerator devices), although both run on gloo; `_promote_cpu_state` sets the state it would have set. That is
accelerate's private state, so pyproject pins accelerate's range, and the checks after `prepare` fail loudly if a
later version ignores the promotion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from growkit.errors import GrowkitError
from growkit.train.startup import accelerator_error

ZERO_STAGES = (1, 2, 3)
#: The accelerate release whose FSDP2 / DeepSpeed code (and private state, on CPU) this module was tested with.
ENGINES_ACCELERATE = (1, 15)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


@dataclass(frozen=True)
class EngineRequest:
    """What the run was asked to use, and who asked (a growkit option or `accelerate launch`'s environment)."""

    name: str  # "ddp" (plain data parallel, or one process), "fsdp" (FSDP2) or "deepspeed"
    source: str
    zero_stage: int | None = None
    offload: tuple[str, str] = ("none", "none")  # DeepSpeed: optimizer and parameter offload devices


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "false").lower() in ("true", "1", "yes")


def engine_request(fsdp: bool = False, deepspeed: int | None = None,
                   environ: Mapping[str, str] = os.environ) -> EngineRequest:
    """The engine asked for by `--fsdp` / `--deepspeed STAGE` or by `accelerate launch --use_fsdp/--use_deepspeed`;
    one that growkit cannot honour is refused here, before anything is loaded."""
    env_fsdp, env_ds = _flag(environ, "ACCELERATE_USE_FSDP"), _flag(environ, "ACCELERATE_USE_DEEPSPEED")
    asked = [name for name, on in (("--fsdp", fsdp), ("--deepspeed", deepspeed is not None),
                                   ("accelerate launch --use_fsdp", env_fsdp),
                                   ("accelerate launch --use_deepspeed", env_ds)) if on]
    if (fsdp or env_fsdp) and (deepspeed is not None or env_ds):
        raise GrowkitError(f"{' and '.join(asked)}: choose one engine, FSDP or DeepSpeed")
    # (accelerate itself sets ACCELERATE_USE_FSDP / _DEEPSPEED once given a plugin: with --fsdp that is an echo)
    if env_fsdp and not fsdp and environ.get("FSDP_VERSION", "1") != "2":
        raise GrowkitError(f"accelerate launch asks for FSDP version {environ.get('FSDP_VERSION', '1')}: growkit "
                           "trains with FSDP2 only (FSDP1 flattens the parameters its optimizer was built on); "
                           "pass --fsdp_version 2, or --fsdp to growkit under torchrun")
    if fsdp or env_fsdp:
        return EngineRequest("fsdp", "--fsdp" if fsdp else "accelerate launch --use_fsdp")
    if deepspeed is not None:
        if deepspeed not in ZERO_STAGES:
            raise GrowkitError(f"--deepspeed must be a ZeRO stage (1, 2 or 3), got {deepspeed}")
        return EngineRequest("deepspeed", f"--deepspeed {deepspeed}", deepspeed)
    if env_ds:
        if environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") not in ("none", ""):
            raise GrowkitError(f"accelerate launch --deepspeed_config_file {environ['ACCELERATE_DEEPSPEED_CONFIG_FILE']}"
                               ": growkit builds the DeepSpeed config from its own options (batch size, accumulation, "
                               "clipping, precision); pass --zero_stage N instead of a config file")
        stage = int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        offload = tuple(environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none").lower()
                        for what in ("OPTIMIZER", "PARAM"))
        return EngineRequest("deepspeed", "accelerate launch --use_deepspeed", stage, offload)  # type: ignore[arg-type]
    return EngineRequest("ddp", "default")


def check_launch(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse the launch that asked for several processes and started one: `accelerate launch --num_processes N`
    without `--multi_gpu` on a machine without GPUs runs its simple launcher, which sets MASTER_ADDR (only for N > 1)
    but starts a single process with no rank or world size."""
    simple_launcher = "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ
    has_world = any(k in environ for k in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if simple_launcher and not has_world and not torch.cuda.is_available():
        raise GrowkitError("accelerate launch started one process although --num_processes asked for several (no GPU "
                           "here, so accelerate ran its single-process launcher): add --multi_gpu (it runs gloo "
                           "processes on CPU) or use torchrun --nproc_per_node N")


def check_request(cfg: Any, environ: Mapping[str, str] = os.environ) -> EngineRequest:
    """The engine `cfg` (fsdp, deepspeed, grow_at) and the launch ask for, refused in one line if growkit cannot run
    it; pure (no process group), so `TrainConfig.validate` calls it before anything is loaded."""
    request = engine_request(getattr(cfg, "fsdp", False), getattr(cfg, "deepspeed", None), environ)
    check_launch(environ)
    if request.name != "ddp" and getattr(cfg, "grow_at", None):
        why = ("growing needs whole tensors and FSDP holds shards" if request.name == "fsdp"
               else "growth cannot map DeepSpeed's flattened optimizer partitions")
        raise GrowkitError(f"--grow-at under {request.source}: {why}; grow between runs instead (--stop-after, "
                           "growkit grow, then --start-step)")
    return request


def _deepspeed_config(request: EngineRequest, cfg: Any, world: int, environ: Mapping[str, str]) -> dict:
    """The whole DeepSpeed config, from growkit's options: the batch-size fields DeepSpeed needs (no dataloader goes
    through `prepare`), accumulation and clipping done by the engine, precision. A different value in accelerate
    launch's environment is refused, not silently overridden."""
    for env, ours, what in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", cfg.grad_accum, "--grad-accum"),
                            ("ACCELERATE_GRADIENT_CLIPPING", cfg.max_grad_norm, "--max-grad-norm")):
        given = environ.get(env, "").lower()
        if given not in ("", "none", "auto") and (ours is None or float(given) != float(ours)):
            raise GrowkitError(f"accelerate launch sets {env}={given} but growkit runs with {what} {ours} (which "
                               "sets DeepSpeed's): give the launch the same value or leave it out")
    stage = request.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    for key, device in zip(("offload_optimizer", "offload_param"), request.offload):
        if device != "none":
            zero[key] = {"device": device}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # the final export gathers the whole model
    return {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
            "gradient_clipping": float(cfg.max_grad_norm or 0.0), "zero_optimization": zero,
            "bf16": {"enabled": cfg.mixed_precision == "bf16"}, "fp16": {"enabled": cfg.mixed_precision == "fp16"},
            "zero_allow_untested_optimizer": False, "wall_clock_breakdown": False}


def _fsdp_plugin(request: EngineRequest):
    from accelerate import FullyShardedDataParallelPlugin

    if request.source == "--fsdp":  # each decoder layer a unit (the model's _no_split_modules), plus the root
        return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                              reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT",
                                              cpu_ram_efficient_loading=False)
    return FullyShardedDataParallelPlugin()  # accelerate launch's own FSDP_* settings


def _promote_cpu_state(accelerator: Any, request: EngineRequest, plugin: Any, mixed_precision: str) -> None:
    """Set the FSDP or DeepSpeed state that accelerate sets on GPUs, on a CPU (gloo) process group."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    kind = DistributedType.FSDP if request.name == "fsdp" else DistributedType.DEEPSPEED
    # Every later AcceleratorState() (AcceleratedOptimizer makes one) copies PartialState's type over its own.
    state.distributed_type = PartialState._shared_state["distributed_type"] = kind
    if request.name == "fsdp":
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        state.fsdp_plugin = plugin
    else:
        plugin.set_mixed_precision(mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin


#: The accelerate `DistributedType` each request must end up as (DDP: whatever a plain launch gives).
_EXPECTED = {"fsdp": "FSDP", "deepspeed": "DEEPSPEED"}


def build_accelerator(cfg: Any, request: EngineRequest | None = None, environ: Mapping[str, str] = os.environ,
                      **options: Any):
    """An Accelerator for this process that runs `request` (default: what cfg.fsdp / cfg.deepspeed and the launch
    environment ask for), or a GrowkitError saying why it cannot; `options` (a tracker's) go to `Accelerator`.

    A multi-process launch without an accelerator device runs on gloo (`cpu=True`), so plain torchrun works on CPU.
    """
    import accelerate
    from accelerate import Accelerator, DeepSpeedPlugin

    request = request or check_request(cfg, environ)
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    cpu = world > 1 and not torch.cuda.is_available() and not xpu
    if request.name != "ddp" and _version(accelerate.__version__) < ENGINES_ACCELERATE:
        raise GrowkitError(f"{request.source} needs accelerate >= {'.'.join(map(str, ENGINES_ACCELERATE))} (FSDP2 "
                           f"and DeepSpeed were tested with it), found {accelerate.__version__}")
    if request.name != "ddp" and world < 2 and not torch.cuda.is_available():
        raise GrowkitError(f"{request.source} on CPU needs several processes and this is one: launch with torchrun "
                           "--nproc_per_node N (or accelerate launch --multi_gpu --num_processes N)")
    plugins: dict[str, Any] = {}
    plugin = None
    if request.name == "fsdp":
        plugin = plugins["fsdp_plugin"] = _fsdp_plugin(request)
    elif request.name == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise GrowkitError(f"{request.source}: DeepSpeed is not installed (pip install 'growkit[deepspeed]')") \
                from None
        plugin = plugins["deepspeed_plugin"] = DeepSpeedPlugin(
            hf_ds_config=_deepspeed_config(request, cfg, world, environ), zero_stage=request.zero_stage,
            gradient_accumulation_steps=cfg.grad_accum, gradient_clipping=float(cfg.max_grad_norm or 0.0))
    try:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu,
                                  gradient_accumulation_steps=cfg.grad_accum, **plugins, **options)
    except (ValueError, RuntimeError, ImportError) as exc:
        raise accelerator_error(exc, cfg.mixed_precision) from None
    if cpu and plugin is not None:
        _promote_cpu_state(accelerator, request, plugin, cfg.mixed_precision)
    got = accelerator.distributed_type.name if hasattr(accelerator.distributed_type, "name") \
        else str(accelerator.distributed_type)
    if request.name in _EXPECTED and (got != _EXPECTED[request.name]
                                      or (request.name == "fsdp" and not accelerator.is_fsdp2)):
        raise GrowkitError(f"{request.source} asked for {_EXPECTED[request.name]} but accelerate set up {got}; "
                           "launch with torchrun --nproc_per_node N or accelerate launch")
    if accelerator.num_processes != world:
        raise GrowkitError(f"the launch has {world} processes (WORLD_SIZE) but accelerate sees "
                           f"{accelerator.num_processes} ({got}); launch with torchrun --nproc_per_node {world}")
    return accelerator


def engine_name(accelerator: Any) -> str:
    """accelerate's `DistributedType` name (NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ...)."""
    kind = accelerator.distributed_type
    return getattr(kind, "name", str(kind))


def describe_engine(accelerator: Any, batch_size: int, grad_accum: int, seq_len: int) -> dict[str, Any]:
    """What training.json and the first log line state: engine, world size, global batch."""
    world = accelerator.num_processes
    info: dict[str, Any] = {"engine": engine_name(accelerator), "world_size": world,
                            "global_batch": world * grad_accum * batch_size,
                            "global_batch_tokens": world * grad_accum * batch_size * seq_len}
    if info["engine"] == "FSDP":
        info["fsdp_version"] = accelerator.state.fsdp_plugin.fsdp_version
    if info["engine"] == "DEEPSPEED":
        info["zero_stage"] = accelerator.state.deepspeed_plugin.zero_stage
    return info


def engine_line(info: dict[str, Any], batch_size: int, grad_accum: int) -> str:
    """`engine FSDP (FSDP2), world size 2, global batch 8 sequences (2 processes x 2 micro-steps x 2), 2,048 tokens`."""
    detail = (f" (FSDP{info['fsdp_version']})" if "fsdp_version" in info
              else f" (ZeRO-{info['zero_stage']})" if "zero_stage" in info else "")
    world = info["world_size"]
    return (f"engine {info['engine']}{detail}, world size {world}, global batch {info['global_batch']} sequences "
            f"({world} process{'es' if world > 1 else ''} x {grad_accum} micro-step{'s' if grad_accum > 1 else ''} "
            f"x {batch_size}), {info['global_batch_tokens']:,} tokens")


def align_accumulation(accelerator: Any, grad_accum: int) -> None:
    """`accelerator.accumulate` must count the run's micro-steps; an Accelerator made elsewhere gets the count,
    except under DeepSpeed, whose engine was configured with its own (a mismatch is an error there)."""
    if accelerator.gradient_accumulation_steps == grad_accum:
        return
    if engine_name(accelerator) == "DEEPSPEED":
        raise GrowkitError(f"the DeepSpeed engine accumulates {accelerator.gradient_accumulation_steps} micro-steps "
                           f"but the run asks for --grad-accum {grad_accum}")
    accelerator.gradient_accumulation_steps = grad_accum


def _optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:
    """The model tensors an optimizer updates: its groups' parameters, or, under DeepSpeed ZeRO (whose groups hold
    flat partitions), the model tensors it partitioned."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    for attr in ("bit16_groups", "fp16_groups"):  # DeepSpeed ZeRO 1/2, ZeRO 3
        groups = getattr(inner, attr, None)
        if groups:
            return [p for group in groups for p in group]
    return [p for group in inner.param_groups for p in group["params"]]


def check_prepared(accelerator: Any, model: Any, optimizer: Any) -> None:
    """After `prepare`: every tensor the optimizer updates is a parameter of the prepared model and every trainable
    parameter is updated (an optimizer built on other tensors trains nothing, silently), and FSDP did shard."""
    params = list(model.parameters())
    ids = {id(p) for p in params}
    held = _optimizer_tensors(optimizer)
    held_ids = {id(p) for p in held}
    stray = [p for p in held if id(p) not in ids]
    missed = [p for p in params if p.requires_grad and id(p) not in held_ids]
    engine = engine_name(accelerator)
    if stray or missed:
        what = (f"{len(stray)} of its {len(held)} tensors are not parameters of the prepared model" if stray
                else f"{len(missed)} trainable parameters of the prepared model are not in it")
        raise GrowkitError(f"optimizer check after prepare ({engine}): {what}; the optimizer was built on other "
                           "tensors than the ones that train (build it from the model passed to prepare)")
    if engine == "FSDP":
        from torch.distributed.tensor import DTensor

        whole = sum(not isinstance(p, DTensor) for p in params)
        if whole:
            raise GrowkitError(f"FSDP was set up but {whole} of {len(params)} parameters are not sharded after "
                               "prepare; refusing to train as plain data parallel")
