"""The MLP kinds: ``spec.mlp_type`` -> the module a decoder layer builds as its MLP.

The table lives apart from the kinds so that each kind's module imports only what it
builds on (the mixture of experts builds Qwen2-MoE's shared expert from ``GatedMLP``).
"""

from __future__ import annotations

from .layers import GatedMLP, PlainMLP
from .moe import MoEMLP

# Each takes (spec, make_linear, dtype=, mesh=); the dense kinds leave sharding to XLA,
# the mixture of experts runs its experts per shard.
MLP_KINDS: dict[str, type] = {"gated": GatedMLP, "plain": PlainMLP, "moe": MoEMLP}


def make_mlp(spec, make_linear, dtype, mesh=None):
    try:
        cls = MLP_KINDS[spec.mlp_type]
    except KeyError:
        raise ValueError(f"unknown MLP type {spec.mlp_type!r}; available: {', '.join(sorted(MLP_KINDS))}") from None
    return cls(spec, make_linear, dtype=dtype, mesh=mesh)
