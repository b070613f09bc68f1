"""Neuron and block importance for `subclone`: from activations on calibration text, or from weight norms.

Everything is found through the architecture specs, never by module class: the FFN reader (the tensor that reads the
`ffn` axis), the head reader (reads kv_heads x qgroup x head_dim), the hidden-axis norms and the blocks (the prefix of
the per-layer tensor names). Hooks on those modules see exactly what each axis carries in the source model:

- an FFN neuron's importance is the mean size of what it writes into the residual stream, mean_t |a_j| * ||w_j||;
- a head's is the mean norm of its own term of the attention output, mean_t ||W_o,h a_h||; a kv head's is the sum
  over its query group (so a GQA group is kept or dropped whole);
- a residual-stream coordinate's is its mean |value| after every norm (what every reader sees), each norm site
  weighted equally, summed over the whole network (the stream is one axis);
- a block's is how much it changes the stream: sum_t ||out - in|| / sum_t ||in|| (a ratio of sums, so tokens whose
  embedding is near zero cannot dominate).

Alongside, the energies the fan-in rescaling needs (mean squared contributions) and, per norm site, the share of the
norm's statistic each coordinate carries (to correct norm gains when coordinates are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from growkit.arch.sections import has_sections, plain_parts
from growkit.arch.spec import FFN, HEAD_DIM, HIDDEN, KV_HEADS, QGROUP, Dim, Sizes, TensorSpec
from growkit.checkpoint.reader import Checkpoint
from growkit.errors import GrowkitError

HEAD_AXES = (KV_HEADS, QGROUP, HEAD_DIM)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "*.tiktoken")


@dataclass
class Importance:
    """Per-axis scores (higher = keep) and energies of a source model; lists are indexed by source layer."""

    source: Literal["activations", "weights"]
    hidden: torch.Tensor  # [hidden]
    ffn: list[torch.Tensor]  # [ffn] per layer
    heads: list[torch.Tensor]  # [kv_heads, qgroup] per layer
    blocks: torch.Tensor  # [layers]: how much each block changes the residual stream
    hidden_energy: torch.Tensor  # [hidden], each norm site's share of post-norm energy, averaged over sites
    ffn_energy: list[torch.Tensor]
    head_energy: list[torch.Tensor]
    #: per norm site (tensor name at its source layer): each coordinate's mean share of the norm's statistic
    norm_share: dict[str, torch.Tensor] = field(default_factory=dict)
    #: a MoE model's routed experts, each with its own neurons: [ffn] scores and energies per layer, by the expert's
    #: ffn instance kind (`ModelParts.instances`); `ffn` is then the shared expert's (or, without one, these summed)
    expert_ffn: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    expert_ffn_energy: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelParts:
    """Where each axis is read in a family's tensors (found from the specs)."""

    norms: list[TensorSpec]  # norm gains on the hidden axis (per layer and final)
    ffn_reader: TensorSpec | None  # None: only MoE experts read the layer's ffn
    head_reader: TensorSpec
    block_prefix: str  # e.g. "model.layers.{}"
    #: a MoE layer's routed experts, each its own `ffn` instance: {tensor name template: instance kind}
    #: (`ffn_instances`), in expert order; empty for a dense model
    instances: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, specs: list[TensorSpec]) -> "ModelParts":
        norms = [s for s in specs if s.kind == "norm_weight" and s.dims == (Dim((HIDDEN,), "elem"),)]
        instances = ffn_instances(specs)
        shared = [s for s in specs if s.name not in instances]
        ffn_reader = _one(shared, lambda s: s.kind == "weight" and _ffn_in(s) is not None, "FFN reader",
                          optional=bool(instances))
        head_reader = _one(specs, lambda s: s.kind == "weight" and Dim(HEAD_AXES, "in") in s.dims, "head reader")
        return cls(norms, ffn_reader, head_reader, block_prefix(specs), instances)  # type: ignore[arg-type]

    @property
    def expert_kinds(self) -> list[str]:
        """The routed experts' ffn instance kinds, in expert order."""
        return list(dict.fromkeys(self.instances.values()))


def _ffn_in(spec: TensorSpec) -> int | None:
    """The index of the dim that reads the `ffn` axis (alone, or as blocks of it), None if none does."""
    return next((i for i, d in enumerate(spec.dims) if d.role == "in" and FFN in d.axes), None)


def block_prefix(specs: list[TensorSpec]) -> str:
    """The prefix of a family's per-layer tensor names (e.g. `model.layers.{}`): the name of each block's module."""
    name = next(s.name for s in specs if s.per_layer)
    return name[: name.index("{}") + 2]


def ffn_instances(specs: list[TensorSpec]) -> dict[str, str]:
    """{tensor name template: axis kind} where a layer reads its `ffn` axis in several modules (a MoE layer's
    experts): each module's neurons are their own axis instance, of kind `ffn[<module>]` (e.g. `ffn[mlp.experts.0]`),
    since neuron j of one expert has nothing to do with neuron j of another. A module whose ffn dim is a product
    (Qwen2-MoE's shared expert held as blocks of one expert's size) is left out: its rows are not one module's
    neurons. Empty where each layer has one FFN reader."""
    prefix = block_prefix(specs)
    readers = [s.name for s in specs if s.per_layer and Dim((FFN,), "in") in s.dims]
    if len(readers) < 2:
        return {}
    modules = [name[len(prefix) + 1:].rsplit(".", 2)[0] for name in readers]
    return {s.name: f"{FFN}[{module}]" for module in modules for s in specs
            if s.per_layer and s.name.startswith(f"{prefix}.{module}.")}


def _one(specs: list[TensorSpec], pred: Any, what: str, optional: bool = False) -> TensorSpec | None:
    found = [s for s in specs if s.per_layer and pred(s)]
    if optional and not found:
        return None
    if len(found) != 1:
        raise GrowkitError(f"subclone: expected one {what} tensor per layer, found {[s.name for s in found]}")
    return found[0]


def _module_name(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight")


def axis_energy(x: torch.Tensor, spec: TensorSpec, sizes: Sizes, keep: tuple[str, ...]) -> torch.Tensor | None:
    """Sum of x^2 over everything but the axes `keep` (in that order; an axis the tensor lacks is summed as size 1).

    None when the tensor touches none of `keep`. A dim made of sections sums its sections' energies (a section
    without one of the `keep` axes counts for every position of it).
    """
    if not any(a in d.axes for d in spec.dims for a in keep):
        return None
    if has_sections(spec):
        energies = [e for part, piece in plain_parts(x, spec, sizes)
                    if (e := axis_energy(piece, part, sizes, keep)) is not None]
        return sum(energies[1:], energies[0])
    factors: list[str] = []
    shape: list[int] = []
    for dim in spec.dims:
        factors += list(dim.axes)
        shape += sizes.factors(dim)
    e = (x.reshape(shape) ** 2)
    present = [a for a in keep if a in factors]
    others = [i for i, a in enumerate(factors) if a not in present]
    e = e.sum(dim=others) if others else e
    order = [a for a in factors if a in present]
    e = e.permute([order.index(a) for a in present])
    return e.reshape([sizes.axis(a) if a in present else 1 for a in keep])


def _normalized(e: torch.Tensor) -> torch.Tensor:
    return e / e.mean().clamp(min=1e-30)


def weight_importance(ckpt: Checkpoint, specs: list[TensorSpec], sizes: Sizes, parts: ModelParts) -> Importance:
    """The fallback without calibration text: how large each neuron's incoming and outgoing weights are.

    A neuron's score is sqrt(write energy x read energy) (each tensor normalised to mean 1, so no tensor dominates by
    its scale); a hidden coordinate's is the normalised energy summed over every tensor touching the stream
    (embeddings, readers, writers and norm gains); a block's is the norm of its residual writers (a poor guide:
    `Subclone` replaces it by the blocks' relative update on random token ids when it removes blocks).
    """
    hidden = torch.zeros(sizes.hidden)
    ffn_w = [torch.zeros(sizes.ffn) for _ in range(sizes.layers)]
    ffn_r = [torch.zeros(sizes.ffn) for _ in range(sizes.layers)]
    head_w = [torch.zeros(sizes.kv_heads, sizes.qgroup) for _ in range(sizes.layers)]
    head_r = [torch.zeros(sizes.kv_heads, sizes.qgroup) for _ in range(sizes.layers)]
    blocks = torch.zeros(sizes.layers)
    own = {k: ([torch.zeros(sizes.ffn) for _ in range(sizes.layers)], [torch.zeros(sizes.ffn) for _ in range(sizes.layers)])
           for k in parts.expert_kinds}  # each routed expert's (write, read) energies
    for spec in specs:
        if spec.kind not in ("weight", "embedding", "norm_weight"):
            continue
        for layer in range(sizes.layers) if spec.per_layer else [None]:
            x = ckpt.get(spec.at(layer))
            if spec.gain_offset:  # a gain used as offset + w (Gemma): its size is the gain's, not w's
                x = x + spec.gain_offset
            e = axis_energy(x, spec, sizes, (HIDDEN,))
            if e is not None:
                hidden += _normalized(e)
            if layer is None or spec.kind != "weight":
                continue
            role = {a: d.role for d in spec.dims for a in d.axes}
            if (e := axis_energy(x, spec, sizes, (FFN,))) is not None:
                w, r = own.get(parts.instances.get(spec.name, ""), (ffn_w, ffn_r))
                (w if role[FFN] == "out" else r)[layer] += _normalized(e)
            if (e := axis_energy(x, spec, sizes, (KV_HEADS, QGROUP))) is not None:
                (head_w if role[KV_HEADS] == "out" else head_r)[layer] += _normalized(e)
            if spec.writes_hidden():
                blocks[layer] += float(x.norm())
    ffn = [(w * r).sqrt() for w, r in zip(ffn_w, ffn_r)]
    heads = [(w * r).sqrt() for w, r in zip(head_w, head_r)]
    experts = {k: [(w * r).sqrt() for w, r in zip(*wr)] for k, wr in own.items()}
    imp = Importance(source="weights", hidden=hidden, ffn=ffn, heads=heads, blocks=blocks,
                     hidden_energy=hidden / hidden.sum(), ffn_energy=[f**2 for f in ffn],
                     head_energy=[h**2 for h in heads], expert_ffn=experts,
                     expert_ffn_energy={k: [f**2 for f in v] for k, v in experts.items()})
    return _pooled_without_reader(imp, parts)


def _pooled_without_reader(imp: Importance, parts: ModelParts) -> Importance:
    """Where only routed experts read a layer's ffn (no shared expert), its own `ffn` map serves no tensor; it is
    the experts' scores summed, the ranking of `ffn` as one axis across experts, so the maps stay complete."""
    if parts.ffn_reader is None and imp.expert_ffn:
        imp.ffn = [sum(v[layer] for v in imp.expert_ffn.values()) for layer in range(len(imp.ffn))]
        imp.ffn_energy = [sum(v[layer] for v in imp.expert_ffn_energy.values()) for layer in range(len(imp.ffn))]
    return imp


def calibration_ids(files: Sequence[str | Path], tokenizer_dir: str | Path | None,
                    max_tokens: int, vocab: int | None = None) -> torch.Tensor:
    """The first `max_tokens` ids of the calibration text (files in order, each followed by EOS), tokenized with the
    checkpoint's own tokenizer; with `vocab`, refused when the tokenizer gives ids beyond the model's vocabulary."""
    from transformers import AutoTokenizer

    if tokenizer_dir is None or not any(any(Path(tokenizer_dir).glob(p)) for p in _TOKENIZER_FILES):
        where = "the checkpoint has no directory" if tokenizer_dir is None else f"{tokenizer_dir} has no tokenizer files"
        raise GrowkitError(f"calibration text needs the model's tokenizer: {where} (pass --tokenizer DIR)")
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise GrowkitError(f"{tokenizer_dir}: cannot load a tokenizer for the calibration text "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    ids: list[int] = []
    for f in files:
        path = Path(f)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise GrowkitError(f"{path}: cannot read calibration text ({exc.strerror or exc})") from None
        ids += tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise GrowkitError(f"calibration text {', '.join(map(str, files))} gives {len(ids)} tokens; need at least 2")
    if vocab is not None and max(ids) >= vocab:
        raise GrowkitError(f"calibration: tokenizer {tokenizer_dir} gives token id {max(ids)}, beyond the model's "
                           f"vocabulary of {vocab}")
    return torch.tensor(ids)


def token_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """1-D ids as [n, seq_len] blocks (the remainder dropped); fewer than `seq_len` ids make one shorter block."""
    if len(ids) < seq_len:
        return ids.unsqueeze(0)
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def _head_gram(w: torch.Tensor, spec: TensorSpec, sizes: Sizes) -> torch.Tensor:
    """W_h^T W_h of each head's slice of the head reader, [kv, qgroup, head_dim, head_dim], whatever the reader's
    layout (Linear or Conv1D)."""
    i = spec.dims.index(Dim(HEAD_AXES, "in"))
    w = w.movedim(i, -1).reshape(-1, sizes.kv_heads, sizes.qgroup, sizes.head_dim)
    return torch.einsum("okqd,okqe->kqde", w, w)


def _ffn_writer_norm(w: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    i = _ffn_in(spec)
    assert i is not None
    return w.movedim(i, -1).reshape(-1, w.shape[i]).norm(dim=0)


@torch.no_grad()
def activation_importance(ckpt: Checkpoint, specs: list[TensorSpec], sizes: Sizes, parts: ModelParts,
                          tokens: torch.Tensor, batch_size: int = 8) -> Importance:
    """Run the source model on calibration tokens with hooks on each axis's reader and on each block."""
    from growkit.verify import model_from_checkpoint

    model = model_from_checkpoint(ckpt)
    L = sizes.layers
    count = 0
    reader = parts.ffn_reader
    width = sizes.dim_size(reader.dims[_ffn_in(reader) or 0]) if reader is not None else sizes.ffn  # blocks of ffn
    ffn_abs = [torch.zeros(width) for _ in range(L)]
    ffn_sq = [torch.zeros(width) for _ in range(L)]
    head_abs = [torch.zeros(sizes.kv_heads, sizes.qgroup) for _ in range(L)]
    head_sq = [torch.zeros(sizes.kv_heads, sizes.qgroup) for _ in range(L)]
    block_update = torch.zeros(L)
    block_stream = torch.zeros(L)
    #: each norm site (tensor name), and whether its statistic is taken after removing the mean (LayerNorm)
    centred = {n.at(layer): n.norm is not None and n.norm.kind == "layer" for n in parts.norms
               for layer in (range(L) if n.per_layer else [None])}
    sites = list(centred)
    norm_abs = {s: torch.zeros(sizes.hidden) for s in sites}
    norm_sq = {s: torch.zeros(sizes.hidden) for s in sites}
    norm_share = {s: torch.zeros(sizes.hidden) for s in sites}
    w_ffn = [_ffn_writer_norm(ckpt.get(reader.at(l)), reader) if reader is not None else torch.zeros(width)
             for l in range(L)]
    gram = [_head_gram(ckpt.get(parts.head_reader.at(l)), parts.head_reader, sizes) for l in range(L)]

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).float()

    def on_ffn(layer: int):
        def hook(module: Any, args: tuple) -> None:
            a = flat(args[0])
            ffn_abs[layer].add_(a.abs().sum(0))
            ffn_sq[layer].add_((a**2).sum(0))
        return hook

    def on_heads(layer: int):
        def hook(module: Any, args: tuple) -> None:
            a = flat(args[0]).view(-1, sizes.kv_heads, sizes.qgroup, sizes.head_dim)
            # ||W_o,h a_h||^2 = a_h . (G_h a_h): head_dim^2 per head and token instead of head_dim x hidden
            sq = (torch.einsum("nkqd,kqde->nkqe", a, gram[layer]) * a).sum(-1).clamp(min=0)
            head_abs[layer].add_(sq.sqrt().sum(0))
            head_sq[layer].add_(sq.sum(0))
        return hook

    def on_norm_in(site: str):
        def hook(module: Any, args: tuple) -> None:
            x = flat(args[0])
            if centred[site]:
                x = x - x.mean(-1, keepdim=True)
            e = x**2
            norm_share[site].add_((e / e.sum(-1, keepdim=True).clamp(min=1e-30)).sum(0))
        return hook

    def on_norm_out(site: str):
        def hook(module: Any, args: tuple, out: Any) -> None:
            y = flat(out[0] if isinstance(out, tuple) else out)
            norm_abs[site].add_(y.abs().sum(0))
            norm_sq[site].add_((y**2).sum(0))
        return hook

    def on_block(layer: int):
        def hook(module: Any, args: tuple, kwargs: dict, out: Any) -> None:
            x = flat(args[0] if args else kwargs["hidden_states"])
            y = flat(out[0] if isinstance(out, tuple) else out)
            block_update[layer] += float((y - x).norm(dim=-1).sum())
            block_stream[layer] += float(x.norm(dim=-1).sum())
        return hook

    handles = []
    experts = None
    try:
        if parts.instances:
            from growkit.arch.moe import MoeFamily, expert_modules

            experts = ExpertRecorder(model, expert_modules(ckpt.config), MoeFamily.experts(ckpt.config), sizes.ffn)
            handles += experts.handles
        for layer in range(L):
            if reader is not None:
                handles.append(model.get_submodule(_module_name(reader.at(layer))).register_forward_pre_hook(on_ffn(layer)))
            handles.append(model.get_submodule(_module_name(parts.head_reader.at(layer)))
                           .register_forward_pre_hook(on_heads(layer)))
            handles.append(model.get_submodule(parts.block_prefix.format(layer))
                           .register_forward_hook(on_block(layer), with_kwargs=True))
        for site in sites:
            module = model.get_submodule(_module_name(site))
            handles.append(module.register_forward_pre_hook(on_norm_in(site)))
            handles.append(module.register_forward_hook(on_norm_out(site)))
        body = model.base_model  # no LM head: the hooks never see the logits, the largest tensor of the pass
        for batch in tokens.split(batch_size):
            body(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()

    ffn = [_fold(a / count * w, sizes.ffn) for a, w in zip(ffn_abs, w_ffn)]
    ffn_energy = [_fold(s / count * w**2, sizes.ffn) for s, w in zip(ffn_sq, w_ffn)]
    hidden = sum(a / a.sum().clamp(min=1e-30) for a in norm_abs.values())
    hidden_energy = sum(s / s.sum().clamp(min=1e-30) for s in norm_sq.values()) / len(sites)
    imp = Importance(source="activations", hidden=hidden, ffn=ffn, heads=[h / count for h in head_abs],
                     blocks=block_update / block_stream.clamp(min=1e-30), hidden_energy=hidden_energy, ffn_energy=ffn_energy,
                     head_energy=[h / count for h in head_sq],
                     norm_share={s: v / count for s, v in norm_share.items()})
    if experts is not None:
        act = experts.activity()
        imp.expert_ffn = {k: list(act.neurons[:, e]) for e, k in enumerate(parts.expert_kinds)}
        imp.expert_ffn_energy = {k: list(act.energy[:, e]) for e, k in enumerate(parts.expert_kinds)}
    return _pooled_without_reader(imp, parts)


def _fold(score: torch.Tensor, ffn: int) -> torch.Tensor:
    """A score over blocks of the ffn axis (Qwen2-MoE's shared expert) summed to one per ffn position."""
    return score if score.numel() == ffn else score.reshape(-1, ffn).sum(0)


# --- routed experts: what each expert, and each of its neurons, writes into the stream -----------------------------

@dataclass
class ExpertActivity:
    """Routed experts on calibration tokens, per layer: `score` [layers, experts] is mean_t w_te ||f_e(x_t)||, the
    share of routed weight expert e receives times the (routing-weighted) mean norm of its output; `neurons` and
    `energy` [layers, experts, ffn] are each expert neuron's mean_t |w_te a_tej| ||w_ej|| and its square's mean, the
    dense FFN neuron's measure with the routing weight in (zero where the token is not routed to e)."""

    score: torch.Tensor
    neurons: torch.Tensor
    energy: torch.Tensor


def _expert_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states, top-k expert indices, top-k weights) of a call to transformers' fused expert module."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    got = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return got[0], got[1], got[2]


class ExpertRecorder:
    """Hooks on each layer's fused expert module (`growkit.arch.moe.expert_modules`) that recompute every routed
    expert's SwiGLU on the tokens routed to it, from the module's own 3-D weights: transformers 5 has no per-expert
    down projection to hook, and recomputing works whatever expert kernel the model runs."""

    def __init__(self, model: Any, modules: list[str], experts: int, ffn: int) -> None:
        layers = len(modules)
        self.score = torch.zeros(layers, experts, dtype=torch.float64)
        self.neurons = torch.zeros(layers, experts, ffn, dtype=torch.float64)
        self.squares = torch.zeros(layers, experts, ffn, dtype=torch.float64)
        self.tokens = 0
        self.modules = [model.get_submodule(m) for m in modules]
        for m in self.modules:
            if tuple(m.down_proj.shape) != (experts, m.down_proj.shape[1], ffn):
                raise GrowkitError(f"expert module {type(m).__name__}: down_proj {tuple(m.down_proj.shape)} is not "
                                   f"[{experts}, hidden, {ffn}]")
        self.handles = [m.register_forward_pre_hook(self._hook(layer), with_kwargs=True)
                        for layer, m in enumerate(self.modules)]

    def _hook(self, layer: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            x, index, weights = _expert_inputs(args, kwargs)
            x = x.reshape(-1, x.shape[-1]).float()
            if layer == 0:
                self.tokens += x.shape[0]
            for e in range(self.score.shape[1]):
                token, slot = (index == e).nonzero(as_tuple=True)
                if token.numel() == 0:
                    continue
                gate, up = torch.nn.functional.linear(x[token], module.gate_up_proj[e].float()).chunk(2, dim=-1)
                a = module.act_fn(gate) * up * weights[token, slot].float()[:, None]
                out = torch.nn.functional.linear(a, module.down_proj[e].float())
                self.score[layer, e] += float(out.norm(dim=-1).sum())
                self.neurons[layer, e] += a.abs().sum(0).double()
                self.squares[layer, e] += (a**2).sum(0).double()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def activity(self) -> ExpertActivity:
        """The means over every token seen, neuron sizes times their down_proj column norms."""
        n = max(self.tokens, 1)
        w = torch.stack([m.down_proj.detach().float().norm(dim=1) for m in self.modules]).double()  # [L, E, ffn]
        return ExpertActivity(score=(self.score / n).float(), neurons=(self.neurons / n * w).float(),
                              energy=(self.squares / n * w**2).float())


@torch.no_grad()
def expert_activity(ckpt: Checkpoint, sizes: Sizes, experts: int, tokens: torch.Tensor,
                    batch_size: int = 8) -> ExpertActivity:
    """Run the source MoE model on calibration tokens and measure its routed experts (`ExpertRecorder`)."""
    from growkit.arch.moe import expert_modules
    from growkit.verify import model_from_checkpoint

    model = model_from_checkpoint(ckpt)
    recorder = ExpertRecorder(model, expert_modules(ckpt.config), experts, sizes.ffn)
    try:
        for batch in tokens.split(batch_size):
            model.base_model(input_ids=batch, use_cache=False)
    finally:
        recorder.remove()
    return recorder.activity()
