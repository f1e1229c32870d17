"""Weight-only 4-bit (W4A16) on one GPU: every way to multiply by a packed weight at
Llama-3-8B's projection shapes, and decode of a 4-bit Llama-3-8B-shaped model against
the bf16 one (random weights), in one run.

Stages (``--stages``, default all; one JSON written after each):
  copy     device copy bandwidth, the best of every method (benchmarks.common): the
           roofline's reference
  kernels  per projection (q/k/v 4096 x 6144, o 4096 x 4096, gate/up 4096 x 28672, down
           14336 x 4096; group 128) and M (--tokens, default 1,4,16,64):
             pallas         our kernel at its default configuration (the model's path)
             pallas_atomic / pallas_partials   split K summed by atomic adds / by XLA
             xla_int4       uint4 weights [groups, 128, N], one dot per group (the convert
                            fused into the dot) and the scales applied around it
             xla_int4_subchannel   the same compiled with XLA's sub-channel
                            dequantization fusion
             dequant_matmul dequantize to bf16 with XLA, then one matmul (the model's path
                            above the kernel's token limit)
             bf16           the dense bf16 matmul (XLA)
             torch_bf16 / torch_int4   peers: torch.mm (cuBLAS) and torch's tinygemm int4
                            kernel (torch._weight_int4pack_mm, what torchao and gpt-fast run)
           Each is checked against a float32 reference on fresh random inputs before it
           is timed. Time: one jitted program (torch: one CUDA graph) of >= 16 back-to-back
           calls, each on its own activations and its own weight copy (>= 256 MB of them,
           so no call finds another's weights in L2, and XLA's dot merger cannot read one
           weight for several calls), as the GPU's busy time per call from a profiled run
           (kernels and memsets; host launch gaps excluded; the wall time per call is
           recorded beside it). Bandwidth counts the bytes each path must read;
           fraction = that / copy bandwidth; speedups are against the faster of XLA's and
           torch's bf16 matmul.
           Also the codebook (SqueezeLLM) kernel per projection at M=1 and 16.
  sweep    the kernel's configurations (block_n, k_splits, tiles per step, warps, stages,
           atomic vs partials) per projection at M=1 and M=16, within --sweep-seconds
  decode   (each model in its own process, so one's memory is free for the next) the
           bf16 and the GPTQ 4-bit group-128 model: batch-1 ms/token at default options,
           batch-16 and batch-64 decode tokens/s (max_rolling_batch_size=64), each against
           its roofline (the bytes a step reads / copy bandwidth), and a profile of the
           batch-1 step: kernels per token, time in the quantized matmuls

  python benchmarks/quant.py --out DIR                     # everything, on the GPU
  python benchmarks/quant.py --stages copy,kernels,sweep   # the kernels only
  python benchmarks/quant.py --tiny                        # small shapes on a CPU (interpret mode)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

import numpy as np  # noqa: E402

from benchmarks.common import SHAPES, device_copy_bandwidth, environment, write_result  # noqa: E402

LLAMA3_8B = SHAPES["llama3-8b"]
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024)
STAGES = ("copy", "kernels", "sweep", "decode")
SUBCHANNEL_FLAG = "xla_gpu_experimental_enable_subchannel_dequantisation_fusion"
ROTATE_BYTES = 256 << 20   # weight copies per timing: several times any L2 (H100 50 MB, H200 60 MB)
STARTED = time.perf_counter()


def log(*a):
    print(*a, flush=True)


def projections(shape: dict) -> dict[str, tuple[int, int]]:
    """name -> (K, N) of the model's fused projections."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head_dim
    return {"qkv": (hidden, qkv), "o": (hidden, hidden), "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}


def error_record(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}"[:1500], "traceback": traceback.format_exc()[-2500:]}


# ---------------------------------------------------------------------------------------
# Operands and the paths
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Weights:
    """One projection's weight in every form the paths read (copy i of several)."""
    qweight: object      # [K/8, N] int32, the kernel's tile layout
    scales: object       # [G, N] bf16
    zeros: object        # [G, N] bf16 (integers)
    tile: int

    def dense(self):
        from pallas_kernels import w4a16
        import jax.numpy as jnp

        return w4a16.dequantize(self.qweight, self.scales, self.zeros, bits=4, tile_words=self.tile,
                                dtype=jnp.bfloat16)

    def uint4(self, group: int):
        from pallas_kernels import w4a16
        import jax.numpy as jnp

        q = w4a16.unpack_rows(self.qweight, 4, self.tile)                   # [K, N] in input order
        return q.astype(jnp.uint4).reshape(q.shape[0] // group, group, q.shape[1])


def random_weights(k: int, n: int, group: int, seed: int) -> Weights:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import w4a16

    keys = jax.random.split(jax.random.key(seed), 3)
    qweight = jax.random.randint(keys[0], (k // 8, n), jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max, jnp.int32)
    scales = (0.01 * jax.random.uniform(keys[1], (k // group, n), jnp.float32) + 1e-3).astype(jnp.bfloat16)
    zeros = jax.random.randint(keys[2], (k // group, n), 0, 16).astype(jnp.bfloat16)
    return Weights(qweight, scales, zeros, w4a16.tile_words_for(group, 4))


def xla_int4_matmul(x, q4, scales, zeros):
    """x [M, K] times uint4 weights [G, g, N] with group scales and zero points: one dot
    per group (XLA fuses the uint4 -> bf16 convert into it), then sum_g s (x q - z sum x)."""
    import jax.numpy as jnp

    import jax

    m = x.shape[0]
    groups, group, n = q4.shape
    xg = x.reshape(m, groups, group)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else x.dtype  # (XLA:CPU has no bf16 x bf16 -> f32 dot)
    partial = jnp.einsum("mgk,gkn->mgn", xg.astype(dtype), q4.astype(dtype), preferred_element_type=jnp.float32)
    xsum = jnp.sum(xg.astype(jnp.float32), axis=-1)                         # [M, G]
    s = scales.astype(jnp.float32)
    y = jnp.einsum("mgn,gn->mn", partial, s) - jnp.einsum("mg,gn->mn", xsum, zeros.astype(jnp.float32) * s)
    return y.astype(x.dtype)


def jax_paths(config=None, interpret: bool = False) -> dict:
    """name -> (fn(x, weights-args...), which weight form it reads)."""
    import jax.numpy as jnp

    from pallas_kernels import w4a16

    def pallas(cfg):
        return lambda x, q, s, z, tile: w4a16.quant_matmul_pallas(x, q, s, z, tile_words=tile, config=cfg,
                                                                  interpret=interpret)

    def dequant_matmul(x, q, s, z, tile):
        return x @ w4a16.dequantize(q, s, z, bits=4, tile_words=tile, dtype=x.dtype)

    return {
        "pallas": (pallas(config), "packed"),
        "dequant_matmul": (dequant_matmul, "packed"),
        "xla_int4": (xla_int4_matmul, "uint4"),
        "xla_int4_subchannel": (xla_int4_matmul, "uint4"),
        "bf16": (lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype), "dense"),
    }


def operands(w: Weights, form: str, group: int):
    if form == "packed":
        return (w.qweight, w.scales, w.zeros)
    if form == "uint4":
        return (w.uint4(group), w.scales, w.zeros)
    return (w.dense(),)


def form_bytes(k: int, n: int, group: int, form: str) -> int:
    scales = 2 * 2 * (k // group) * n
    return {"packed": k * n // 2 + scales, "uint4": k * n // 2 + scales, "dense": 2 * k * n}[form]


def device_seconds(trace_dir: str) -> tuple[float, float, int]:
    """(busy, span, kernels) of the first GPU's stream events in a jax.profiler trace:
    busy sums the kernels' (and memsets') durations, span runs from the first start to the
    last end."""
    import glob

    import jax

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    events = []
    for plane in jax.profiler.ProfileData.from_file(files[0]).planes:
        if plane.name.startswith("/device:GPU:0"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    events += [(ev.start_ns, ev.start_ns + ev.duration_ns) for ev in line.events]
    if not events:
        raise RuntimeError("the trace holds no GPU stream events")
    events.sort()
    return sum(e - s for s, e in events) / 1e9, (events[-1][1] - events[0][0]) / 1e9, len(events)


def time_jax(fn, weight_sets, xs, repeats: int, compiler_options=None, static=None, profile=True) -> dict:
    """Per call: ``len(xs)`` calls in one jitted program, call i on activations xs[i] and
    weights weight_sets[i] (no two calls share an operand, so XLA merges none: its dot
    merger would otherwise read a shared weight once for several calls). Wall time (median
    of ``repeats``, host launches included) and, from one profiled run, the GPU's busy
    time (kernels and memsets) and span per call."""
    import jax

    static = static or {}
    assert len(weight_sets) >= len(xs), "one weight copy per call"

    def chain(xs, weight_sets):
        return [fn(x, *weight_sets[i], **static) for i, x in enumerate(xs)]

    weight_sets = weight_sets[:len(xs)]
    lowered = jax.jit(chain).lower(xs, weight_sets)
    exe = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    jax.block_until_ready(exe(xs, weight_sets))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(exe(xs, weight_sets))
        times.append(time.perf_counter() - t)
    out = {"wall": float(np.median(times)) / len(xs)}
    if profile:
        trace_dir = tempfile.mkdtemp()
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(exe(xs, weight_sets))
        jax.profiler.stop_trace()
        busy, span, kernels = device_seconds(trace_dir)
        out.update(busy=busy / len(xs), span=span / len(xs), kernels_per_call=kernels / len(xs))
    return out


# ---------------------------------------------------------------------------------------
# torch peers
# ---------------------------------------------------------------------------------------

def torch_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def to_torch(a):
    import torch

    return torch.from_dlpack(a)


def torch_int4_weights(w: Weights, group: int):
    """tinygemm's packed int4 [N, K/2] (via torch._convert_weight_to_int4pack) and its
    scale-and-zero table [K/g, N, 2] with w = (q - 8) * scale + zero, zero = (8 - z) * s."""
    import torch

    from pallas_kernels import w4a16

    q = to_torch(w4a16.unpack_rows(w.qweight, 4, w.tile)).T.contiguous()       # [N, K] int32
    packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    packed = torch._convert_weight_to_int4pack(packed_u8, 8)
    s = to_torch(w.scales).float()
    z = to_torch(w.zeros).float()
    table = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    return packed, table


def time_torch(fn, weight_sets, xs, repeats: int) -> float:
    """Seconds per call, from the replays of one CUDA graph of ``len(xs)`` calls."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i, x in enumerate(xs[:3]):
            fn(x, *weight_sets[i % len(weight_sets)])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(x, *weight_sets[i % len(weight_sets)]) for i, x in enumerate(xs)]
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del outs, graph
    return float(np.median(times)) / len(xs)


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------

def rel_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def reference(x, w: Weights):
    """x [M, K] @ the float32 dequantized weight, float32 with full precision."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import w4a16

    dense = w4a16.dequantize(w.qweight, w.scales, w.zeros, bits=4, tile_words=w.tile, dtype=jnp.float32)
    return jnp.dot(x.astype(jnp.float32), dense, precision=jax.lax.Precision.HIGHEST)


def kernel_stage(args, bandwidth: float, on_gpu: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import w4a16

    out = {"cases": [], "crossover_m": {}, "method": (
        "GPU busy time per call (profiler) over one jitted program of back-to-back calls, each on its own "
        f"activations and weight copy (>= {ROTATE_BYTES >> 20} MB of copies); wall time beside it (median of "
        f"{args.repeats}); torch: CUDA graph replays timed with events")}
    use_torch = on_gpu and torch_available()
    for name, (k, n) in projections(args.shape).items():
        # One weight copy per call: >= --calls, and >= ROTATE_BYTES of int4 weights.
        copies = max(args.calls, math.ceil(ROTATE_BYTES / form_bytes(k, n, args.group, "packed"))) if on_gpu else 1
        sets = [random_weights(k, n, args.group, seed) for seed in range(copies)]
        dense_copies = copies
        tile = sets[0].tile
        forms = {}
        crossover = None
        for m in args.tokens:
            if args.time_limit and time.perf_counter() - STARTED > args.time_limit:
                log(f"time limit: {name} M={m} and after not measured")
                out["stopped_at"] = f"{name} M={m}"
                break
            case = {"projection": name, "K": k, "N": n, "M": m, "group": args.group, "tile_words": tile,
                    "packed_bytes": form_bytes(k, n, args.group, "packed"), "bf16_bytes": 2 * k * n,
                    "weight_copies": copies}
            default = w4a16.default_config(m, k // 8, n, tile)
            case["pallas_config"] = dataclasses.asdict(default)
            xs = [jax.random.normal(jax.random.key(1000 + i), (m, k), jnp.bfloat16) for i in range(copies)]
            want = reference(xs[0], sets[0])
            variants = jax_paths(interpret=not on_gpu)
            if m not in (1, 16):  # the other token counts: our kernel and the bf16 references only
                variants = {key: v for key, v in variants.items() if key in ("pallas", "bf16")}
            if default.k_splits > 1:  # the other way to sum split K
                other = "partials" if default.reduce == "atomic" else "atomic"
                variants[f"pallas_{other}"] = jax_paths(dataclasses.replace(default, reduce=other),
                                                        interpret=not on_gpu)["pallas"]
            for label, (fn, form) in variants.items():
                try:
                    if form not in forms:
                        forms[form] = [operands(w, form, args.group) for w in
                                       (sets if form != "dense" else sets[:dense_copies])]
                    wsets = forms[form]
                    static = {"tile": tile} if form == "packed" else {}
                    got = jax.jit(lambda x, ws, fn=fn, static=static: fn(x, *ws, **static))(xs[0], wsets[0])
                    case[f"{label}_rel_error"] = rel_error(got, want)
                    if case[f"{label}_rel_error"] > 2e-2:
                        raise AssertionError(f"{label}: relative error {case[f'{label}_rel_error']:.2e} vs the "
                                             f"float32 reference")
                    if on_gpu:
                        options = {SUBCHANNEL_FLAG: True} if label == "xla_int4_subchannel" else None
                        t = time_jax(fn, wsets, xs, args.repeats, options, static)
                        sec = t["busy"]
                        case[f"{label}_ms"] = sec * 1e3
                        case[f"{label}_wall_ms"], case[f"{label}_span_ms"] = t["wall"] * 1e3, t["span"] * 1e3
                        case[f"{label}_kernels_per_call"] = t["kernels_per_call"]
                        case[f"{label}_fraction_of_copy_bandwidth"] = form_bytes(k, n, args.group, form) / sec / bandwidth
                except Exception as e:  # noqa: BLE001
                    case[label] = error_record(e)
                    log(f"{name} M={m} {label}: {case[label]['error'][:300]}")
            if use_torch:
                torch_case(case, sets, dense_copies, xs, want, args, bandwidth)
            summarize(case, bandwidth)
            if "pallas_ms" in case and "dequant_matmul_ms" in case and crossover is None \
                    and case["dequant_matmul_ms"] < case["pallas_ms"]:
                crossover = m
            out["cases"].append(case)
            log(line(case))
        out["crossover_m"][name] = crossover
        # The codebook kernel at this projection.
        for m in ((1, 16) if not (args.time_limit and time.perf_counter() - STARTED > args.time_limit) else ()):
            case = {"projection": name, "variant": "lut", "M": m, "K": k, "N": n}
            try:
                lut = jax.random.normal(jax.random.key(7), (16, n), jnp.bfloat16)
                xs = [jax.random.normal(jax.random.key(2000 + i), (m, k), jnp.bfloat16) for i in range(copies)]
                want = jnp.dot(xs[0].astype(jnp.float32),
                               w4a16.dequantize_lut(sets[0].qweight, lut, tile_words=tile),
                               precision=jax.lax.Precision.HIGHEST)
                fn = (lambda x, q, t, tile: w4a16.quant_matmul_pallas(x, q, lut=t, tile_words=tile)) if on_gpu else \
                    (lambda x, q, t, tile: w4a16.quant_matmul_pallas(x, q, lut=t, tile_words=tile, interpret=True))
                case["rel_error_vs_reference"] = rel_error(fn(xs[0], sets[0].qweight, lut, tile), want)
                if on_gpu:
                    sec = time_jax(fn, [(w.qweight, lut) for w in sets], xs, args.repeats, static={"tile": tile})["busy"]
                    case["lut_ms"] = sec * 1e3
                    case["fraction_of_copy_bandwidth"] = (k * n // 2 + 2 * 16 * n) / sec / bandwidth
                    best_bf16 = next((c["best_bf16_ms"] for c in out["cases"] if c.get("projection") == name
                                      and c.get("M") == m and "best_bf16_ms" in c), None)
                    if best_bf16:
                        case["speedup_vs_bf16"] = best_bf16 / case["lut_ms"]
                log(f"{name} M={m} codebook: {case}")
            except Exception as e:  # noqa: BLE001
                case.update(error_record(e))
                log(f"{name} M={m} codebook: {case['error'][:300]}")
            out["cases"].append(case)
        del sets, forms
    return out


def torch_case(case, sets, dense_copies, xs, want, args, bandwidth):
    import torch

    txs = [to_torch(x) for x in xs]
    k, n, group = case["K"], case["N"], case["group"]
    try:
        dense = [to_torch(w.dense()) for w in sets[:dense_copies]]
        got = torch.mm(txs[0], dense[0])
        case["torch_bf16_rel_error"] = rel_error(got.float().cpu().numpy(), want)
        sec = time_torch(lambda x, w: torch.mm(x, w), [(w,) for w in dense], txs, args.repeats)
        case["torch_bf16_ms"] = sec * 1e3
        case["torch_bf16_fraction_of_copy_bandwidth"] = 2 * k * n / sec / bandwidth
        del dense
    except Exception as e:  # noqa: BLE001
        case["torch_bf16"] = error_record(e)
    try:
        packed = [torch_int4_weights(w, group) for w in sets]
        got = torch._weight_int4pack_mm(txs[0], packed[0][0], group, packed[0][1])
        case["torch_int4_rel_error"] = rel_error(got.float().cpu().numpy(), want)
        if case["torch_int4_rel_error"] > 2e-2:
            raise AssertionError(f"torch int4: relative error {case['torch_int4_rel_error']:.2e}")
        sec = time_torch(lambda x, p, t: torch._weight_int4pack_mm(x, p, group, t), packed, txs, args.repeats)
        case["torch_int4_ms"] = sec * 1e3
        case["torch_int4_fraction_of_copy_bandwidth"] = form_bytes(k, n, group, "packed") / sec / bandwidth
        del packed
    except Exception as e:  # noqa: BLE001
        case["torch_int4"] = error_record(e)
    torch.cuda.empty_cache()


def summarize(case: dict, bandwidth: float) -> None:
    bf16 = [case[k] for k in ("bf16_ms", "torch_bf16_ms") if k in case]
    if bf16:
        case["best_bf16_ms"] = min(bf16)
    if "pallas_ms" in case:
        t = case["pallas_ms"] / 1e3
        case["w4a16_ms"] = case["pallas_ms"]                                  # the keys of earlier runs
        case["w4a16_GBps"] = case["packed_bytes"] / t / 1e9
        case["fraction_of_copy_bandwidth"] = case["packed_bytes"] / t / bandwidth
        if bf16:
            case["speedup_vs_bf16"] = case["best_bf16_ms"] / case["pallas_ms"]
        if "dequant_matmul_ms" in case:
            case["speedup_vs_dequant_matmul"] = case["dequant_matmul_ms"] / case["pallas_ms"]
        for peer in ("torch_int4", "xla_int4", "xla_int4_subchannel"):
            if f"{peer}_ms" in case:
                case[f"speedup_vs_{peer}"] = case[f"{peer}_ms"] / case["pallas_ms"]


def line(case: dict) -> str:
    parts = [f"{case['projection']} M={case['M']}:"]
    for label in ("pallas", "pallas_atomic", "pallas_partials", "xla_int4", "xla_int4_subchannel", "dequant_matmul",
                  "bf16", "torch_bf16", "torch_int4"):
        if f"{label}_ms" in case:
            frac = case.get(f"{label}_fraction_of_copy_bandwidth")
            parts.append(f"{label} {case[f'{label}_ms'] * 1e3:.1f}us" + (f" ({100 * frac:.0f}%)" if frac else ""))
    if "speedup_vs_bf16" in case:
        parts.append(f"x{case['speedup_vs_bf16']:.2f} vs bf16")
    return " ".join(parts)


def sweep_candidates(m: int, k_words: int, n: int, tile: int, num_sms: int = 132) -> list:
    """Configurations to try, most promising first: the default, then its warps, stages
    and reduction, then the (block_n, k_splits, tiles per step) grid ordered by how far
    its program count is from 2-4 per SM."""
    from pallas_kernels import w4a16

    tiles = k_words // tile
    default = w4a16.default_config(m, k_words, n, tile)
    near = [dataclasses.replace(default, num_warps=w) for w in (2, 8, 1)]
    near += [dataclasses.replace(default, num_stages=st) for st in (1, 2, 4)]
    if default.k_splits > 1:
        near.append(dataclasses.replace(default, reduce="partials"))
    grid = []
    for block_n in ((32, 64, 128) if default.path == "gemv" else (64, 128)):
        for splits in (1, 2, 4, 8, 16):
            for per_step in (1, 2, 4):
                if n % block_n or tiles % (splits * per_step):
                    continue
                grid.append(dataclasses.replace(default, block_n=block_n, k_splits=splits, tiles_per_step=per_step))
    grid.sort(key=lambda c: (abs(math.log2((n // c.block_n) * c.k_splits / (3 * num_sms))), c.tiles_per_step != 2))
    # Without split K: no zeroed output to add into and no cast after the kernel (two small
    # XLA ops per call that a model step pays too), at the price of fewer programs.
    whole_k = [dataclasses.replace(default, block_n=bn, k_splits=1, tiles_per_step=per_step, num_warps=warps)
               for bn, per_step, warps in ((32, 4, 4), (32, 4, 8), (32, 2, 2), (64, 4, 8))
               if n % bn == 0 and tiles % per_step == 0]
    seen, unique = set(), []
    for c in [default] + near[:3] + whole_k[:2] + grid[:6] + near[3:] + whole_k[2:] + grid[6:]:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def sweep_stage(args, bandwidth: float) -> dict:
    """Candidates of every (projection, M) in turn, round-robin, until --sweep-seconds."""
    import jax
    import jax.numpy as jnp

    rows = []
    queues = {}
    for m in (1, 16):
        for name, (k, n) in projections(args.shape).items():
            copies = 1 if args.tiny else max(16, math.ceil((ROTATE_BYTES // 2) / form_bytes(k, n, args.group, "packed")))
            sets = [random_weights(k, n, args.group, seed) for seed in range(copies)]
            xs = [jax.random.normal(jax.random.key(3000 + i), (m, k), jnp.bfloat16) for i in range(copies)]
            queues[(name, m)] = dict(k=k, n=n, tile=sets[0].tile, wsets=[(w.qweight, w.scales, w.zeros) for w in sets],
                                     xs=xs, want=reference(xs[0], sets[0]),
                                     todo=sweep_candidates(m, k // 8, n, sets[0].tile))
    deadline = time.perf_counter() + args.sweep_seconds
    while any(q["todo"] for q in queues.values()) and time.perf_counter() < deadline:
        for (name, m), q in queues.items():
            if not q["todo"] or time.perf_counter() > deadline:
                continue
            cfg = q["todo"].pop(0)
            row = {"projection": name, "M": m, **dataclasses.asdict(cfg)}
            try:
                fn = jax_paths(cfg, interpret=args.tiny)["pallas"][0]
                got = jax.jit(lambda x, ws: fn(x, *ws, tile=q["tile"]))(q["xs"][0], q["wsets"][0])
                row["rel_error"] = rel_error(got, q["want"])
                if row["rel_error"] > 2e-2:
                    raise AssertionError(f"relative error {row['rel_error']:.2e}")
                t = time_jax(fn, q["wsets"], q["xs"], 3, static={"tile": q["tile"]}, profile=not args.tiny)
                sec = t.get("busy", t["wall"])
                row["ms"], row["wall_ms"] = sec * 1e3, t["wall"] * 1e3
                row["fraction_of_copy_bandwidth"] = form_bytes(q["k"], q["n"], args.group, "packed") / sec / bandwidth
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
    best = {}
    for (name, m), q in queues.items():
        done = [r for r in rows if r["projection"] == name and r["M"] == m and "ms" in r]
        if done:
            top = min(done, key=lambda r: r["ms"])
            best[f"{name}/M={m}"] = top
            log(f"sweep {name} M={m}: {len(done)} configs ({len(q['todo'])} not reached), best {top['ms'] * 1e3:.1f} us "
                f"({100 * top['fraction_of_copy_bandwidth']:.0f}%): "
                f"{ {k: top[k] for k in ('path', 'block_n', 'k_splits', 'tiles_per_step', 'reduce', 'num_warps', 'num_stages')} }; "
                f"default {done[0]['ms'] * 1e3:.1f} us")
    return {"rows": rows, "best": best, "complete": not any(q["todo"] for q in queues.values())}


# ---------------------------------------------------------------------------------------
# Decode (one model per process)
# ---------------------------------------------------------------------------------------

def decode_model(args, label: str, bandwidth: float) -> dict:
    """In this process: the ``label`` model's batch-1 ms/token, batch-16/64 tokens/s, and a
    batch-1 profile."""
    import jax

    from benchmarks.step_profile import kernel_table
    from lmidist_jax import SamplingParams, parallel
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.factory import engine_for_model
    from lmidist_jax.models import loader, quantized
    from lmidist_jax.models.families import spec_from_hf_config

    config_json = dict(args.shape)
    if args.num_layers:
        config_json["num_hidden_layers"] = args.num_layers
    spec = spec_from_hf_config(config_json)
    platform = jax.devices()[0].platform
    if label != "bf16":
        quant = quantized.QuantConfig("gptq", bits=4, group_size=args.group,
                                      impl="pallas" if platform == "gpu" else "pallas_interpret")
        spec = dataclasses.replace(spec, linear_kind=quantized.register(quant))
    max_model_len = args.input_len + args.output_len + 64
    rng = np.random.default_rng(0)
    out = {}
    t = time.perf_counter()
    model = loader.random_model(spec, dtype="bfloat16", mesh=parallel.make_mesh(1), max_model_len=max_model_len)
    jax.block_until_ready(jax.tree_util.tree_leaves(model.state))
    out["random_init_s"] = time.perf_counter() - t
    # An explicit cache (every sequence at full length): sized from memory, the engine left too
    # little for the step's temporaries at batch 64 on an H100 (OOM in the first step).
    options = dict(dtype="bf16", max_model_len=max_model_len, max_rolling_batch_size=max(args.batches),
                   num_kv_blocks=max(args.batches) * math.ceil(max_model_len / 16) + 64)
    options.update(dict(o.split("=", 1) for o in args.option))
    out["options"] = {k: str(v) for k, v in options.items()}
    engine = engine_for_model(model, None, config_from_kwargs(None, **options), max_model_len=max_model_len,
                              warmup=False, progress=False)
    out["decode_steps"] = engine.runner.decode_steps
    embed = model.state["embed"]["embedding"][...]
    weight_bytes = model.num_parameter_bytes - embed.nbytes + embed.nbytes // embed.shape[0]
    out["parameter_bytes"] = model.num_parameter_bytes
    kv_per_token = 2 * spec.total_kv_heads * spec.head_dim * 2
    context = args.input_len + args.output_len / 2
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)

    def run(batch: int, trace_dir=None) -> tuple[float, int]:
        """(seconds, tokens) of the decode phase: from the step after every prompt's first
        token to the last token."""
        for i in range(batch):
            prompt = list(map(int, rng.integers(10, spec.vocab_size - 10, args.input_len)))
            engine.add_request(f"{label}-{batch}-{time.perf_counter_ns()}-{i}", prompt, params)
        started = {}
        while len(started) < batch:  # prefill (chunked) until every request has its first token
            for o in engine.step():
                started.setdefault(o.request_id, True)
        if trace_dir:
            jax.profiler.start_trace(trace_dir)
        t, tokens = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        elapsed = time.perf_counter() - t
        if trace_dir:
            jax.profiler.stop_trace()
        return elapsed, tokens

    for batch in args.batches:
        run(batch)  # compiles
        runs = [run(batch) for _ in range(2 if batch == 1 else 1)]
        elapsed, tokens = min(runs)
        bytes_per_step = weight_bytes + kv_per_token * context * batch
        floor = bytes_per_step / bandwidth                                   # seconds per step (one token each)
        row = {"batch": batch, "decode_tokens": tokens, "decode_s": elapsed,
               "tokens_per_s": tokens / elapsed, "ms_per_step": 1e3 * elapsed * batch / tokens,
               "bytes_per_step": bytes_per_step, "roofline_tokens_per_s": batch / floor,
               "fraction_of_roofline": (tokens / elapsed) / (batch / floor)}
        out[f"batch{batch}"] = row
        if batch == 1:
            out.update({"decode_ms_per_token": row["ms_per_step"], "roofline_ms_per_token": 1e3 * floor,
                        "fraction_of_roofline": row["fraction_of_roofline"], "bytes_per_token": bytes_per_step})
        log(f"decode {label} batch {batch}: {row['tokens_per_s']:.1f} tok/s, {row['ms_per_step']:.2f} ms/step, "
            f"{100 * row['fraction_of_roofline']:.0f}% of roofline")
    if platform == "gpu" and not args.no_profile:
        d = tempfile.mkdtemp()
        _, tokens = run(1, trace_dir=d)
        table = kernel_table(d, tokens)
        quant_kernels = [kk for kk in table.get("kernels", []) if kk["name"].startswith("w4a16")]
        out["profile_batch1"] = {k: table[k] for k in ("kernels_per_token", "busy_us_per_token", "span_us_per_token")
                                 if k in table}
        out["profile_batch1"]["quant_matmul_us_per_token"] = sum(kk["us_per_token"] for kk in quant_kernels)
        out["profile_batch1"]["quant_matmul_kernels_per_token"] = sum(kk["per_token"] for kk in quant_kernels)
        out["profile_batch1"]["top_kernels"] = table.get("kernels", [])[:25]
        log(f"profile {label}: {json.dumps({k: v for k, v in out['profile_batch1'].items() if k != 'top_kernels'})}")
    return out


def decode_stage(args, bandwidth: float, out: dict, save) -> None:
    for label in ("bf16", "gptq_w4_g128"):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, os.path.abspath(__file__), "--decode-one", label, "--decode-out", path,
               "--bandwidth", str(bandwidth), "--input-len", str(args.input_len), "--output-len",
               str(args.output_len), "--batches", ",".join(map(str, args.batches)), "--group", str(args.group)]
        cmd += (["--tiny"] if args.tiny else []) + (["--no-profile"] if args.no_profile else [])
        cmd += [f"--option={o}" for o in args.option]
        if args.num_layers:
            cmd += ["--num-layers", str(args.num_layers)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, timeout=args.decode_timeout)
        try:
            out[label] = json.load(open(path))
        except Exception as e:  # noqa: BLE001
            out[label] = {"error": f"the {label} process exited {proc.returncode} without a result: {e}"}
        out[label]["process_s"] = time.perf_counter() - t
        save()
    bf16, w4 = out.get("bf16", {}), out.get("gptq_w4_g128", {})
    if "decode_ms_per_token" in bf16 and "decode_ms_per_token" in w4:
        out["speedup_w4_vs_bf16"] = bf16["decode_ms_per_token"] / w4["decode_ms_per_token"]
        for batch in args.batches:
            a, b = bf16.get(f"batch{batch}"), w4.get(f"batch{batch}")
            if a and b:
                out[f"speedup_w4_vs_bf16_batch{batch}"] = b["tokens_per_s"] / a["tokens_per_s"]
        log(f"decode: 4-bit is x{out['speedup_w4_vs_bf16']:.2f} bf16 at batch 1; " + ", ".join(
            f"batch {b}: x{out.get(f'speedup_w4_vs_bf16_batch{b}', float('nan')):.2f}" for b in args.batches))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on a CPU (kernel in interpret mode)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--tokens", default="1,4,16,64", help="token counts M of the kernel comparison")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calls", type=int, default=16, help="calls per timed program (each on its own weight copy)")
    parser.add_argument("--sweep-seconds", type=float, default=240)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds from the start: the kernel stage stops starting new cases after it, "
                             "the sweep ends early enough to finish within it")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers than Llama-3-8B's 32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--decode-timeout", type=int, default=400)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="engine option for the decode runs (e.g. decode_steps=8)")
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results)")
    parser.add_argument("--name", default="quant")
    parser.add_argument("--decode-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--decode-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.shape = TINY if args.tiny else LLAMA3_8B
    stages = args.stages.split(",")
    if args.tiny:
        args.repeats, args.calls = 1, 2
        args.tokens = [t for t in args.tokens if t <= 16]
        args.input_len, args.output_len = min(args.input_len, 16), min(args.output_len, 8)
        args.batches = [b for b in args.batches if b <= 4] or [1]

    if args.decode_one:  # the child process of the decode stage
        result = decode_model(args, args.decode_one, args.bandwidth)
        with open(args.decode_out, "w") as f:
            json.dump(result, f)
        return

    import jax

    on_gpu = jax.devices()[0].platform == "gpu"
    copies = device_copy_bandwidth() if on_gpu else device_copy_bandwidth(64 << 20, 3)
    bandwidth = copies["best"]
    result = {"benchmark": "quant", "shape": "tiny" if args.tiny else "llama3-8b", "group": args.group,
              "copy_bandwidth_GBps": bandwidth / 1e9,
              "copy_bandwidth_by_method_GBps": {k: v / 1e9 for k, v in copies.items() if isinstance(v, float)},
              "kernel_interpret_mode": not on_gpu, "environment": environment()}
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s ({result['copy_bandwidth_by_method_GBps']})")

    def save():
        return write_result(args.name + ("-tiny" if args.tiny else ""), result, args.out)

    save()
    if "kernels" in stages:
        try:
            result["kernels"] = kernel_stage(args, bandwidth, on_gpu)
        except Exception as e:  # noqa: BLE001
            result["kernels"] = error_record(e)
            log(result["kernels"]["traceback"])
        save()
    if "sweep" in stages and (on_gpu or args.tiny):
        if args.time_limit:
            args.sweep_seconds = min(args.sweep_seconds, args.time_limit - (time.perf_counter() - STARTED) - 60)
        try:
            result["sweep"] = sweep_stage(args, bandwidth)
        except Exception as e:  # noqa: BLE001
            result["sweep"] = error_record(e)
            log(result["sweep"]["traceback"])
        save()
    if "decode" in stages:
        result["decode"] = {}
        decode_stage(args, bandwidth, result["decode"], save)
    log("wrote", save())


if __name__ == "__main__":
    main()
