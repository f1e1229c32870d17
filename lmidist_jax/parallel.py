"""The device mesh and the logical-axis sharding rules.

A mesh always exists (one device by default), so tensor parallelism is a config
value: weights are placed by mapping each parameter's logical axes to mesh axes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

TP_AXIS = "tp"

# Megatron-style tensor parallelism: q/k/v and gate/up column-parallel ("heads",
# "kv_heads", "mlp" split), o and down row-parallel (their input axis split),
# embedding and LM head vocab-parallel, norms replicated.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": TP_AXIS,
    "heads": TP_AXIS,
    "kv_heads": TP_AXIS,
    "mlp": TP_AXIS,
    "embed": None,
    "norm": None,
}


def make_mesh(tensor_parallel_degree: int = 1, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if tensor_parallel_degree > len(devices):
        raise ValueError(
            f"tensor_parallel_degree={tensor_parallel_degree} but only {len(devices)} devices are visible")
    return Mesh(np.array(devices[:tensor_parallel_degree]), (TP_AXIS,))


def partition_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Mesh placement for a parameter; an axis that does not divide evenly stays replicated."""
    spec = []
    for axis, size in zip(logical_axes, shape):
        mesh_axis = LOGICAL_AXIS_RULES.get(axis) if axis is not None else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis] != 0:
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(logical_axes, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(logical_axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def collective_counts(hlo_text: str) -> dict[str, int]:
    """{opcode: count} of the collectives in a compiled program's HLO text (what a step
    communicates: tests/test_parallel.py, benchmarks/step_profile.py). The opcode is read
    after whitespace: a combined collective's result type is a tuple with spaces."""
    import collections
    import re

    ops = re.findall(r"\s(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(", hlo_text)
    return dict(collections.Counter(ops))


def gather_for_sampling(logits, mesh: Mesh | None):
    """Vocab-parallel logits gathered onto every device (inside a jitted step). The
    sampler's reductions over the vocabulary (log-softmax, argmax, top-k/p sorts, the
    penalty tables' rows) would otherwise each be partitioned into collectives of their
    own: about ten small all-reduces, all-gathers and all-to-alls per step, and the
    replicated penalty tables gathered whole. One all-gather of [rows, vocab] float32
    replaces them; the sampling itself is cheap enough to run on every device."""
    if mesh is None or mesh.size == 1:
        return logits
    # Pinned vocab-parallel first: with only the replicated constraint, propagation
    # carries it back into the LM head's matmul and XLA gathers the weight instead.
    axes = (None,) * (logits.ndim - 1) + ("vocab",)
    logits = jax.lax.with_sharding_constraint(logits, named_sharding(axes, logits.shape, mesh))
    return jax.lax.with_sharding_constraint(logits, replicated(mesh))
