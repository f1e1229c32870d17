"""GPU benchmark of the paged-attention kernels (one script = one device call).

  python3 benchmarks/kernels.py [--out DIR] [--sweep] [--cases abc] [--skip-prefill]
                                [--no-correctness] [--tag NAME] [--cpu-smoke]

0. GPU correctness of the compiled kernels on small shapes (features: GQA/MQA, d=80/256,
   fp32, window, soft-cap, ALiBi) and the per-kernel launch cost;
1. device-to-device copy bandwidth (x + 1 on a 2 GiB bf16 array: bytes read + written);
2. decode attention, Llama-3-8B shape (32 q heads, 8 KV heads, head_dim 128, bf16,
   block_size 16): (a) 32 seqs x 4096, (b) 32 seqs ragged U[1, 4096], (c) 1 seq x 8192;
   for our Pallas kernel (default config, plus a sweep of variants with --sweep), the XLA
   reference and the stock jax.experimental.pallas.ops.gpu.paged_attention;
3. the mixed/prefill kernel: 4 seqs x 512 new tokens on 1024 cached (TFLOP/s).
Every timed function is first checked against the XLA reference on the same inputs.
Timing: R different query sets per jitted call (no CSE, KV rotated through disjoint
cache regions when one set would fit in L2), several calls queued before one
block_until_ready, median over samples, divided by R ("wall"); plus one profiled run
("device span": first GPU kernel start to last kernel end per call, jax.profiler).
Writes kernels-<device>-<date>.json to --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import tempfile
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import environment, write_result  # noqa: E402
from pallas_kernels import paged_attention, paged_decode_attention  # noqa: E402
from pallas_kernels.reference import (  # noqa: E402
    paged_attention_reference,
    paged_decode_attention_reference,
    shuffled_block_tables,
)

H, KVH, D, BS = 32, 8, 128, 16
DT = jnp.bfloat16
# --cpu-smoke: tiny shapes in Pallas interpret mode, to check this script without a GPU.
SMOKE = False


def log(*a):
    print(*a, flush=True)


def time_fn(fn, args, calls_per_fn: int, samples: int = 10, queue: int = 3) -> float:
    """Seconds per kernel call: median over samples of (queue calls) / (queue * R)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(samples):
        t = time.perf_counter()
        outs = [fn(*args) for _ in range(queue)]
        jax.block_until_ready(outs)
        ts.append((time.perf_counter() - t) / (queue * calls_per_fn))
    return float(np.median(ts)), float(np.std(ts) / max(np.median(ts), 1e-12))


_PROFILE_LINES_LOGGED = []


def device_time(fn, args, calls_per_fn: int) -> dict:
    """Device-side time per kernel call from one profiled run of fn (after warm-up):
    busy = sum of GPU kernel durations, span = first kernel start to last kernel end."""
    try:
        jax.block_until_ready(fn(*args))
        d = tempfile.mkdtemp()
        jax.profiler.start_trace(d)
        jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        pdata = jax.profiler.ProfileData.from_file(files[0])
        per_kernel = collections.defaultdict(float)
        starts, ends = [], []
        for plane in pdata.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if not _PROFILE_LINES_LOGGED:
                    _PROFILE_LINES_LOGGED.append(1)
                    log("    profile lines:", [ln.name for ln in plane.lines])
                if not line.name.startswith("Stream"):
                    continue
                for ev in line.events:
                    per_kernel[ev.name] += ev.duration_ns
                    starts.append(ev.start_ns)
                    ends.append(ev.start_ns + ev.duration_ns)
        if not starts:
            return {"error": "no GPU stream events"}
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:4]
        return {"busy_us": sum(per_kernel.values()) / calls_per_fn / 1e3,
                "span_us": (max(ends) - min(starts)) / calls_per_fn / 1e3,
                "kernels_us": {k[:80]: v / calls_per_fn / 1e3 for k, v in top}}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def launch_overhead() -> dict:
    """A chain of 32 trivial Pallas kernels: per-kernel cost (host launch + device)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    def kern(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    one = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((1024,), jnp.float32),
                         compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
                         interpret=SMOKE)

    @jax.jit
    def chain(x):
        for _ in range(32):
            x = one(x)
        return x
    x = jnp.arange(1024, dtype=jnp.float32)
    t, spread = time_fn(chain, (x,), 32)
    return {"wall_us_per_kernel": t * 1e6, "device": device_time(chain, (x,), 32)}


def rel_err(a, b) -> float:
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def copy_bandwidth() -> dict:
    """The roofline's bandwidth: the best of every device copy and read-only stream
    measured in this process (common.device_copy_bandwidth: XLA, torch), not XLA's copy
    alone, which reaches ~3.2 of the ~4.2 TB/s a torch copy reaches on an H200."""
    from benchmarks.common import device_copy_bandwidth

    copies = device_copy_bandwidth(1 << 20, 3) if SMOKE else device_copy_bandwidth()
    return {"gb_per_s": copies["best"] / 1e9,
            "by_method_GBps": {k: v / 1e9 for k, v in copies.items() if isinstance(v, float)}}


class DecodeCase:
    def __init__(self, name, lens_sets, max_blocks, reps, seed=0):
        """lens_sets: one int array of lengths per input set; each set gets its own
        disjoint region of one shared cache and its own shuffled block table."""
        self.name = name
        rng = np.random.default_rng(seed)
        self.n_sets = len(lens_sets)
        self.reps = reps
        self.max_blocks = max_blocks
        need = [int(sum(-(-int(l) // BS) for l in lens)) for lens in lens_sets]
        num_blocks = 1 + sum(need)
        k = jax.random.normal(jax.random.key(1), (KVH, num_blocks, BS, D), DT)
        v = jax.random.normal(jax.random.key(2), (KVH, num_blocks, BS, D), DT)
        self.k, self.v = k, v
        self.tables, self.lens = [], []
        base = 1
        for lens, nd in zip(lens_sets, need):
            bt = shuffled_block_tables(rng, lens, block_size=BS, max_blocks=max_blocks,
                                       free_blocks=np.arange(base, base + nd))
            base += nd
            self.tables.append(jnp.asarray(bt))
            self.lens.append(jnp.asarray(lens, jnp.int32))
        num_seqs = len(lens_sets[0])
        self.qs = [jax.random.normal(jax.random.key(10 + r), (num_seqs, H, D), DT)
                   for r in range(reps)]
        self.kv_bytes = float(np.mean([int(np.sum(l)) for l in lens_sets])) * 2 * KVH * D * 2
        self.io_bytes = 2 * num_seqs * H * D * 2
        self.bytes = self.kv_bytes + self.io_bytes

    def args(self):
        return (self.k, self.v, self.qs, self.tables, self.lens)

    def make(self, kernel):
        """jit of R kernel calls on R different (q, table) sets."""
        n = self.n_sets

        @jax.jit
        def run(k, v, qs, tables, lens):
            return [kernel(q, k, v, tables[r % n], lens[r % n]) for r, q in enumerate(qs)]
        return run

    def check(self, kernel, ref_out) -> float:
        out = jax.jit(kernel)(self.qs[0], self.k, self.v, self.tables[0], self.lens[0])
        return rel_err(out, ref_out)


def ours(**kw):
    return lambda q, k, v, bt, lens: paged_decode_attention(
        q, k, v, bt, lens, scale=D ** -0.5, interpret=SMOKE, **kw)


def xla_ref(q, k, v, bt, lens):
    return paged_decode_attention_reference(q, k, v, bt, lens, scale=D ** -0.5)


def stock(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as pa
    # The stock kernel does not scale q.
    return lambda q, k, v, bt, lens: pa.paged_attention(
        (q.astype(jnp.float32) * D ** -0.5).astype(q.dtype), k, v, bt, lens,
        interpret=SMOKE, **kw)


def measure(case: DecodeCase, label, kernel, ref_out, copy_bw, rows, tol=2e-2, profile=True):
    rec = {"case": case.name, "variant": label}
    try:
        t0 = time.perf_counter()
        run = case.make(kernel)
        outs = run(*case.args())  # compiles; output 0 uses q set 0 / table set 0
        err = rel_err(outs[0], ref_out)
        del outs
        rec["rel_err"] = err
        rec["compile_check_s"] = time.perf_counter() - t0
        if not (err < tol):
            rec["error"] = f"rel_err {err:.3g} >= {tol}"
        else:
            t, spread = time_fn(run, case.args(), case.reps)
            rec.update(time_us=t * 1e6, spread=spread, gb_per_s=case.bytes / t / 1e9,
                       frac_of_copy=case.bytes / t / 1e9 / copy_bw)
            if profile:
                rec["device"] = dev = device_time(run, case.args(), case.reps)
                if "busy_us" in dev:
                    rec["device_frac_of_copy"] = case.bytes / (dev["span_us"] * 1e-6) / 1e9 / copy_bw
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        rec["error"] = f"{type(e).__name__}: {msg[:800]} ... {msg[-1500:]}"
        traceback.print_exc(limit=2)
    rows.append(rec)
    if "time_us" in rec:
        dev = rec.get("device", {})
        dtxt = (f"| device span {dev['span_us']:7.1f} busy {dev['busy_us']:7.1f} us "
                f"{100 * rec['device_frac_of_copy']:5.1f}%" if "span_us" in dev else "")
        log(f"  {case.name:10s} {label:40s} {rec['time_us']:8.1f} us "
            f"{rec['gb_per_s']:6.0f} GB/s {100 * rec['frac_of_copy']:5.1f}% copy "
            f"err {rec['rel_err']:.1e} {dtxt}")
        if "kernels_us" in dev and label in ("ours default", "stock_pallas default"):
            log("      kernels:", {k: round(v, 2) for k, v in dev["kernels_us"].items()})
    else:
        log(f"  {case.name:10s} {label:44s} FAILED {rec.get('error')}")
    return rec


def decode_benchmarks(copy_bw, sweep: bool, rows: list, save=lambda: None, which="abc"):
    rng = np.random.default_rng(123)
    if SMOKE:
        cases = [
            DecodeCase("a_32x4096", [np.full(2, 256)], 16, reps=2),
            DecodeCase("b_ragged", [rng.integers(1, 257, 2)], 16, reps=2),
            DecodeCase("c_1x8192", [np.full(1, 512)] * 2, 32, reps=2),
        ]
    else:
        cases = [
            DecodeCase("a_32x4096", [np.full(32, 4096)], 256, reps=4),
            DecodeCase("b_ragged", [rng.integers(1, 4097, 32)], 256, reps=4),
            DecodeCase("c_1x8192", [np.full(1, 8192)] * 8, 512, reps=16),
        ]
    cases = [c for c in cases if c.name[0] in which]
    best = {}
    for case in cases:
        log(f"-- {case.name}: KV bytes {case.kv_bytes / 1e6:.1f} MB, "
            f"floor at copy bw {case.bytes / copy_bw / 1e3:.1f} us")
        ref_out = jax.jit(xla_ref)(case.qs[0], case.k, case.v, case.tables[0], case.lens[0])
        measure(case, "xla_reference", xla_ref, ref_out, copy_bw, rows)
        for kw in ([dict()] + ([dict(k_splits=8), dict(k_splits=32)] if sweep else [])):
            measure(case, f"stock_pallas {kw or 'default'}", stock(**kw), ref_out, copy_bw, rows)
        measure(case, "ours default", ours(), ref_out, copy_bw, rows)
        if sweep:
            variants = {
                "a": [(8, 4, 2, 1, None), (8, 4, 2, 2, None), (4, 4, 3, 2, None),
                      (4, 4, 3, 4, None), (16, 8, 2, 2, None)],
                "b": [(8, 4, 2, 2, None), (8, 4, 2, 8, None), (4, 4, 3, 4, None),
                      (4, 4, 3, 8, None), (16, 4, 2, 4, None)],
                "c": [(4, 4, 2, 32, None), (4, 4, 2, 32, 128), (4, 4, 2, 32, 32),
                      (8, 4, 2, 64, None), (4, 4, 2, 64, None), (8, 4, 2, 16, None),
                      (16, 4, 2, 16, None), (4, 4, 3, 32, None), (8, 8, 3, 32, None)],
            }[case.name[0]]
            for pages, warps, stages, sp, cbd in variants:
                kw = dict(pages_per_compute_block=pages, num_warps=warps, num_stages=stages,
                          num_splits=sp, combine_block_d=cbd)
                measure(case, f"ours p{pages} w{warps} s{stages} k{sp}" +
                        (f" cd{cbd}" if cbd else ""), ours(**kw), ref_out, copy_bw, rows)
        mine = [r for r in rows if r["case"] == case.name and r["variant"].startswith("ours")
                and "time_us" in r]
        if mine:
            best[case.name] = min(mine, key=lambda r: r["time_us"])
        del ref_out
        case.k = case.v = None
        save()
    return best


def prefill_benchmark(rows: list, sweep: bool):
    num_seqs, new, cached = (1, 32, 32) if SMOKE else (4, 512, 1024)
    total = new + cached
    nb_seq = total // BS
    num_blocks = 1 + num_seqs * nb_seq
    rng = np.random.default_rng(7)
    k = jax.random.normal(jax.random.key(3), (KVH, num_blocks, BS, D), DT)
    v = jax.random.normal(jax.random.key(4), (KVH, num_blocks, BS, D), DT)
    bt = jnp.asarray(rng.permutation(np.arange(1, num_blocks)).reshape(num_seqs, nb_seq),
                     jnp.int32)
    seq_ids = jnp.asarray(np.repeat(np.arange(num_seqs), new), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(cached, total), num_seqs), jnp.int32)
    reps = 2
    qs = [jax.random.normal(jax.random.key(20 + r), (num_seqs * new, H, D), DT)
          for r in range(reps)]
    flops = 4.0 * H * D * num_seqs * float(np.sum(np.arange(cached, total) + 1))
    ref_out = jax.jit(functools.partial(paged_attention_reference, scale=D ** -0.5))(
        qs[0], k, v, bt, seq_ids, positions)
    log(f"-- prefill {num_seqs}x{new} new on {cached} cached: {flops / 1e9:.1f} GFLOP")

    def one(label, fn):
        rec = {"case": "prefill_4x512_on_1024", "variant": label}
        try:
            out = jax.jit(fn)(qs[0], k, v, bt, seq_ids, positions)
            rec["rel_err"] = err = rel_err(out, ref_out)
            if not err < 2e-2:
                rec["error"] = f"rel_err {err:.3g}"
            else:
                run = jax.jit(lambda qs, k, v, bt, s, p: [fn(q, k, v, bt, s, p) for q in qs])
                t, spread = time_fn(run, (qs, k, v, bt, seq_ids, positions), reps)
                rec.update(time_us=t * 1e6, spread=spread, tflops=flops / t / 1e12)
                rec["device"] = dev = device_time(run, (qs, k, v, bt, seq_ids, positions), reps)
                if "span_us" in dev:
                    rec["device_tflops"] = flops / (dev["span_us"] * 1e-6) / 1e12
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(limit=2)
        rows.append(rec)
        if "time_us" in rec:
            dtxt = (f"| device span {rec['device']['span_us']:7.1f} us "
                    f"{rec['device_tflops']:6.1f} TFLOP/s" if "device_tflops" in rec else "")
            log(f"  prefill {label:36s} {rec['time_us']:8.1f} us {rec['tflops']:6.1f} TFLOP/s"
                f"  err {rec['rel_err']:.1e} {dtxt}")
        else:
            log(f"  prefill {label:44s} FAILED {rec.get('error')}")

    one("xla_reference", functools.partial(paged_attention_reference, scale=D ** -0.5))
    one("ours default", functools.partial(paged_attention, scale=D ** -0.5, interpret=SMOKE))
    if sweep:
        for bm, pages, warps, stages in ((64, 4, 4, 2), (128, 4, 4, 2), (128, 8, 4, 2),
                                         (128, 4, 8, 2), (128, 8, 8, 3), (64, 8, 4, 3),
                                         (256, 4, 8, 2)):
            kw = dict(block_m=bm, pages_per_compute_block=pages, num_warps=warps,
                      num_stages=stages)
            one(f"ours m{bm} p{pages} w{warps} s{stages}",
                functools.partial(paged_attention, scale=D ** -0.5, interpret=SMOKE, **kw))


def gpu_correctness(rows: list):
    """Feature coverage of the compiled kernels (small shapes) against the reference."""
    rng = np.random.default_rng(5)
    cases = [
        # kind, kv heads, group, head_dim, dtype, kwargs
        ("decode", 2, 4, 128, jnp.bfloat16, dict(num_splits=1)),
        ("decode", 2, 4, 128, jnp.bfloat16, dict(num_splits=4)),
        ("decode", 2, 1, 64, jnp.float32, dict(num_splits=2)),
        ("decode", 1, 8, 80, jnp.bfloat16, dict(num_splits=2, sliding_window=40, soft_cap=5.0,
                                                alibi=True)),
        ("decode", 1, 16, 256, jnp.bfloat16, dict(num_splits=2)),
        ("mixed", 2, 4, 128, jnp.bfloat16, dict()),
        ("mixed", 1, 8, 80, jnp.float32, dict(sliding_window=40, soft_cap=5.0, alibi=True)),
        ("mixed", 1, 16, 256, jnp.bfloat16, dict()),
    ]
    for kind, kvh, g, d, dt, kw in cases:
        kw = dict(kw)
        label = f"{kind} kv{kvh} g{g} d{d} {jnp.dtype(dt).name} {kw}"
        rec = {"case": "gpu_correctness", "variant": label}
        try:
            lens = np.array([1, 15, 16, 17, 0, 300, 1000])
            nb = 1 + int(sum(-(-l // BS) for l in lens))
            k = jnp.asarray(rng.standard_normal((kvh, nb, BS, d)), dt)
            v = jnp.asarray(rng.standard_normal((kvh, nb, BS, d)), dt)
            free = rng.permutation(np.arange(1, nb))
            bt = np.zeros((len(lens), 64), np.int32)
            i = 0
            for s_, l in enumerate(lens):
                n = -(-int(l) // BS)
                bt[s_, :n] = free[i:i + n]
                i += n
            bt = jnp.asarray(bt)
            attn = dict(scale=d ** -0.5, sliding_window=kw.pop("sliding_window", None),
                        soft_cap=kw.pop("soft_cap", None))
            if kw.pop("alibi", False):
                attn["alibi_slopes"] = jnp.asarray(rng.uniform(0.01, 0.5, kvh * g), jnp.float32)
            # The reference's fp32 einsums would use TF32 on GPU by default.
            hi = jax.default_matmul_precision("highest")
            if kind == "decode":
                q = jnp.asarray(rng.standard_normal((len(lens), kvh * g, d)), dt)
                sl = jnp.asarray(lens, jnp.int32)
                out = paged_decode_attention(q, k, v, bt, sl, interpret=SMOKE, **attn, **kw)
                with hi:
                    ref = paged_decode_attention_reference(q, k, v, bt, sl, **attn)
            else:
                new = [1, 15, 1, 3, 0, 100, 200]
                sids = np.concatenate([[s_] * n for s_, n in enumerate(new)])
                pos = np.concatenate([np.arange(l - n, l) for l, n in zip(lens, new)])
                order = rng.permutation(len(sids))
                sids = jnp.asarray(sids[order], jnp.int32)
                pos = jnp.asarray(pos[order], jnp.int32)
                q = jnp.asarray(rng.standard_normal((len(sids), kvh * g, d)), dt)
                out = paged_attention(q, k, v, bt, sids, pos, interpret=SMOKE, **attn, **kw)
                with hi:
                    ref = paged_attention_reference(q, k, v, bt, sids, pos, **attn)
            err = rel_err(out, ref)
            tol = 1e-2 if dt == jnp.bfloat16 else 1e-4
            rec.update(rel_err=err, ok=bool(err < tol))
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:600]}")
            traceback.print_exc(limit=3)
        rows.append(rec)
        log(f"  check {label:70s} {'ok' if rec['ok'] else 'FAIL'} err {rec.get('rel_err')}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="also time many kernel variants")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--cases", default="abc", help="decode cases to run (subset of abc)")
    ap.add_argument("--tag", default="", help="suffix of the JSON name (e.g. XLA flags)")
    ap.add_argument("--no-correctness", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes, Pallas interpret mode (checks the script on CPU)")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.cpu_smoke
    env = environment()
    env["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    log(env)
    name = "kernels" + (f"-{args.tag}" if args.tag else "")
    result = {"environment": env, "shape": dict(num_heads=H, num_kv_heads=KVH, head_dim=D,
                                                block_size=BS, dtype="bfloat16")}
    t0 = time.perf_counter()
    copy = copy_bandwidth()
    result["copy_bandwidth"] = copy
    log(f"copy bandwidth: {copy['gb_per_s']:.0f} GB/s (best of {copy['by_method_GBps']})")
    rows: list = []
    result["rows"] = rows
    if not args.no_correctness:
        gpu_correctness(rows)
    if not args.no_correctness:
        result["launch_overhead"] = lo = launch_overhead()
        log("launch overhead:", lo)
    write_result(name, result, args.out)
    try:
        result["best_decode"] = decode_benchmarks(
            copy["gb_per_s"], args.sweep, rows, save=lambda: write_result(name, result, args.out),
            which=args.cases)
    finally:
        path = write_result(name, result, args.out)
    if not args.skip_prefill:
        try:
            prefill_benchmark(rows, args.sweep)
        finally:
            path = write_result(name, result, args.out)
    result["total_s"] = time.perf_counter() - t0
    path = write_result(name, result, args.out)
    log("\n== summary (" + env["device"] + ")")
    for r in rows:
        if r["variant"] in ("xla_reference", "ours default") or r["variant"].startswith(
                "stock_pallas {}") or r["variant"].startswith("stock_pallas default"):
            if "time_us" in r:
                dev = r.get("device", {})
                extra = (f"{100 * r['frac_of_copy']:5.1f}% of copy" if "frac_of_copy" in r
                         else f"{r['tflops']:6.1f} TFLOP/s")
                if "device_tflops" in r:
                    extra += (f" | device span {dev['span_us']:7.1f} us "
                              f"{r['device_tflops']:6.1f} TFLOP/s")
                if "span_us" in dev and "device_frac_of_copy" in r:
                    extra += (f" | device span {dev['span_us']:7.1f} us "
                              f"{100 * r['device_frac_of_copy']:5.1f}% of copy")
                log(f"{r['case']:22s} {r['variant']:22s} wall {r['time_us']:8.1f} us {extra}")
            else:
                log(f"{r['case']:22s} {r['variant']:30s} FAILED")
    for case_name, r in result.get("best_decode", {}).items():
        log(f"best {case_name:17s} {r['variant']:22s} wall {r['time_us']:8.1f} us "
            f"{100 * r['frac_of_copy']:5.1f}% of copy")
    log("wall = host-timed median of queued jitted calls (includes ~5 us/kernel launch cost); "
        "device span = profiler, first kernel start to last kernel end, per call")
    log(f"wrote {path} in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
