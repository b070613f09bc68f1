"""Architecture specs as data: every dimension of every tensor is labelled with the axes it spans and its role.

Growth never looks at tensor names beyond this module's families. A dimension is a product of axes (GPT-2's
`c_attn` output is qkv x kv_heads x qgroup x head_dim); heads are always factored as kv_heads x qgroup, so block
tiling of kv heads plus a map inside each query group keeps every query head in its GQA group.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

HIDDEN = "hidden"
FFN = "ffn"
KV_HEADS = "kv_heads"
QGROUP = "qgroup"
HEAD_DIM = "head_dim"
QKV = "qkv"
VOCAB = "vocab"
POSITIONS = "positions"

#: Axes an operator may resize. The others (vocab, positions, head_dim, the q/k/v section) are never gathered.
GROWABLE = (HIDDEN, FFN, KV_HEADS, QGROUP)
#: Axes with one independent instance per layer; `hidden` is one axis shared by the whole residual stream.
PER_LAYER = (FFN, KV_HEADS, QGROUP)

Role = Literal["out", "in", "elem"]
Kind = Literal["weight", "bias", "norm_weight", "norm_bias", "embedding"]


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
    #: `up`; query and key beside value). True for the whole dim, or the sections of a leading QKV factor.
    gated: bool | tuple[int, ...] = False


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of the model, with `{}` in `name` standing for the layer index of per-layer tensors."""

    name: str
    dims: tuple[Dim, ...]
    kind: Kind = "weight"
    per_layer: bool = False
    final_norm: bool = False  # with a tied head, this norm carries the head's fan-in correction

    def at(self, layer: int | None) -> str:
        return self.name.format(layer) if self.per_layer else self.name

    def writes_hidden(self) -> bool:
        """True for tensors that write into the residual stream from inside a block (zeroed by identity depth)."""
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

    @property
    def qgroup(self) -> int:
        return self.heads // self.kv_heads

    def axis(self, kind: str) -> int:
        """Size of one instance of an axis kind."""
        return {
            HIDDEN: self.hidden, FFN: self.ffn, KV_HEADS: self.kv_heads, QGROUP: self.qgroup,
            HEAD_DIM: self.head_dim, QKV: 3, VOCAB: self.vocab, POSITIONS: self.positions,
        }[kind]

    #: Axis kinds beyond the ones above that a subclass's `axis` answers for (a family's own vocabulary).
    extra_axes: ClassVar[tuple[str, ...]] = ()

    def replace(self, **changes: int) -> "Sizes":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("hidden", "ffn", "heads", "kv_heads", "layers", "head_dim", "vocab")}


@dataclass
class Family:
    """What growkit knows about one architecture family; subclasses fill in the config and tensor layout."""

    name: str
    model_types: tuple[str, ...]
    norm: Literal["rms", "layer"]
    norm_eps_key: str
    ignorable: tuple[str, ...] = field(default=())  # non-persistent buffers some exporters still save
    #: Config fields no tensor records (an inferred config leaves them to transformers' defaults: announced)
    unrecorded: tuple[str, ...] = field(default=())

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

    def stored_names(self, names: list[str]) -> dict[str, str]:
        """{name this family's specs use: name in the file} for a layout that spells names differently but that
        transformers loads all the same; empty when the names are already the specs' (or not this family's)."""
        return {}


def parameter_count(specs: list[TensorSpec], sizes: Sizes) -> int:
    """Number of parameters of a model with these tensors at these sizes (tied head counted once)."""
    total = 0
    for spec in specs:
        n = 1
        for dim in spec.dims:
            for axis in dim.axes:
                n *= sizes.axis(axis)
        total += n * (sizes.layers if spec.per_layer else 1)
    return total


class HeadsUnknown(ValueError):
    """Config inference stopped at the head count, which tensor shapes do not record."""


def heads_not_in_shapes(query_outputs: int, common: int) -> HeadsUnknown:
    """Weights hold heads x head_dim as one dimension, never the two factors, so an inferred head count is a guess
    (head_dim 128 and 64 both divide most widths) that changes the function: it is refused, not made."""
    counts = [query_outputs // d for d in (256, 128, 64, 32, 16, 8, 4, 2, 1) if common % d == 0][:4]
    return HeadsUnknown(f"the tensor shapes do not say how many attention heads there are ({query_outputs} query "
                        f"outputs fit {', '.join(map(str, counts))}, ... heads)")
