"""Speculative decoding at batch 1, in one run: does a verify step compute what plain
decode steps compute, and what does it cost?

Random weights (Llama-3-8B shape, bf16 by default), three stages:

* ``baseline``: the target alone, 256 greedy tokens (the reference), and the cost of its
  decode step as the engine runs it.
* ``self``: the target as its own draft. A verify step runs the target's k+1 tokens
  through the decode kernel, as k+1 plain decode steps would: the draft's proposals
  are the plain decode's tokens, so acceptance should be ~1 and the 256 greedy tokens
  identical to the baseline's (on random weights, whose logits are near flat, any
  numerical difference between the two paths shows up as rejections and diverging
  tokens). Measured: acceptance, token identity (first diverging position), the
  target's forward over a verify row of k+1 tokens against one decode token (goal
  <= 1.1x), and where the numbers of the two paths differ: the final hidden state of
  each position (layers), and the logits (LM head) of the same hidden states at 1
  row against k+1 rows.
* ``layer_skip_N``: a cheap draft (the target's first N layers, embeddings and head):
  the cost of a speculative step with k proposals, fed to the speed-up model
  ``speedup = E[tokens per step] x t_decode / t_spec_step``, ``E = (1 - a^(k+1)) / (1 - a)``,
  at a grid of acceptance rates (random weights give this draft no meaningful
  acceptance of its own).

  python benchmarks/spec_decode.py --out benchmarks/results                 # GPU, Llama-3-8B shape
  python benchmarks/spec_decode.py --tiny --out /tmp/spec_bench              # CPU smoke run
  python benchmarks/spec_decode.py --smollm2 --draft-layers 8                 # SmolLM2, CPU: greedy identity

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


def prefilled(engine, prompt, k: int):
    """A sequence of ``prompt`` after its prefill step (its first output token known), with
    blocks for k more tokens: the probe every step cost below runs on."""
    from lmidist_jax import SamplingParams

    engine.add_request("probe", prompt, SamplingParams(max_new_tokens=2 * k + 8, ignore_eos=True))
    engine.step()
    seq = engine.requests["probe"].sequences[0]
    engine.block_manager.allocate(seq.block_ids, seq.num_tokens + k)
    return seq


def runner_step_ms(engine, seq, num_spec_tokens: int, num_steps: int, repeats: int) -> float:
    """The engine's compiled step on the probe: a decode row with ``num_spec_tokens``
    proposals (the draft's loop run ``num_steps`` times)."""
    import jax

    from lmidist_jax.engine.scheduler import ScheduledSequence, SchedulerOutput

    runner = engine.runner
    batch, _ = runner._pack(SchedulerOutput([ScheduledSequence(seq, 1, num_spec_tokens=num_spec_tokens)], []))
    return 1e3 * timed(lambda: jax.block_until_ready(runner._run(batch, num_steps)), repeats)


def verify_against_decode(engine, seq, k: int, repeats: int) -> dict:
    """The target alone on the probe's next k+1 positions: one verify row (k+1 queries
    through the decode kernel, T = a token bucket) against k+1 decode steps of one token
    (T = S = 1). Compares their numbers, then times one of each (forward and logits)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lmidist_jax.models.step_metadata import StepMetadataBuilder

    runner = engine.runner
    model = runner.model
    tokens = np.asarray(seq.token_ids[-1:] + list(range(11, 11 + k)), np.int32)  # known token + k stand-ins
    start = seq.num_computed_tokens

    def metadata(num_tokens, num_seqs, first, count):
        builder = StepMetadataBuilder(num_tokens, num_seqs, runner.max_blocks_per_seq, runner.block_size)
        builder.add_sequence(0, seq.block_ids, first, count)
        return builder.build(decode_only=True, backend=runner.backend)

    @functools.partial(jax.jit, static_argnums=(4,), donate_argnums=(1,))
    def forward(state, kv_caches, input_ids, md, num_rows):
        module = nnx.merge(model.graphdef, state)
        hidden, kv_caches = module(input_ids, kv_caches, md)
        return hidden[:num_rows], module.logits(hidden[:num_rows]), kv_caches

    def cache_copy():
        return jax.tree_util.tree_map(jnp.copy, runner.kv_caches)

    T, S = runner.shapes_for(k + 1, 1, decode_only=False)
    verify_ids = np.zeros(T, np.int32)
    verify_ids[:k + 1] = tokens
    verify_md = metadata(T, S, start, k + 1)
    decode_mds = [metadata(1, 1, start + j, 1) for j in range(k + 1)]
    hidden_v, logits_v, _ = forward(model.state, cache_copy(), verify_ids, verify_md, k + 1)
    kv, hidden_d, logits_d = cache_copy(), [], []
    for j in range(k + 1):  # each step reads the keys the ones before it wrote
        h, lg, kv = forward(model.state, kv, tokens[j:j + 1], decode_mds[j], 1)
        hidden_d.append(h[0])
        logits_d.append(lg[0])
    del kv
    hidden_d, logits_d = jnp.stack(hidden_d), jnp.stack(logits_d)
    head = jax.jit(lambda state, h: nnx.merge(model.graphdef, state).logits(h))
    head_one = jnp.stack([head(model.state, hidden_v[j:j + 1])[0] for j in range(k + 1)])
    top2 = jnp.sort(logits_d, axis=-1)[:, -2:]
    numerics = {
        "argmax_equal": [bool(a) for a in jnp.argmax(logits_v, -1) == jnp.argmax(logits_d, -1)],
        "hidden_bit_equal": bool(jnp.all(hidden_v == hidden_d)),
        "hidden_max_abs_diff": float(jnp.max(jnp.abs(hidden_v.astype(jnp.float32) - hidden_d.astype(jnp.float32)))),
        "logits_max_abs_diff": float(jnp.max(jnp.abs(logits_v - logits_d))),
        # The LM head alone, on the same hidden states: k+1 rows at once against one row.
        "lm_head_rows_vs_one_row_max_abs_diff": float(jnp.max(jnp.abs(head(model.state, hidden_v) - head_one))),
        "top1_minus_top2_logit_median": float(jnp.median(top2[:, 1] - top2[:, 0]))}

    def run(input_ids, md, num_rows):
        _, logits, runner.kv_caches = forward(model.state, runner.kv_caches, input_ids, md, num_rows)
        jax.block_until_ready(logits)

    decode_ms = 1e3 * timed(lambda: run(tokens[:1], decode_mds[0], 1), repeats)
    verify_ms = 1e3 * timed(lambda: run(verify_ids, verify_md, k + 1), repeats)
    return {"target_decode_ms": decode_ms, "target_verify_ms": verify_ms, "verify_tokens": k + 1,
            "verify_bucket_tokens": int(T), "verify_over_decode": verify_ms / decode_ms, "numerics": numerics}


def end_to_end(engine, prompt, output_len: int, runs: int = 2) -> dict:
    """Batch-1 generation, the last of ``runs`` (the first compiles)."""
    from lmidist_jax import SamplingParams

    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    for run in range(runs):
        spec0 = dataclasses.replace(engine.spec_stats) if engine.spec_stats is not None else None
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
                  "token_ids": tokens}
        if spec0 is not None:
            proposed = engine.spec_stats.num_proposed_tokens - spec0.num_proposed_tokens
            accepted = engine.spec_stats.num_accepted_tokens - spec0.num_accepted_tokens
            result.update(proposed=proposed, accepted=accepted, acceptance=accepted / max(proposed, 1))
    return result


def speedup_model(acceptance: float, k: int, decode_ms: float, spec_step_ms: float) -> dict:
    expected = float(k + 1) if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return {"expected_tokens_per_step": expected, "predicted_speedup": expected * decode_ms / spec_step_ms}


def spec_step_costs(engine, seq, k: int, decode_ms: float, repeats: int) -> dict:
    """A speculative step with the draft's loop run 0 and k times, and the speed-up model
    at a grid of acceptance rates."""
    costs = {f"spec_step_{trip}_proposals_ms": runner_step_ms(engine, seq, k, trip, repeats) for trip in (0, k)}
    costs["draft_ms_per_proposal"] = (costs[f"spec_step_{k}_proposals_ms"] - costs["spec_step_0_proposals_ms"]) / k
    costs["model_at_acceptance"] = {str(a): speedup_model(a, k, decode_ms, costs[f"spec_step_{k}_proposals_ms"])
                                    for a in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)}
    return costs


SMOLLM2_PROMPTS = ["The capital of Germany is", "def add(a, b):\n    return", "List three colors: red,",
                   "Once upon a time, in a small village,", "The square root of 16 is"]


def smollm2_check(args) -> None:
    """The real default model with a layer-skip draft of its own first layers: greedy
    tokens identical to the model alone, and the draft's acceptance."""
    import tempfile

    from lmidist_jax import LLM, SamplingParams
    from lmidist_jax.engine.spec_decode import write_layer_skip_draft
    from lmidist_jax.model_store import fetch_model

    model_dir = str(fetch_model("smollm2"))
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
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shape, short lengths")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--k", type=int, default=4, help="speculative_length")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-layer-skip", action="store_true", help="stop after the self-draft stage")
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default="spec_decode")
    args = parser.parse_args()
    if args.smollm2:
        return smollm2_check(args)
    if args.tiny:
        args.shape, args.input_len, args.output_len, args.repeats = "tiny", 16, 48, 3
        args.draft_layers = 1  # of 2

    from converters.checkpoint import parse_dtype
    from lmidist_jax import parallel
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.factory import engine_for_model
    from lmidist_jax.models.families import spec_from_hf_config
    from lmidist_jax.models.loader import random_model

    start = time.perf_counter()
    fields = SHAPES[args.shape]
    spec = spec_from_hf_config(fields)
    dtype = parse_dtype(args.dtype, {})
    max_model_len = args.input_len + args.output_len + 64
    options = dict(dtype=args.dtype, max_rolling_batch_size=1, max_model_len=max_model_len,
                   max_rolling_batch_prefill_tokens=max(16, args.input_len), num_kv_blocks=max_model_len // 16 * 4 + 8)
    result = {"benchmark": "spec_decode", "shape": args.shape, "dtype": args.dtype, "input_len": args.input_len,
              "output_len": args.output_len, "speculative_length": args.k, "draft_layers": args.draft_layers,
              "options": options, "weights": "random", "environment": environment(), "stages": {}}
    k = args.k

    def save(stage):
        result["environment"] = environment()
        result["seconds"] = time.perf_counter() - start
        path = write_result(args.name, result, args.out)
        print(f"[{stage}, {result['seconds']:.0f} s] wrote {path}", flush=True)

    target = random_model(spec, dtype=dtype, mesh=parallel.make_mesh(1), max_model_len=max_model_len)
    prompt = list(map(int, np.random.default_rng(0).integers(10, spec.vocab_size - 10, args.input_len)))

    def engine(draft=None):
        extra = {} if draft is None else dict(speculative_draft_model="(in memory)", speculative_length=k)
        return engine_for_model(target, None, config_from_kwargs(None, **options, **extra),
                                max_model_len=max_model_len, warmup=False, progress=False, draft=draft)

    # 1. The target alone: the reference tokens and the plain decode step.
    plain = engine()
    result["stages"]["baseline"] = base = end_to_end(plain, prompt, args.output_len)
    base["decode_step_ms"] = decode_ms = runner_step_ms(plain, prefilled(plain, prompt, k), 0, 1, args.repeats)
    print(f"baseline: {base['tokens_per_s']:.1f} tok/s, decode step {decode_ms:.2f} ms", flush=True)
    save("baseline")
    del plain
    gc.collect()

    # 2. The target as its own draft: acceptance, identity, verify vs decode.
    selfdraft = engine(draft=target)
    stage = end_to_end(selfdraft, prompt, args.output_len)
    ours, ref = stage["token_ids"], base["token_ids"]
    stage["identical_to_baseline"] = ours == ref
    stage["first_divergence"] = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    stage["speedup"] = stage["tokens_per_s"] / base["tokens_per_s"]
    seq = prefilled(selfdraft, prompt, k)
    stage["verify"] = verify = verify_against_decode(selfdraft, seq, k, args.repeats)
    stage["step_costs"] = spec_step_costs(selfdraft, seq, k, decode_ms, args.repeats)
    stage["model"] = speedup_model(stage["acceptance"], k, decode_ms,
                                   stage["step_costs"][f"spec_step_{k}_proposals_ms"])
    result["stages"]["self"] = stage
    print(f"self: acceptance {stage['acceptance']:.3f}, identical to plain decode over {len(ref)} tokens: "
          f"{stage['identical_to_baseline']} (first divergence {stage['first_divergence']}); target verify of "
          f"{k + 1} tokens / decode step {verify['verify_over_decode']:.2f}x (goal <= 1.1); numerics "
          f"{verify['numerics']}", flush=True)
    save("self")
    del selfdraft
    gc.collect()

    # 3. A cheap draft: the speculative step's cost, and the speed-up model.
    if args.skip_layer_skip:
        return
    name = f"layer_skip_{args.draft_layers}"
    skip = engine(draft=layer_skip_draft(target, fields, args.draft_layers, dtype, max_model_len))
    result["stages"][name] = costs = spec_step_costs(skip, prefilled(skip, prompt, k), k, decode_ms, args.repeats)
    print(f"{name}: draft {costs['draft_ms_per_proposal']:.2f} ms/proposal, speculative step "
          f"{costs[f'spec_step_{k}_proposals_ms']:.2f} ms; predicted speed-up at acceptance 0.8: "
          f"{costs['model_at_acceptance']['0.8']['predicted_speedup']:.2f}x", flush=True)
    save(name)


if __name__ == "__main__":
    main()
