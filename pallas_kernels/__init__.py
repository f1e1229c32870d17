"""Paged-attention kernels: plain-XLA reference (the oracle), the tiled XLA path the CPU
runs (xla_attention.py) and Pallas GPU kernels.

  paged_decode_attention(q, k_pages, v_pages, block_tables, seq_lens, *, scale, ...)
  paged_attention(q, k_pages, v_pages, block_tables, token_seq_ids, positions, *, scale, ...)
  write_kv_pages(k_pages, v_pages, k_new, v_new, slot_mapping)
  select_backend(platform, requested="auto") -> "xla" | "triton" | "mosaic_gpu"
  grouped_matmul.grouped_matmul(lhs, rhs, group_sizes, *, impl)   mixture-of-experts grouped GEMM
  w4a16.quant_matmul(x, qweight, scales, zeros, lut, *, impl)     AWQ / GPTQ / SqueezeLLM packed matmul
"""

from __future__ import annotations

from pallas_kernels.grouped_matmul import GROUPED_MATMUL_IMPLS, grouped_matmul_reference
from pallas_kernels.paged_decode import paged_decode_attention
from pallas_kernels.paged_prefill import paged_attention
from pallas_kernels.reference import (
    paged_attention_reference,
    paged_decode_attention_reference,
    write_kv_pages,
)

ATTENTION_BACKENDS = ("auto", "xla", "mosaic_gpu", "triton")
# Pallas backends with a kernel implemented here (the Triton one was measured; see
# NOTES.md). Mosaic GPU has no kernel in this package yet.
IMPLEMENTED_PALLAS_BACKENDS = ("triton",)
# Measured best Pallas backend on GPU (benchmarks/kernels.py, NOTES.md).
BEST_GPU_BACKEND = "triton"

__all__ = [
    "ATTENTION_BACKENDS",
    "GROUPED_MATMUL_IMPLS",
    "grouped_matmul_reference",
    "paged_attention",
    "paged_attention_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "select_backend",
    "write_kv_pages",
]


def select_backend(platform: str, requested: str = "auto") -> str:
    """Attention backend for a device platform ("cpu", "gpu"/"cuda", "tpu", ...).

    "auto" -> "xla" on anything but a GPU, the measured-best Pallas backend on GPU.
    "xla" is always allowed. A Pallas backend is only allowed on GPU.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; "
                         f"expected one of {', '.join(ATTENTION_BACKENDS)}")
    is_gpu = platform.lower() in ("gpu", "cuda", "rocm")
    if requested == "auto":
        return BEST_GPU_BACKEND if is_gpu else "xla"
    if requested == "xla":
        return "xla"
    if not is_gpu:
        raise ValueError(f"attention backend {requested!r} needs a GPU; platform is "
                         f"{platform!r} (use 'xla' or 'auto')")
    if requested not in IMPLEMENTED_PALLAS_BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not implemented yet; "
                         f"available: {', '.join(('xla',) + IMPLEMENTED_PALLAS_BACKENDS)}")
    return requested
