"""Architecture specs as data: every dimension of every tensor is labelled with the axes it spans and its role.

Growth never looks at tensor names beyond this module's families. A dimension is a product of axes (GPT-2's
`c_attn` output is qkv x kv_heads x qgroup x head_dim); heads are always factored as kv_heads x qgroup, so block
tiling of kv heads plus a map inside each query group keeps every query head in its GQA group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from growkit.errors import GrowkitError

if TYPE_CHECKING:
    from growkit.plan import GrowthPlan

HIDDEN = "hidden"
FFN = "ffn"
KV_HEADS = "kv_heads"
QGROUP = "qgroup"
HEAD_DIM = "head_dim"
QKV = "qkv"
VOCAB = "vocab"
POSITIONS = "positions"
#: OPT's word-embedding width when it differs from hidden (`word_embed_proj_dim`): fixed, like vocab
EMBED_PROJ = "embed_proj"

#: Axes an operator may resize. The others (vocab, positions, head_dim, the q/k/v section, embed_proj) are never
#: gathered.
GROWABLE = (HIDDEN, FFN, KV_HEADS, QGROUP)
#: Axes with one independent instance per layer; `hidden` is one axis shared by the whole residual stream.
PER_LAYER = (FFN, KV_HEADS, QGROUP)

Role = Literal["out", "in", "elem"]
Kind = Literal["weight", "bias", "norm_weight", "norm_bias", "embedding"]
NORM_KINDS = ("norm_weight", "norm_bias")


@dataclass(frozen=True)
class Dim:
    """One tensor dimension: the axes it is the (row-major) product of, and how the tensor touches them.

    role "out": the tensor writes to these axes (rows of a Linear, columns of a Conv1D, an embedding's features);
    role "in": it reads from them (fan-in, rescaled by multiplicity); role "elem": elementwise (norms, biases).
    """

    axes: tuple[str, ...]
    role: Role
    #: Writers whose fresh rows get small random values instead of zeros, because a partner writer's zero already
    #: silences the neuron and two zero factors would leave it at a saddle with no gradient (SwiGLU's gate beside
    #: `up`; query and key beside value). True for the whole dim, or the sections of its QKV factor (wherever
    #: that factor sits in `axes`).
    gated: bool | tuple[int, ...] = False
    #: A dim that is a concatenation of sections, each a row-major product of axes (Phi-3's GQA `qkv_proj`: q is
    #: kv_heads x qgroup x head_dim, k and v kv_heads x head_dim). Made with `Dim.concat`; `axes` is then the union
    #: of the sections' axes (which axes the dim touches), and `gated` numbers sections. Empty for a plain product.
    sections: tuple[tuple[str, ...], ...] = ()
    #: The values along this dim are RMS-normalised as a whole (OLMo2's q/k norm spans every head): its writers carry
    #: the axes' writer scale and the norm's gain divides it out, as on the residual stream, so uneven head
    #: multiplicities leave the norm's statistic unchanged.
    normed: bool = False

    @classmethod
    def concat(cls, sections: tuple[tuple[str, ...], ...], role: Role, gated: bool | tuple[int, ...] = False,
               normed: bool = False) -> "Dim":
        """A dim made of `sections` one after another, each gathered with its own axes' maps."""
        union = tuple(dict.fromkeys(a for section in sections for a in section))
        return cls(union, role, gated, tuple(sections), normed)

    def parts(self) -> tuple["Dim", ...]:
        """The sections as plain dims (this dim alone when it is a plain product); gated sections stay gated."""
        if not self.sections:
            return (self,)
        return tuple(Dim(axes, self.role, self.gated is True or (self.gated is not False and i in self.gated),
                         normed=self.normed) for i, axes in enumerate(self.sections))

    def size(self, size_of: Callable[[str], int]) -> int:
        """Number of entries along this dim, given the size of one instance of each axis."""
        total = 0
        for part in self.parts():
            n = 1
            for axis in part.axes:
                n *= size_of(axis)
            total += n
        return total


#: How a tensor meets the residual stream where that differs from a pre-norm block's (None: readers read a norm's
#: output, writers add to the stream, hidden norm gains are pre-norms). With post-norms (OLMo2, h + norm(f(h))):
#: "post_norm" is a norm gain applied to a block's output before the addition (its gain writes the stream; Gemma2
#: has them beside its pre-norms);
#: "normed_writer" a matrix whose hidden output goes through such a norm (it carries the writer scale, so the norm's
#: statistic holds, but does not write the stream itself); "raw_reader" a matrix that reads the stream itself, not a
#: norm's output (its hidden fan-in also divides out the writer scale the stream's copies carry).
StreamRole = Literal["post_norm", "normed_writer", "raw_reader"]


@dataclass(frozen=True)
class Norm:
    """How a norm tensor's layer normalises, so that every gain, eps and statistics correction reads it from the
    spec, not from the family: `kind` "rms" (x / rms(x)) or "layer" (the mean removed first, LayerNorm), the
    config entry that holds its eps, and `offset`: the model multiplies by `offset + w`, not by the stored `w`
    (Gemma's RMSNorm: 1 + w), so growth rescales that gain, not `w`. A norm of another form is a new field here."""

    kind: Literal["rms", "layer"]
    eps_key: str
    offset: float = 0.0


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of the model, with `{}` in `name` standing for the layer index of per-layer tensors."""

    name: str
    dims: tuple[Dim, ...]
    kind: Kind = "weight"
    per_layer: bool = False
    final_norm: bool = False  # with a tied head, this norm carries the head's fan-in correction
    norm: Norm | None = None  # the norm a "norm_weight" / "norm_bias" tensor belongs to (required for those)
    #: How it meets the residual stream where that differs from a pre-norm block's (`StreamRole`): OLMo2's and
    #: Gemma2's post-norm gains, the matrices feeding them, OLMo2's raw stream readers.
    stream: StreamRole | None = None
    #: (axis, p): growth multiplies the value by (new / old size of the axis) ** p, for a tensor whose effect the
    #: model scales by a size at run time (Gemma's embedding is multiplied by sqrt(hidden): stored with p = -1/2).
    size_power: tuple[str, float] | None = None

    def __post_init__(self) -> None:
        if (self.kind in NORM_KINDS) != (self.norm is not None):
            raise ValueError(f"{self.name}: a {self.kind} tensor {'needs' if self.norm is None else 'takes no'} Norm")

    def at(self, layer: int | None) -> str:
        return self.name.format(layer) if self.per_layer else self.name

    @property
    def gain_offset(self) -> float:
        """What the model adds to this tensor's values before using them as a gain (0 but for an offset norm gain)."""
        return self.norm.offset if self.norm is not None and self.kind == "norm_weight" else 0.0

    def rescaled(self, x: Any, factor: Any) -> Any:
        """`x` times `factor`; for a norm gain used as `offset + w`, the weights of `factor` times that gain."""
        offset = self.gain_offset
        if not offset:
            return x * factor
        return (x + offset) * factor - offset

    def writes_hidden(self) -> bool:
        """True for tensors that write into the residual stream from inside a block (zeroed by identity depth). With
        post-norms that is the norm's gain: a zero gain silences the block exactly, and unlike zero rows feeding the
        norm (whose output jumps to full scale after the first step) it grows from zero as it trains."""
        if self.stream is not None:
            return self.per_layer and self.stream == "post_norm"
        return self.per_layer and any(d.role == "out" and HIDDEN in d.axes for d in self.dims)


@dataclass(frozen=True)
class Sizes:
    """The sizes a growth plan changes; `head_dim`, `vocab` and `positions` stay fixed."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int
    head_dim: int
    vocab: int
    positions: int = 0
    #: rows of a learned-position table beyond `positions` (OPT looks position p up at row p + 2)
    position_offset: int = 0
    embed_proj: int = 0

    @property
    def qgroup(self) -> int:
        return self.heads // self.kv_heads

    def axis(self, kind: str) -> int:
        """Size of one instance of an axis kind."""
        return {
            HIDDEN: self.hidden, FFN: self.ffn, KV_HEADS: self.kv_heads, QGROUP: self.qgroup,
            HEAD_DIM: self.head_dim, QKV: 3, VOCAB: self.vocab, POSITIONS: self.positions + self.position_offset,
            EMBED_PROJ: self.embed_proj,
        }[kind]

    def factors(self, dim: Dim) -> list[int]:
        """Sizes of the axes a dimension is the (row-major) product of."""
        return [self.axis(a) for a in dim.axes]

    def dim_size(self, dim: Dim) -> int:
        """Size of one tensor dimension: the product of its axes' sizes (the sum of its sections' products)."""
        return dim.size(self.axis)

    def shape(self, spec: TensorSpec) -> tuple[int, ...]:
        """Shape of a tensor at these sizes."""
        return tuple(self.dim_size(d) for d in spec.dims)

    def replace(self, **changes: int) -> "Sizes":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("hidden", "ffn", "heads", "kv_heads", "layers", "head_dim", "vocab")}


@dataclass(frozen=True)
class Limit:
    """Something the math cannot do on a family, declared in its arch/ file and checked before any tensor is read.

    `method`: an operator (`--method`, e.g. "copy-pad"), a depth method as "depth:identity", or "depth" for any
    depth growth. "refused": the request stops with `reason` (one line); "inexact": it runs and loads, but does not
    keep the function. `when`: (config field, value) for a limit that holds only where the config says so.
    """

    method: str
    verdict: Literal["refused", "inexact"]
    reason: str
    when: tuple[str, Any] | None = None

    def holds(self, config: dict[str, Any]) -> bool:
        return self.when is None or config.get(self.when[0]) == self.when[1]

    def concerns(self, method: str, depth_method: str | None) -> bool:
        """Whether it is about this operator or depth method (`depth_method` None: no depth growth)."""
        if self.method == "depth":
            return depth_method is not None
        if self.method.startswith("depth:"):
            return self.method == f"depth:{depth_method}"
        return self.method == method


#: On a residual stream normalised by LayerNorm, growth that copies coordinates unequally (or pads them with fresh
#: ones) moves the mean the norm subtracts: those operators run but are not exact (DESIGN §2). For LayerNorm families.
LAYERNORM_STREAM: tuple[Limit, ...] = tuple(
    Limit(method, "inexact", "LayerNorm's mean over the hidden axis moves when its coordinates are copied unequally "
                             "or padded") for method in ("net2net", "copy-pad", "rc-sample", "subclone"))


@dataclass
class Family:
    """What growkit knows about one architecture family; subclasses fill in the config and tensor layout."""

    name: str
    model_types: tuple[str, ...]
    ignorable: tuple[str, ...] = field(default=())  # non-persistent buffers some exporters still save
    #: Config fields no tensor records (an inferred config leaves them to transformers' defaults: announced)
    unrecorded: tuple[str, ...] = field(default=())
    #: What the math cannot do on this family (refused or inexact operators and depth methods, one line each)
    limits: tuple[Limit, ...] = field(default=())

    def sizes(self, config: dict[str, Any]) -> Sizes:
        raise NotImplementedError

    def tensors(self, config: dict[str, Any], names: list[str]) -> list[TensorSpec]:
        """Every tensor the checkpoint must contain, per-layer ones once as templates."""
        raise NotImplementedError

    def tied(self, config: dict[str, Any]) -> bool:
        raise NotImplementedError

    def rewrite_config(self, config: dict[str, Any], target: Sizes, layer_src: list[int]) -> dict[str, Any]:
        """The config of the grown model: sizes updated, everything else kept, per-layer lists re-indexed."""
        raise NotImplementedError

    def infer_config(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """A config guessed from tensor names and shapes, or None when the names are not this family's."""
        raise NotImplementedError

    def refusal(self, config: dict[str, Any], plan: "GrowthPlan") -> str | None:
        """Why this config cannot be grown (or shrunk) as `plan` asks with the function its operator promises, in
        one line; None when it can. Asked before any tensor is read."""
        return None

    def stored_names(self, names: list[str]) -> dict[str, str]:
        """{name this family's specs use: name in the file} for a layout that spells names differently but that
        transformers loads all the same; empty when the names are already the specs' (or not this family's)."""
        return {}


def parameter_count(specs: list[TensorSpec], sizes: Sizes) -> int:
    """Number of parameters of a model with these tensors at these sizes (tied head counted once)."""
    return sum(math.prod(sizes.shape(spec)) * (sizes.layers if spec.per_layer else 1) for spec in specs)


def rms_stream(specs: list[TensorSpec]) -> bool:
    """True when every norm that reads the residual stream is an RMSNorm: a writer scale then keeps any multiplicity
    of stream coordinates exact (`AxisMap.exact_writers`); under a LayerNorm the copies move the mean."""
    kinds = {s.norm.kind for s in specs if s.norm is not None and any(HIDDEN in d.axes for d in s.dims)}
    return kinds == {"rms"}


def norm_eps_keys(specs: list[TensorSpec]) -> list[str]:
    """The config entries holding the eps of the model's norms, in spec order."""
    return list(dict.fromkeys(s.norm.eps_key for s in specs if s.norm is not None))


class HeadsUnknown(ValueError):
    """Config inference stopped at the head count, which tensor shapes do not record."""


def heads_not_in_shapes(query_outputs: int, common: int) -> HeadsUnknown:
    """Weights hold heads x head_dim as one dimension, never the two factors, so an inferred head count is a guess
    (head_dim 128 and 64 both divide most widths) that changes the function: it is refused, not made."""
    counts = [query_outputs // d for d in (256, 128, 64, 32, 16, 8, 4, 2, 1) if common % d == 0][:4]
    return HeadsUnknown(f"the tensor shapes do not say how many attention heads there are ({query_outputs} query "
                        f"outputs fit {', '.join(map(str, counts))}, ... heads)")


def multi_head_sizes(config: dict[str, Any], ffn: int, **extra: int) -> Sizes:
    """Sizes of a multi-head model (every head its own kv head, head_dim = hidden / heads) under transformers'
    usual config keys; `extra` carries the family's other sizes (a position offset, a projection width)."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if hidden % heads:
        raise GrowkitError(f"config: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return Sizes(hidden=hidden, ffn=ffn, heads=heads, kv_heads=heads, layers=int(config["num_hidden_layers"]),
                 head_dim=hidden // heads, vocab=int(config["vocab_size"]),
                 positions=int(config.get("max_position_embeddings", 0)), **extra)


def linear(name: str, out: Dim, inp: Dim, bias: bool) -> list[TensorSpec]:
    """A per-layer torch Linear (`[out, in]`) and, when it has one, its bias."""
    specs = [TensorSpec(name + ".weight", (out, inp), per_layer=True)]
    if bias:
        specs.append(TensorSpec(name + ".bias", (out,), "bias", per_layer=True))
    return specs


def layer_norm(name: str, eps_key: str, per_layer: bool = True, final: bool = False) -> list[TensorSpec]:
    """A LayerNorm on the residual stream: gain and bias, elementwise on `hidden`, its eps in config `eps_key`."""
    hid, norm = (Dim((HIDDEN,), "elem"),), Norm("layer", eps_key)
    return [TensorSpec(name + ".weight", hid, "norm_weight", per_layer=per_layer, final_norm=final, norm=norm),
            TensorSpec(name + ".bias", hid, "norm_bias", per_layer=per_layer, final_norm=final, norm=norm)]


def head(tied: bool, reads: tuple[str, ...] = (HIDDEN,)) -> list[TensorSpec]:
    """The LM head `lm_head.weight` ([vocab, width]) when it is a tensor of its own; a tied head is the embedding."""
    return [] if tied else [TensorSpec("lm_head.weight", (Dim((VOCAB,), "elem"), Dim(reads, "in")))]
