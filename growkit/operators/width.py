"""Width operators that need no weights to decide: clone, net2net and copy-pad."""

from __future__ import annotations

import torch

from growkit.arch.spec import GROWABLE
from growkit.errors import GrowkitError
from growkit.maps import AxisMap
from growkit.operators.base import Operator, fresh_side, stream_exact
from growkit.plan import GrowthPlan


class Clone(Operator):
    """HyperCloning: every source neuron exactly k times, in blocks, so the function is preserved exactly."""

    name = "clone"
    exact = True

    def check(self, plan: GrowthPlan) -> None:
        super().check(plan)
        for kind in GROWABLE:
            old, new = plan.source.axis(kind), plan.target.axis(kind)
            if new % old:
                what = "heads per kv head" if kind == "qgroup" else kind
                raise GrowkitError(
                    f"--method clone needs integer ratios: {what} {old} -> {new} is not; use --method net2net")

    def axis_map(self, kind: str, old: int, new: int, gen: torch.Generator) -> AxisMap:
        return AxisMap(old, torch.arange(new) % old)


class Net2Net(Operator):
    """Net2Net / bert2BERT FPI: keep every neuron, duplicate uniformly random ones, divide fan-in by the count; on
    the residual stream, writers times sqrt(k / count) and norm gains divided by it, so RMSNorm stays exact too."""

    name = "net2net"
    exact = True

    def axis_map(self, kind: str, old: int, new: int, gen: torch.Generator) -> AxisMap:
        extra = torch.randint(old, (new - old,), generator=gen)
        return stream_exact(kind, AxisMap(old, torch.cat([torch.arange(old), extra])))


class CopyPad(Operator):
    """Copy every neuron once and pad with fresh ones that start silent but trainable; on the residual stream the
    kept coordinates are written sqrt(new / old) larger (gains divided alike), so an RMSNorm's statistics and eps
    are the source's."""

    name = "copy-pad"
    exact = True

    def axis_map(self, kind: str, old: int, new: int, gen: torch.Generator) -> AxisMap:
        src = torch.cat([torch.arange(old), torch.full((new - old,), -1)])
        return stream_exact(kind, AxisMap(old, src, fresh_zero_side=fresh_side(kind)))  # type: ignore[arg-type]
