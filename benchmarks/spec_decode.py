"""Speculative decoding at batch 1: the verify step's cost against a plain decode step,
the draft's cost per proposal, and end-to-end tokens/s without a draft, with the target
as its own draft (acceptance 1: the upper bound) and with a layer-skip draft (the
target's first ``--draft-layers`` layers, its embeddings and head).

Random weights (Llama-3-8B shape by default), so the layer-skip draft's acceptance is
that of random weights, not of a trained model: the speed-up model
``speedup = E[tokens per step] x t_decode / t_spec_step`` with
``E = (1 - a^(k+1)) / (1 - a)`` is written beside the measurements so that other
acceptance rates can be read off it.

  python benchmarks/spec_decode.py --out benchmarks/results                # H200, ~6 min
  python benchmarks/spec_decode.py --tiny --out /tmp/spec_bench             # CPU smoke run
  python benchmarks/spec_decode.py --smollm2 --draft-layers 8                # SmolLM2, CPU: greedy identity

A JSON file is (re)written after every stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import numpy as np  # noqa: E402

from benchmarks.common import SHAPES, environment, write_result  # noqa: E402


def layer_skip_draft(target, spec_fields: dict, num_layers: int, dtype, max_model_len: int):
    """A draft with the target's first ``num_layers`` layers, embeddings, final norm and
    head (the same arrays, not copies)."""
    from lmidist_jax.models.families import spec_from_hf_config
    from lmidist_jax.models.loader import LoadedModel, abstract_model, variables

    spec = spec_from_hf_config({**spec_fields, "num_hidden_layers": num_layers})
    graphdef, state = abstract_model(spec, dtype, max_model_len, target.mesh)
    source = variables(target.state)
    for path, var in variables(state).items():  # the target's layers past num_layers are left out
        var.set_value(source[path][...])
    return LoadedModel(spec, graphdef, state, target.dtype, target.mesh)


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (which blocks until the device is done)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def step_costs(engine, prompt, k: int, repeats: int) -> dict:
    """Per-step device costs on one real sequence after its prefill: a 1-token decode step,
    a (k+1)-token verify step of the target alone, and the speculative step with the
    draft's loop run 0 and k times (the difference is k proposals)."""
    import jax

    from lmidist_jax import SamplingParams
    from lmidist_jax.engine.model_runner import StepBatchBuilder
    from lmidist_jax.engine.scheduler import ScheduledSequence, SchedulerOutput

    engine.add_request("probe", prompt, SamplingParams(max_new_tokens=2 * k + 8, ignore_eos=True))
    engine.step()  # the prefill: the sequence now has its first output token to decode from
    seq = engine.requests["probe"].sequences[0]
    bm, runner = engine.block_manager, engine.runner
    bm.allocate(seq.block_ids, seq.num_tokens + k)

    def target_batch(num_tokens, decode_only):
        T, S = runner.shapes_for(num_tokens, 1, decode_only)
        builder = StepBatchBuilder(runner, T, S)
        builder.add(0, seq, num_tokens)
        return builder.build(decode_only)

    decode, verify = target_batch(1, True), target_batch(k + 1, False)
    costs = {"decode_step_ms": 1e3 * timed(lambda: jax.block_until_ready(runner._run(decode)), repeats),
             "verify_step_ms": 1e3 * timed(lambda: jax.block_until_ready(runner._run(verify)), repeats),
             "verify_bucket_tokens": int(verify.input_ids.shape[0])}
    spec_runner = engine.spec_runner
    sched = SchedulerOutput([ScheduledSequence(seq, 1)], [])
    batch, spec, _, _ = spec_runner._pack(sched, [k])
    for trip in (0, k):
        costs[f"spec_step_{trip}_proposals_ms"] = 1e3 * timed(
            lambda: jax.block_until_ready(spec_runner._run(batch, spec, trip)), repeats)
    costs["draft_ms_per_proposal"] = (costs[f"spec_step_{k}_proposals_ms"] - costs["spec_step_0_proposals_ms"]) / k
    costs["verify_over_decode"] = costs["verify_step_ms"] / costs["decode_step_ms"]
    engine.abort("probe")
    return costs


def end_to_end(engine, prompt, output_len: int, runs: int = 2) -> dict:
    """Batch-1 generation, the last of ``runs`` (the first compiles)."""
    from lmidist_jax import SamplingParams

    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    for run in range(runs):
        spec0 = dataclasses.replace(engine.spec_stats) if hasattr(engine, "spec_stats") else None
        steps0 = engine.stats.num_steps
        engine.add_request(f"e2e{run}", prompt, params)
        t0 = time.perf_counter()
        times, tokens = [], []
        while engine.has_unfinished_requests():
            for out in engine.step():
                times.append(time.perf_counter())
                tokens.extend(out.new_token_ids)
        elapsed = times[-1] - times[0]  # from the first token (the prefill's) to the last
        result = {"tokens": len(tokens), "ttft_s": times[0] - t0, "decode_s": elapsed,
                  "tokens_per_s": (len(tokens) - 1) / elapsed, "engine_steps": engine.stats.num_steps - steps0,
                  "first_tokens": tokens[:16]}
        if spec0 is not None:
            proposed = engine.spec_stats.num_proposed_tokens - spec0.num_proposed_tokens
            accepted = engine.spec_stats.num_accepted_tokens - spec0.num_accepted_tokens
            result.update(proposed=proposed, accepted=accepted, acceptance=accepted / max(proposed, 1))
    return result


def speedup_model(acceptance: float, k: int, decode_ms: float, spec_step_ms: float) -> dict:
    expected = float(k + 1) if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return {"expected_tokens_per_step": expected, "predicted_speedup": expected * decode_ms / spec_step_ms}


SMOLLM2_PROMPTS = ["The capital of Germany is", "def add(a, b):\n    return", "List three colors: red,",
                   "Once upon a time, in a small village,", "The square root of 16 is"]


def smollm2_check(args) -> None:
    """The real default model with a layer-skip draft of its own first layers: greedy
    tokens identical to the model alone, and the draft's acceptance."""
    from lmidist_jax import LLM, SamplingParams
    from lmidist_jax.engine.spec_decode import write_layer_skip_draft
    from lmidist_jax.model_store import fetch_model

    model_dir = str(fetch_model("smollm2"))
    import tempfile

    draft_dir = write_layer_skip_draft(model_dir, tempfile.mkdtemp(prefix="smollm2-skip-"), args.draft_layers)
    options = dict(max_model_len=256, max_rolling_batch_size=8, max_rolling_batch_prefill_tokens=64, progress=False)
    params = SamplingParams(max_new_tokens=32)
    t = time.perf_counter()
    alone = [o.token_ids for o in LLM(model_dir, **options).generate(SMOLLM2_PROMPTS, params, use_tqdm=False)]
    alone_s = time.perf_counter() - t
    t = time.perf_counter()
    llm = LLM(model_dir, speculative_draft_model=draft_dir, speculative_length=args.k, **options)
    outs = llm.generate(SMOLLM2_PROMPTS, params, use_tqdm=False)
    spec = llm.engine.spec_stats
    result = {"benchmark": "spec_decode_smollm2", "draft_layers": args.draft_layers, "speculative_length": args.k,
              "prompts": SMOLLM2_PROMPTS, "max_new_tokens": 32, "options": options,
              "token_identical": [o.token_ids for o in outs] == alone,
              "proposed": spec.num_proposed_tokens, "accepted": spec.num_accepted_tokens,
              "acceptance": spec.num_accepted_tokens / max(spec.num_proposed_tokens, 1),
              "records": [o.spec_decode for o in outs],
              "seconds_alone_incl_compile": alone_s, "seconds_with_draft_incl_compile": time.perf_counter() - t}
    print(f"token-identical: {result['token_identical']}, acceptance {result['acceptance']:.3f}")
    print("wrote", write_result("spec_decode-smollm2", result, args.out))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true",
                        help="instead: SmolLM2-135M with a layer-skip draft, greedy identity and acceptance")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shape, short lengths, fp32")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--k", type=int, default=4, help="speculative_length")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default="spec_decode")
    args = parser.parse_args()
    if args.smollm2:
        return smollm2_check(args)
    if args.tiny:
        args.shape, args.dtype, args.input_len, args.output_len, args.repeats = "tiny", "fp32", 16, 24, 3
        args.draft_layers = 1  # of 2

    from converters.checkpoint import parse_dtype
    from lmidist_jax import parallel
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.factory import engine_for_model
    from lmidist_jax.models.families import spec_from_hf_config
    from lmidist_jax.models.loader import random_model

    fields = SHAPES[args.shape]
    spec = spec_from_hf_config(fields)
    dtype = parse_dtype(args.dtype, {})
    max_model_len = args.input_len + args.output_len + 64
    options = dict(dtype=args.dtype, max_rolling_batch_size=1, max_model_len=max_model_len,
                   max_rolling_batch_prefill_tokens=max(16, args.input_len), num_kv_blocks=max_model_len // 16 * 4 + 8)
    result = {"benchmark": "spec_decode", "shape": args.shape, "dtype": args.dtype, "input_len": args.input_len,
              "output_len": args.output_len, "speculative_length": args.k, "draft_layers": args.draft_layers,
              "options": options, "weights": "random", "environment": environment(), "stages": {}}

    def save(stage):
        result["environment"] = environment()
        path = write_result(args.name, result, args.out)
        print(f"[{stage}] wrote {path}", flush=True)

    t = time.perf_counter()
    target = random_model(spec, dtype=dtype, mesh=parallel.make_mesh(1), max_model_len=max_model_len)
    result["target_load_s"] = time.perf_counter() - t
    prompt = list(map(int, np.random.default_rng(0).integers(10, spec.vocab_size - 10, args.input_len)))

    # 1. The target alone.
    config = config_from_kwargs(None, **options)
    engine = engine_for_model(target, None, config, max_model_len=max_model_len, warmup=False, progress=False)
    result["stages"]["baseline"] = base = end_to_end(engine, prompt, args.output_len)
    print(f"baseline: {base['tokens_per_s']:.1f} tok/s", flush=True)
    save("baseline")
    del engine
    gc.collect()

    drafts = {"self": lambda: target,
              f"layer_skip_{args.draft_layers}": lambda: layer_skip_draft(target, fields, args.draft_layers,
                                                                         dtype, max_model_len)}
    spec_options = dict(options, speculative_draft_model="(in memory)", speculative_length=args.k)
    for name, make_draft in drafts.items():
        draft = make_draft()
        config = config_from_kwargs(None, **spec_options)
        engine = engine_for_model(target, None, config, max_model_len=max_model_len, warmup=False,
                                  progress=False, draft=draft)
        stage = end_to_end(engine, prompt, args.output_len)
        stage["speedup"] = stage["tokens_per_s"] / base["tokens_per_s"]
        stage["step_costs"] = costs = step_costs(engine, prompt, args.k, args.repeats)
        stage["model"] = speedup_model(stage["acceptance"], args.k, costs["decode_step_ms"],
                                       costs[f"spec_step_{args.k}_proposals_ms"])
        stage["model_at_acceptance"] = {
            str(a): speedup_model(a, args.k, costs["decode_step_ms"], costs[f"spec_step_{args.k}_proposals_ms"])
            for a in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)}
        result["stages"][name] = stage
        print(f"{name}: {stage['tokens_per_s']:.1f} tok/s ({stage['speedup']:.2f}x), acceptance "
              f"{stage['acceptance']:.2f}; verify/decode {costs['verify_over_decode']:.2f}x, draft "
              f"{costs['draft_ms_per_proposal']:.2f} ms/proposal", flush=True)
        save(name)
        del engine, draft
        gc.collect()


if __name__ == "__main__":
    main()
