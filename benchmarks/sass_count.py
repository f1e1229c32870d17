"""Instruction counts of a Pallas (Triton backend) kernel without a GPU: lower it to Triton
IR on the CPU (``jax.export`` for ``cuda``, the backend's GPU query pointed at an H100),
run the TTIR passes XLA's Triton pipeline runs (inliner, combine, CSE, ...), compile to
a cubin for sm_90 with the ``triton`` package's ptxas, and count the instructions of the
main loop in its SASS (``cuobjdump``, shipped with the ``triton`` package).

  python benchmarks/sass_count.py --m 1            # the W4A16 kernel at Llama-3-8B's q/k/v
  python benchmarks/sass_count.py --m 16 --k 14336 --n 4096 --keep /tmp/w4a16

The jaxlib that runs on the GPU embeds its own Triton (3.6 on the lent image; the pip
package here may be newer), so counts are a guide, not the GPU's exact code.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def capture_ttir(fn, *avals) -> list[str]:
    """The Triton IR (text) of every Pallas call in ``fn``, lowered for an H100."""
    import jax
    from jax._src.pallas.triton import gpu_info, lowering, pallas_call_registration as registration

    captured = []
    original_lower, original_info = lowering.lower_jaxpr_to_triton_module, registration.gpu_info_lib.get_gpu_info

    def lower(*a, **k):
        result = original_lower(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = lower
    registration.gpu_info_lib.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    try:
        jax.export.export(jax.jit(fn), platforms=["cuda"],
                          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*avals)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original_lower
        registration.gpu_info_lib.get_gpu_info = original_info
    return captured


def compile_to_sass(ttir: str, prefix: str, num_warps: int, num_stages: int) -> str:
    import triton
    from triton._C.libtriton import ir, passes
    from triton.backends.compiler import GPUTarget

    path = prefix + ".ttir"
    with open(path, "w") as f:
        f.write(ttir)
    context = ir.context()
    ir.load_dialects(context)
    module = ir.parse_mlir_module(path, context)
    pm = ir.pass_manager(context)
    passes.common.add_inliner(pm)
    passes.common.add_canonicalizer(pm)
    passes.ttir.add_combine(pm)
    passes.ttir.add_reorder_broadcast(pm)
    passes.common.add_cse(pm)
    passes.common.add_symbol_dce(pm)
    passes.ttir.add_loop_unroll(pm)
    pm.run(module, "make_ttir")
    with open(path, "w") as f:
        f.write(str(module))
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    with open(prefix + ".cubin", "wb") as f:
        f.write(kernel.asm["cubin"])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass", prefix + ".cubin"], check=True,
                          capture_output=True, text=True).stdout


def loop_counts(sass: str) -> tuple[int, collections.Counter]:
    """(instructions, by opcode) between the target and the source of the last backward branch."""
    instructions = []
    for text in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", text)
        if m:
            instructions.append((int(m.group(1), 16), m.group(3), text))
    body = []
    for address, op, text in instructions:
        if op == "BRA" and "BRA 0x" in text:
            target = int(text.split("BRA 0x")[1].split()[0].strip(" ;"), 16)
            if target < address:
                body = [o for a, o, _ in instructions if target <= a <= address]
    return len(body), collections.Counter(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=6144)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--x-dtype", default="bfloat16")
    parser.add_argument("--config", default="{}", help='KernelConfig fields over the default, as JSON: {"num_warps": 2}')
    parser.add_argument("--keep", default=None, help="file prefix for the .ttir / .cubin / .sass")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from pallas_kernels import w4a16

    tile = w4a16.tile_words_for(args.group, 4)
    import dataclasses
    import json

    config = dataclasses.replace(w4a16.default_config(args.m, args.k // 8, args.n, tile), **json.loads(args.config))
    avals = (jax.ShapeDtypeStruct((args.m, args.k), jnp.dtype(args.x_dtype)), jax.ShapeDtypeStruct((args.k // 8, args.n), jnp.int32),
             jax.ShapeDtypeStruct((args.k // args.group, args.n), jnp.bfloat16),
             jax.ShapeDtypeStruct((args.k // args.group, args.n), jnp.bfloat16))
    [ttir] = capture_ttir(lambda x, q, s, z: w4a16.quant_matmul_pallas(x, q, s, z, tile_words=tile, config=config),
                          *avals)
    prefix = args.keep or os.path.join(tempfile.mkdtemp(), "kernel")
    sass = compile_to_sass(ttir, prefix, config.num_warps, config.num_stages)
    with open(prefix + ".sass", "w") as f:
        f.write(sass)
    count, ops = loop_counts(sass)
    threads = 32 * config.num_warps
    rows = args.m if config.path == "gemv" else 1  # the mma path's count is per weight whatever M
    weights = config.tiles_per_step * tile * (32 // 4) * config.block_n / threads
    print(f"{config}\nmain loop: {count} instructions per thread per step, {weights:.0f} weights each "
          f"-> {count / weights:.2f} per weight ({rows} activation row(s))")
    print("by opcode:", ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))
    print("files:", prefix + ".{ttir,cubin,sass}")


if __name__ == "__main__":
    main()
