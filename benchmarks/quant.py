"""Weight-only 4-bit (W4A16) on one device: the packed matmul at Llama-3-8B's projection
shapes, and batch-1 decode of a 4-bit Llama-3-8B-shaped model (random packed weights).

One invocation measures, and writes one JSON after each stage (benchmarks.common.write_result):
  copy     device-to-device copy bandwidth (the roofline's reference, best method)
  kernels  per projection (q/k/v 4096 x 6144, o 4096 x 4096, gate/up 4096 x 28672, down
           14336 x 4096; group 128) and token count M (--tokens): the Pallas W4A16 kernel,
           dequantize-then-matmul (XLA) and the bf16 matmul, each timed inside one jitted
           loop (no per-call dispatch); the kernel is checked against the XLA reference
           first. Bandwidth counts the packed bytes (qweight + scales + zeros) and the
           fraction is of the copy bandwidth; speedups are bf16 time / kernel time.
           Also the codebook (SqueezeLLM) kernel at the o shape.
  crossover per projection, the smallest M where dequantize-then-matmul beats the kernel
  sweep    (--sweep) the kernel's tiles (block_n, words, k_splits) at M=1 and M=16
  decode   batch-1 decode ms/token of the bf16 model and of the GPTQ 4-bit group-128 model
           (same shape, random weights), and each one's roofline: the bytes one token reads
           (weights as stored, one embedding row, KV at the mean context) / copy bandwidth
Each stage runs under try/except: a failing lowering is recorded, the rest go on.

  python benchmarks/quant.py --out DIR              # everything, on the GPU
  python benchmarks/quant.py --kernels-only --sweep
  python benchmarks/quant.py --tiny                 # small shapes on a CPU (kernel in interpret mode)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import numpy as np  # noqa: E402

from benchmarks.common import SHAPES, device_copy_bandwidth, environment, write_result  # noqa: E402

LLAMA3_8B = SHAPES["llama3-8b"]
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024)


def projections(shape: dict) -> dict[str, tuple[int, int]]:
    """name -> (K, N) of the model's fused projections."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head_dim
    return {"qkv": (hidden, qkv), "o": (hidden, hidden), "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}


def error_record(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}


def loop_ms(fn, operands, inner: int, repeats: int) -> float:
    """Milliseconds per ``fn(x, *rest)`` run ``inner`` times in one jitted loop, each call's
    input depending on the last output (nothing hoisted; no per-call dispatch)."""
    import jax
    import jax.numpy as jnp

    def looped(x, *rest):
        def body(_, carry):
            out = fn(x + carry, *rest)
            return (out[:, :1] * 0).astype(x.dtype)
        return jax.lax.fori_loop(0, inner, body, jnp.zeros((x.shape[0], 1), x.dtype))

    looped = jax.jit(looped)
    jax.block_until_ready(looped(*operands))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(looped(*operands))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times)) / inner


def random_packed(k: int, n: int, group: int, seed: int = 0):
    """Random 4-bit qweight [K/8, N] int32, bf16 scales and zeros [K/group, N]."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), 3)
    qweight = jax.random.randint(keys[0], (k // 8, n), jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max, jnp.int32)
    scales = (0.01 * jax.random.uniform(keys[1], (k // group, n), jnp.float32) + 1e-3).astype(jnp.bfloat16)
    zeros = jax.random.randint(keys[2], (k // group, n), 0, 16).astype(jnp.bfloat16)
    return qweight, scales, zeros


def kernel_stage(args, bandwidth: float, interpret: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import w4a16

    out = {"cases": [], "crossover_m": {}}
    for name, (k, n) in projections(args.shape).items():
        qweight, scales, zeros = random_packed(k, n, args.group)
        dense = w4a16.dequantize(qweight, scales, zeros, bits=4, dtype=jnp.bfloat16)
        packed_bytes = qweight.nbytes + scales.nbytes + zeros.nbytes
        crossover = None
        for m in args.tokens:
            case = {"projection": name, "K": k, "N": n, "M": m, "group": args.group, "packed_bytes": packed_bytes,
                    "bf16_bytes": dense.nbytes}
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            try:
                ref = w4a16.quant_matmul_reference(x, qweight, scales, zeros)
                got = w4a16.quant_matmul_pallas(x, qweight, scales, zeros, interpret=interpret)
                case["rel_error_vs_reference"] = float(jnp.linalg.norm((got - ref).astype(jnp.float32))
                                                       / jnp.linalg.norm(ref.astype(jnp.float32)))
                kernel = functools.partial(w4a16.quant_matmul_pallas, interpret=interpret)
                case["w4a16_ms"] = loop_ms(kernel, (x, qweight, scales, zeros), args.inner, args.repeats)
            except Exception as e:  # noqa: BLE001
                case["w4a16"] = error_record(e)
            try:
                case["dequant_matmul_ms"] = loop_ms(w4a16.quant_matmul_reference, (x, qweight, scales, zeros),
                                                    args.inner, args.repeats)
                case["bf16_ms"] = loop_ms(lambda a, w: a @ w, (x, dense), args.inner, args.repeats)
            except Exception as e:  # noqa: BLE001
                case["xla"] = error_record(e)
            if "w4a16_ms" in case and "bf16_ms" in case:
                t = case["w4a16_ms"] / 1e3
                case["w4a16_GBps"] = packed_bytes / t / 1e9
                case["fraction_of_copy_bandwidth"] = packed_bytes / t / bandwidth
                case["speedup_vs_bf16"] = case["bf16_ms"] / case["w4a16_ms"]
                case["speedup_vs_dequant_matmul"] = case["dequant_matmul_ms"] / case["w4a16_ms"]
                if crossover is None and case["dequant_matmul_ms"] < case["w4a16_ms"]:
                    crossover = m
                print(f"{name} M={m}: w4a16 {case['w4a16_ms'] * 1e3:.1f} us "
                      f"({100 * case['fraction_of_copy_bandwidth']:.0f}% of copy), bf16 {case['bf16_ms'] * 1e3:.1f} us "
                      f"(x{case['speedup_vs_bf16']:.2f}), dequant+matmul {case['dequant_matmul_ms'] * 1e3:.1f} us",
                      flush=True)
            out["cases"].append(case)
        out["crossover_m"][name] = crossover
    # The codebook variant at the o shape.
    k, n = projections(args.shape)["o"]
    qweight, _, _ = random_packed(k, n, args.group)
    lut = jax.random.normal(jax.random.key(1), (16, n), jnp.bfloat16)
    for m in (1, 16):
        case = {"projection": "o", "variant": "lut", "M": m}
        try:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            ref = w4a16.lut_matmul_reference(x, qweight, lut)
            got = w4a16.quant_matmul_pallas(x, qweight, lut=lut, interpret=interpret)
            case["rel_error_vs_reference"] = float(jnp.linalg.norm((got - ref).astype(jnp.float32))
                                                   / jnp.linalg.norm(ref.astype(jnp.float32)))
            case["lut_ms"] = loop_ms(lambda a, q, t: w4a16.quant_matmul_pallas(a, q, lut=t, interpret=interpret),
                                     (x, qweight, lut), args.inner, args.repeats)
            case["fraction_of_copy_bandwidth"] = (qweight.nbytes + lut.nbytes) / (case["lut_ms"] / 1e3) / bandwidth
        except Exception as e:  # noqa: BLE001
            case.update(error_record(e))
        out["cases"].append(case)
    return out


def sweep_stage(args, bandwidth: float, interpret: bool) -> list:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import w4a16

    rows = []
    for name, (k, n) in projections(args.shape).items():
        qweight, scales, zeros = random_packed(k, n, args.group)
        packed_bytes = qweight.nbytes + scales.nbytes + zeros.nbytes
        for m in ((1,) if args.tiny else (1, 16)):
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            for block_n in ((64,) if args.tiny else (64, 128, 256)):
                for words in ((8,) if args.tiny else (8, 16, 32)):
                    for k_splits in ((1, 2) if args.tiny else (1, 2, 4, 8, 16)):
                        if n % block_n or (k // 8) % (words * k_splits):
                            continue
                        row = dict(projection=name, M=m, block_n=block_n, words=words, k_splits=k_splits)
                        try:
                            fn = functools.partial(w4a16.quant_matmul_pallas, block_n=block_n, words=words,
                                                   k_splits=k_splits, interpret=interpret)
                            row["ms"] = loop_ms(fn, (x, qweight, scales, zeros), args.inner, args.repeats)
                            row["fraction_of_copy_bandwidth"] = packed_bytes / (row["ms"] / 1e3) / bandwidth
                        except Exception as e:  # noqa: BLE001
                            row["error"] = f"{type(e).__name__}: {e}"[:300]
                        rows.append(row)
            best = max((r for r in rows if r.get("projection") == name and r["M"] == m and "ms" in r),
                       key=lambda r: r["fraction_of_copy_bandwidth"], default=None)
            if best:
                print(f"sweep {name} M={m}: best {best}", flush=True)
    return rows


def decode_stage(args, bandwidth: float, out: dict, save) -> None:
    """Batch-1 decode, bf16 model vs 4-bit GPTQ group 128 (random weights)."""
    import jax

    from lmidist_jax import SamplingParams, parallel
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.factory import engine_for_model
    from lmidist_jax.models import loader, quantized
    from lmidist_jax.models.families import spec_from_hf_config

    config_json = dict(args.shape)
    if args.num_layers:
        config_json["num_hidden_layers"] = args.num_layers
    dense_spec = spec_from_hf_config(config_json)
    platform = jax.devices()[0].platform
    quant = quantized.QuantConfig("gptq", bits=4, group_size=args.group,
                                  impl="pallas" if platform == "gpu" else "xla")
    quant_spec = dataclasses.replace(dense_spec, linear_kind=quantized.register(quant))
    max_model_len = args.input_len + args.output_len + 64
    rng = np.random.default_rng(0)
    prompt = list(map(int, rng.integers(10, dense_spec.vocab_size - 10, args.input_len)))
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    for label, spec in (("bf16", dense_spec), ("gptq_w4_g128", quant_spec)):
        run = out.setdefault(label, {})
        try:
            t = time.perf_counter()
            model = loader.random_model(spec, dtype="bfloat16", mesh=parallel.make_mesh(1), max_model_len=max_model_len)
            jax.block_until_ready(jax.tree_util.tree_leaves(model.state))
            run["random_init_s"] = time.perf_counter() - t
            options = dict(dtype="bf16", max_model_len=max_model_len, max_rolling_batch_size=4,
                           max_rolling_batch_prefill_tokens=max(args.input_len, 64))
            options.update(dict(o.split("=", 1) for o in args.option))
            run["options"] = {k: str(v) for k, v in options.items()}
            engine = engine_for_model(model, None, config_from_kwargs(None, **options), max_model_len=max_model_len,
                                      warmup=False, progress=False)
            per_run = []
            for attempt in range(3):  # the first compiles
                engine.add_request(f"{label}-{attempt}", prompt, params)
                times = []
                while engine.has_unfinished_requests():
                    for o in engine.step():
                        times.extend([time.perf_counter()] * len(o.new_token_ids))
                per_run.append((times[-1] - times[0]) / (len(times) - 1))
            per_token = per_run[-1]
            embed = model.state["embed"]["embedding"][...]
            weight_bytes = model.num_parameter_bytes - embed.nbytes + embed.nbytes // embed.shape[0]
            context = args.input_len + args.output_len / 2
            kv_bytes = 2 * spec.total_kv_heads * spec.head_dim * 2 * context
            floor = (weight_bytes + kv_bytes) / bandwidth
            run.update({"decode_ms_per_token": 1e3 * per_token, "parameter_bytes": model.num_parameter_bytes,
                        "bytes_per_token": weight_bytes + kv_bytes, "roofline_ms_per_token": 1e3 * floor,
                        "fraction_of_roofline": floor / per_token})
            print(f"decode {label}: {1e3 * per_token:.2f} ms/token, roofline {1e3 * floor:.2f} ms "
                  f"({100 * floor / per_token:.0f}%)", flush=True)
            del engine, model
        except Exception as e:  # noqa: BLE001
            run.update(error_record(e))
            print(f"decode {label} failed: {e}", flush=True)
        save()
    if "decode_ms_per_token" in out.get("bf16", {}) and "decode_ms_per_token" in out.get("gptq_w4_g128", {}):
        out["speedup_w4_vs_bf16"] = out["bf16"]["decode_ms_per_token"] / out["gptq_w4_g128"]["decode_ms_per_token"]
        print(f"decode: 4-bit is x{out['speedup_w4_vs_bf16']:.2f} bf16", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on a CPU (kernel in interpret mode)")
    parser.add_argument("--kernels-only", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernel's tiles at M=1 and M=16")
    parser.add_argument("--tokens", default="1,16,32,64,128,256", help="token counts M of the kernel comparison")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--inner", type=int, default=50, help="calls per jitted loop")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers than Llama-3-8B's 32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="engine option for the decode runs (e.g. decode_steps=8)")
    parser.add_argument("--out", default=None, help="output directory (default benchmarks/results)")
    parser.add_argument("--name", default="quant")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.shape = TINY if args.tiny else LLAMA3_8B
    if args.tiny:
        args.repeats, args.inner = min(args.repeats, 2), min(args.inner, 2)
        args.tokens = [t for t in args.tokens if t <= 16]
        args.input_len, args.output_len = min(args.input_len, 16), min(args.output_len, 8)

    import jax

    platform = jax.devices()[0].platform
    interpret = platform != "gpu"
    copies = device_copy_bandwidth() if platform == "gpu" else device_copy_bandwidth(64 << 20, 3)
    bandwidth = copies["best"]
    result = {"benchmark": "quant", "shape": "tiny" if args.tiny else "llama3-8b", "group": args.group,
              "copy_bandwidth_GBps": bandwidth / 1e9,
              "copy_bandwidth_by_method_GBps": {k: v / 1e9 for k, v in copies.items() if isinstance(v, float)},
              "kernel_interpret_mode": interpret, "environment": environment()}

    def save():
        return write_result(args.name + ("-tiny" if args.tiny else ""), result, args.out)

    save()
    if not args.skip_kernels:
        try:
            result["kernels"] = kernel_stage(args, bandwidth, interpret)
        except Exception as e:  # noqa: BLE001
            result["kernels"] = error_record(e)
        save()
        if args.sweep:
            try:
                result["sweep"] = sweep_stage(args, bandwidth, interpret)
            except Exception as e:  # noqa: BLE001
                result["sweep"] = error_record(e)
            save()
    if not args.kernels_only:
        result["decode"] = {}
        decode_stage(args, bandwidth, result["decode"], save)
    print("wrote", save())


if __name__ == "__main__":
    main()
