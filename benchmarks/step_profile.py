"""Where a batch-1 decode token goes: the engine's decode step timed for several variants
compiled in one process (XLA options, a sampler without run-time conditionals), and a
jax.profiler kernel table per token (GPU busy time, span, gaps, kernels by name).

  python benchmarks/step_profile.py --shape llama3-8b --dtype bf16 --out DIR

Every variant is the same decode bucket compiled again (``Lowered.compile`` with compiler
options, or traced with a patched sampler) and swapped into the running engine, so all
variants share one model, one KV cache and one copy-bandwidth measurement.

Tensor parallel (``--option tensor_parallel_degree=2``): the roofline divides the bytes
over the devices, the kernel table is the first GPU's (collectives listed by name), and
the ``ar_*`` / ``cmdbuf_collectives`` variants try XLA's all-reduce options:

  python benchmarks/step_profile.py --option tensor_parallel_degree=2 \
      --variants default,ar_one_shot,cmdbuf_collectives --profile default,ar_one_shot
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import numpy as np  # noqa: E402

from benchmarks.common import batch1_options, batch1_parser, device_copy_bandwidth, environment, random_engine, write_result  # noqa: E402

# XLA options per variant (``Lowered.compile(compiler_options=...)``).
COMMAND_BUFFERS_ALL = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
VARIANTS = {
    "default": {},
    "no_cmdbuf": {"xla_gpu_enable_command_buffer": ""},
    "cmdbuf_all": {"xla_gpu_enable_command_buffer": COMMAND_BUFFERS_ALL, "xla_gpu_graph_min_graph_size": 1},
    # XLA's Triton GEMM fusions autotune the skinny q/k/v and o GEMVs to split-K, each then
    # ending in a reduction kernel of its own: cuBLAS instead.
    "cublas": {"xla_gpu_enable_triton_gemm": False},
    # Tensor parallel: two all-reduces of [batch, hidden] per layer. XLA's one-shot kernel
    # (each device reads its peers' buffers over NVLink, one launch, no NCCL protocol),
    # synchronous NCCL all-reduces (no async start/done pair), NCCL's symmetric-memory
    # kernels on registered buffers, and command buffers that also capture the collectives.
    # (jaxlib 0.11.2 refuses xla_gpu_allow_all_reduce_kernel and
    # xla_gpu_enable_async_all_reduce as compile options.)
    "ar_one_shot": {"xla_gpu_unsupported_use_all_reduce_one_shot_kernel": True},
    "ar_sync": {"xla_gpu_disable_async_collectives": "ALLREDUCE"},
    "nccl_symmetric": {"xla_gpu_enable_nccl_user_buffers": True,
                       "xla_gpu_experimental_enable_nccl_symmetric_buffers": True},
    # The all-reduce started as early as it can and overlapped with the next weights' loads.
    "ar_overlap": {"xla_gpu_enable_latency_hiding_scheduler": True,
                   "xla_gpu_experimental_collective_start_as_early_as_possible": True},
    "cmdbuf_collectives": {"xla_gpu_enable_command_buffer": COMMAND_BUFFERS_ALL + ",COLLECTIVES",
                           "xla_gpu_graph_min_graph_size": 1},
}
COLLECTIVE_NAMES = ("nccl", "all_reduce", "all-reduce", "allreduce", "all_gather", "all-gather", "collective")


def log(*a):
    print(*a, flush=True)


def plain_sample(logits, prompt_mask, output_counts, slots, params, num_top_logprobs):
    """The sampler with no lax.cond (greedy / temperature only): each cond makes XLA's GPU
    runtime copy its predicate to the host and wait for it."""
    import jax
    import jax.numpy as jnp

    from lmidist_jax.engine.sampler import SampleOutput

    model_logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]

    def row_noise(seed, index):
        return jax.random.gumbel(jax.random.fold_in(jax.random.key(seed), index), (logits.shape[-1],), jnp.float32)

    noise = jax.vmap(row_noise)(params.seeds, params.sample_index)
    sampled = jnp.argmax(logits / temperature + noise, axis=-1)
    tokens = jnp.where(params.temperature > 0, sampled, greedy).astype(jnp.int32)
    lps = jnp.take_along_axis(model_logprobs, tokens[:, None], axis=-1)[:, 0]
    rows = logits.shape[0]
    return SampleOutput(tokens, lps, jnp.zeros((rows, num_top_logprobs), jnp.int32),
                        jnp.zeros((rows, num_top_logprobs), jnp.float32))


def check_fused_kernels(interpret: bool) -> dict:
    """The fused glue kernels against their XLA references on this device, at the
    Llama-3-8B shapes (bf16): max abs error over max abs value."""
    import jax.numpy as jnp

    from pallas_kernels import fused_ops

    rng = np.random.default_rng(0)
    out = {}
    for tokens in (1, 7, 300):
        x, d = (jnp.asarray(rng.normal(size=(tokens, 4096)), jnp.bfloat16) for _ in range(2))
        w = jnp.asarray(rng.normal(size=4096), jnp.bfloat16)
        want = fused_ops.add_rms_norm_reference(x, d, w, eps=1e-5)
        got = fused_ops.add_rms_norm(x, d, w, eps=1e-5, interpret=interpret)
        qkv = jnp.asarray(rng.normal(size=(tokens, 8, 6, 128)), jnp.bfloat16)
        ang = rng.uniform(0, 6.3, size=(tokens, 64))
        cos, sin = jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)
        pages = [jnp.asarray(rng.normal(size=(8, 64, 16, 128)), jnp.bfloat16) for _ in range(2)]
        slots = jnp.asarray(rng.permutation(64 * 16)[:tokens], jnp.int32)
        want_r = fused_ops.rope_write_kv_reference(qkv, cos, sin, *pages, slots)
        got_r = fused_ops.rope_write_kv(qkv, cos, sin, jnp.array(pages[0]), jnp.array(pages[1]), slots,
                                        interpret=interpret)
        errs = {}
        for label, g, w_ in (("sum", got[0], want[0]), ("norm", got[1], want[1]), ("q", got_r[0], want_r[0]),
                             ("k_pages", got_r[1], want_r[1]), ("v_pages", got_r[2], want_r[2])):
            g, w_ = np.asarray(g, np.float32), np.asarray(w_, np.float32)
            errs[label] = float(np.max(np.abs(g - w_)) / max(np.max(np.abs(w_)), 1e-30))
        out[f"tokens={tokens}"] = errs
        log(f"fused kernels vs reference, {tokens} tokens: {errs}")
    return out


def sweep_fused_kernels(calls: int = 32) -> dict:
    """Device time of the fused kernels at one token (Llama-3-8B sizes, bf16) per Triton
    num_warps: a chain of dependent calls under the profiler, us per call."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import fused_ops

    rng = np.random.default_rng(1)
    x, d = (jnp.asarray(rng.normal(size=(1, 4096)), jnp.bfloat16) for _ in range(2))
    w = jnp.asarray(rng.normal(size=4096), jnp.bfloat16)
    qkv = jnp.asarray(rng.normal(size=(1, 8, 6, 128)), jnp.bfloat16)
    cos, sin = jnp.ones((1, 64), jnp.float32), jnp.zeros((1, 64), jnp.float32)
    pages = [jnp.zeros((8, 64, 16, 128), jnp.bfloat16) for _ in range(2)]
    slots = jnp.asarray([17], jnp.int32)
    out = {}
    for warps in (1, 2, 4, 8, 16):
        def norm_chain(x, d, w, warps=warps):
            for _ in range(calls):
                x, d = fused_ops.add_rms_norm(x, d, w, eps=1e-5, num_warps=warps)
            return x, d

        def rope_chain(qkv, k, v, warps=warps):
            for _ in range(calls):
                q, k, v = fused_ops.rope_write_kv(qkv, cos, sin, k, v, slots, num_warps=warps)
                qkv = qkv + q[:, :1, None, :].astype(qkv.dtype)  # a dependency between calls
            return qkv, k, v

        row = {}
        for label, fn, args in (("add_rms_norm", norm_chain, (x, d, w)), ("rope_write_kv", rope_chain, (qkv, *pages))):
            f = jax.jit(fn)
            jax.block_until_ready(f(*args))
            tdir = tempfile.mkdtemp()
            jax.profiler.start_trace(tdir)
            jax.block_until_ready(f(*args))
            jax.profiler.stop_trace()
            table = kernel_table(tdir, calls, top=10)
            row[label] = next((k["us_each"] for k in table.get("kernels", []) if k["name"].startswith(label)), None)
        out[f"num_warps={warps}"] = row
        log(f"fused kernels at one token, num_warps={warps}: {row} us per call")
    return out


def kernel_table(trace_dir: str, num_tokens: int, top: int = 40) -> dict:
    """GPU stream events of one trace, per decode token: busy, span, and kernels by name.
    With several GPUs (tensor parallel) only the first one's: the devices run the same
    program in lockstep, and adding them up would double every figure."""
    import jax

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    pdata = jax.profiler.ProfileData.from_file(files[0])
    per_kernel = collections.defaultdict(lambda: [0, 0])
    host = collections.defaultdict(lambda: [0, 0])
    events = []
    for plane in pdata.planes:
        if plane.name.startswith("/device:GPU:0"):
            for line in plane.lines:
                if not line.name.startswith("Stream"):
                    continue
                for ev in line.events:
                    per_kernel[ev.name][0] += 1
                    per_kernel[ev.name][1] += ev.duration_ns
                    events.append((ev.start_ns, ev.start_ns + ev.duration_ns))
        elif plane.name.startswith("/host"):
            for line in plane.lines:
                for ev in line.events:
                    host[ev.name][0] += 1
                    host[ev.name][1] += ev.duration_ns
    if not events:
        return {"error": "no GPU stream events"}
    events.sort()
    busy = sum(e - s for s, e in events)
    span = events[-1][1] - events[0][0]
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
    collectives = [(k, c, ns) for k, (c, ns) in rows if any(n in k.lower() for n in COLLECTIVE_NAMES)]
    return {
        "collectives_per_token": sum(c for _, c, _ in collectives) / num_tokens,
        "collective_us_per_token": sum(ns for _, _, ns in collectives) / num_tokens / 1e3,
        "collective_kernels": [{"name": k[:120], "per_token": c / num_tokens, "us_each": ns / c / 1e3}
                               for k, c, ns in collectives[:8]],
        "tokens": num_tokens,
        "kernels_per_token": len(events) / num_tokens,
        "busy_us_per_token": busy / num_tokens / 1e3,
        "span_us_per_token": span / num_tokens / 1e3,
        "kernels": [{"name": k[:120], "per_token": c / num_tokens, "us_per_token": ns / num_tokens / 1e3,
                     "us_each": ns / c / 1e3} for k, (c, ns) in rows[:top]],
        "host_top": [{"name": k[:120], "count": c, "ms": ns / 1e6}
                     for k, (c, ns) in sorted(host.items(), key=lambda kv: -kv[1][1])[:25]],
    }


def main():
    parser = batch1_parser(__doc__, "step_profile")
    parser.add_argument("--decode-steps", default="1,8")
    parser.add_argument("--variants", default="default,fused_off")
    parser.add_argument("--profile", default="default",
                        help="variants to profile (decode_steps = the largest)")
    parser.add_argument("--skip-kernel-checks", action="store_true",
                        help="skip the fused kernels' check against their references and num_warps sweep")
    args = parser.parse_args()

    import jax

    from converters.checkpoint import parse_dtype
    from lmidist_jax import SamplingParams, parallel
    from lmidist_jax.engine import model_runner

    on_cpu = jax.devices()[0].platform == "cpu"
    kernel_checks = {} if args.skip_kernel_checks else check_fused_kernels(interpret=on_cpu)
    kernel_sweep = {} if on_cpu or args.skip_kernel_checks else sweep_fused_kernels()
    copies = device_copy_bandwidth(256 << 20, 5) if on_cpu else device_copy_bandwidth()
    steps_list = [int(s) for s in args.decode_steps.split(",")]
    options = batch1_options(args)
    options.setdefault("num_kv_blocks", -(-int(options["max_model_len"]) // 16) + 8)
    options["decode_steps"] = max(steps_list)
    config, spec, model, engine = random_engine(args.shape, options)
    runner = engine.runner
    prompt = list(map(int, np.random.default_rng(0).integers(10, spec.vocab_size - 10, args.input_len)))

    def run_request(decode_steps: int, output_len: int, trace_dir: str | None = None):
        """Per-token decode time of one request (and the engine's host times per step)."""
        runner.decode_steps = decode_steps
        engine.add_request(f"r{time.perf_counter_ns()}", prompt, SamplingParams(max_new_tokens=output_len, ignore_eos=True))
        engine.step()  # the prefill step (first token) is not part of decode
        st = engine.stats
        before = (st.num_steps, st.schedule_time, st.host_time, st.device_time, st.postprocess_time)
        if trace_dir:
            jax.profiler.start_trace(trace_dir)
        times = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                times.extend([time.perf_counter()] * len(out.new_token_ids))
        if trace_dir:
            jax.profiler.stop_trace()
        after = (st.num_steps, st.schedule_time, st.host_time, st.device_time, st.postprocess_time)
        n_steps = max(after[0] - before[0], 1)
        host = {k: 1e3 * (a - b) / n_steps for k, a, b in
                zip(("schedule_ms", "pack_ms", "device_wait_ms", "postprocess_ms"), after[1:], before[1:])}
        return (times[-1] - times[0]) / (len(times) - 1), len(times), host

    key = (1, 1, True)
    for ds in steps_list:  # compile the buckets lazily, as a user's first request does
        run_request(ds, 16)
    base_args = runner._args(runner.dummy_batch(*key), 1)

    def compile_variant(name: str):
        opts = {}
        for part in name.split("+"):
            if part in VARIANTS:
                opts.update(VARIANTS[part])
        parts = name.split("+")
        if "plain_sampler" in parts or "fused_off" in parts:
            # A second runner traces the step again (jit would reuse the first trace) with
            # the sampler patched and/or the fused glue kernels off.
            original, env = model_runner.sample, os.environ.get("LMIDIST_FUSED_OPS")
            if "plain_sampler" in parts:
                model_runner.sample = plain_sample
            if "fused_off" in parts:
                os.environ["LMIDIST_FUSED_OPS"] = "off"
            try:
                other = model_runner.ModelRunner(
                    model, block_size=runner.block_size, num_blocks=runner.num_blocks,
                    max_num_seqs=runner.max_num_seqs, max_num_batched_tokens=runner.max_num_batched_tokens,
                    max_model_len=runner.max_model_len, backend=runner.backend,
                    max_logprobs=runner.num_top_logprobs, decode_steps=runner.decode_steps)
                lowered = other._step.lower(*base_args)
            finally:
                model_runner.sample = original
                if env is None:
                    os.environ.pop("LMIDIST_FUSED_OPS", None)
                else:
                    os.environ["LMIDIST_FUSED_OPS"] = env
        else:
            lowered = runner._step.lower(*base_args)
        t = time.perf_counter()
        exe = lowered.compile(compiler_options=opts) if opts else lowered.compile()
        return exe, time.perf_counter() - t

    results = {}
    for name in args.variants.split(","):
        try:
            exe, compile_s = compile_variant(name)
        except Exception as e:  # noqa: BLE001
            log(f"{name}: compile failed: {type(e).__name__}: {str(e)[:400]}")
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            continue
        runner._compiled[key] = exe
        row = {"compile_s": compile_s, "hlo_collectives": parallel.collective_counts(exe.as_text())}
        if row["hlo_collectives"]:
            log(f"{name}: collectives in the step's HLO: {row['hlo_collectives']}")
        for ds in steps_list:
            runs = [run_request(ds, args.output_len) for _ in range(3)]
            per_token = sorted(r[0] for r in runs)[1]  # median of 3
            row[f"decode_steps={ds}"] = {"ms_per_token": per_token * 1e3, "runs_ms": [r[0] * 1e3 for r in runs],
                                         "host_per_step": runs[1][2]}
            log(f"{name:32s} decode_steps={ds}: {per_token * 1e3:.3f} ms/token (runs "
                f"{', '.join(f'{r[0] * 1e3:.3f}' for r in runs)}); host per step {runs[1][2]}")
        if name in args.profile.split(","):
            d = tempfile.mkdtemp()
            _, n, _ = run_request(max(steps_list), 65, trace_dir=d)
            row["profile"] = kernel_table(d, n)
            p = row["profile"]
            log(f"  profile {name}: {p.get('kernels_per_token', 0):.0f} kernels/token, busy "
                f"{p.get('busy_us_per_token', 0):.0f} us, span {p.get('span_us_per_token', 0):.0f} us per token; "
                f"collectives {p.get('collectives_per_token', 0):.0f}/token, {p.get('collective_us_per_token', 0):.0f} us")
            for k in p.get("kernels", [])[:30]:
                log(f"    {k['us_per_token']:8.1f} us/token {k['per_token']:6.1f}x {k['us_each']:7.2f} us  {k['name']}")
            for k in p.get("host_top", [])[:12]:
                log(f"    host {k['ms']:9.2f} ms {k['count']:7d}x  {k['name']}")
        if name == "default" and args.out:
            with open(os.path.join(args.out, "decode_step_hlo.txt"), "w") as f:
                f.write(exe.as_text())
        results[name] = row
        runner._compiled.pop(key, None)

    itemsize = np.dtype(parse_dtype(args.dtype, {})).itemsize
    weight_bytes = model.num_parameter_bytes - (spec.vocab_size - 1) * spec.hidden_size * itemsize * (
        0 if spec.tie_word_embeddings else 1)
    kv_bytes = 2 * spec.total_kv_heads * spec.head_dim * itemsize * (args.input_len + args.output_len / 2)
    # Each of the TP devices reads its share of the weights and KV at the copy bandwidth.
    tp = config.tensor_parallel_degree
    floor_ms = 1e3 * (weight_bytes + kv_bytes) / (copies["best"] * tp)
    result = {"benchmark": "step_profile", "shape": args.shape, "dtype": args.dtype, "options": options,
              "tensor_parallel_degree": tp,
              "input_len": args.input_len, "output_len": args.output_len,
              "copy_bandwidth_GBps": copies["best"] / 1e9,
              "copy_bandwidth_by_method_GBps": {k: v / 1e9 for k, v in copies.items() if isinstance(v, float)},
              "roofline_ms_per_token": floor_ms, "variants": results, "fused_kernel_checks": kernel_checks,
              "fused_kernel_num_warps_us": kernel_sweep,
              "environment": environment()}
    log(f"roofline {floor_ms:.3f} ms/token at {copies['best'] / 1e9:.0f} GB/s")
    for name, row in results.items():
        for ds in steps_list:
            r = row.get(f"decode_steps={ds}")
            if r:
                log(f"  {name:32s} ds={ds}: {r['ms_per_token']:.3f} ms/token = {100 * floor_ms / r['ms_per_token']:.0f}%")
    path = write_result(args.name, result, args.out)
    log("wrote", path)
    with open(path) as f:
        json.load(f)


if __name__ == "__main__":
    main()
