"""The CPU path users run, against transformers in the same process (issue 10's goals).

  python benchmarks/cpu_path.py                      # the default model, fp32, default options
  python benchmarks/cpu_path.py --repeats 3 --prefill-len 8000

Measured in one run, with ``LLM()`` at its default options (max_model_len from the model:
8192 for SmolLM2-135M) unless a row says otherwise:

1. throughput: N requests x (input-len in, output-len out) greedy, EOS ignored, against
   transformers' batched ``generate`` (one left-padded batch);
2. decode of one short prompt: seconds per output token at default options and with
   ``max_model_len=64`` (cost must follow the context, not max_model_len);
3. prefill: one prompt of prefill-len tokens (1 output token) against transformers'
   forward pass over the same tokens.

Each timing is repeated ``--repeats`` times after a warm-up call that compiles the buckets
it uses (the min is reported, every repeat is recorded); the machine's load average is
recorded beside each phase (this 2-core machine is shared).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import write_result  # noqa: E402


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def hf_side(model_dir, prompts, output_len, long_prompt, repeats):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    result = {"load_before": load_average()}
    with torch.no_grad():
        model.generate(ids[:, :8], attention_mask=mask[:, :8], do_sample=False, max_new_tokens=4, pad_token_id=pad)
        outs = []

        def generate():
            outs.append(model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len,
                                       min_new_tokens=output_len, pad_token_id=pad))

        result["generate_seconds"] = timed(generate, repeats)
        result["generate_tokens"] = outs[-1][:, width:].tolist()
        long_ids = torch.tensor([long_prompt])
        model(long_ids[:, :256])
        result["prefill_seconds"] = timed(lambda: model(long_ids), repeats)
    result["load_after"] = load_average()
    model = None  # freed before JAX runs
    gc.collect()
    return result


def ours_throughput_and_prefill(prompts, output_len, long_prompt, repeats, options):
    from lmidist_jax import LLM, SamplingParams

    llm = LLM(progress=False, **options)
    result = {"load_before": load_average(), "options": options,
              "max_model_len": llm.engine.max_model_len,
              "prefill_tokens_per_step": llm.engine.runner.max_num_batched_tokens}
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    # Warm-up: the same batch shape compiles the buckets the timed runs use.
    llm.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True), use_tqdm=False)
    outs = []
    result["generate_seconds"] = timed(lambda: outs.append(llm.generate(prompts, params, use_tqdm=False)), repeats)
    result["generate_tokens"] = [o.token_ids for o in outs[-1]]
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    llm.generate([long_prompt[:llm.engine.runner.max_num_batched_tokens]], one, use_tqdm=False)
    result["prefill_seconds"] = timed(lambda: llm.generate([long_prompt], one, use_tqdm=False), repeats)
    result["decode"] = short_prompt_decode(llm, repeats)
    result["load_after"] = load_average()
    result["lazily_compiled_buckets"] = sorted(map(list, llm.engine.runner.lazily_compiled))
    return result


def short_prompt_decode(llm, repeats, prompt_len=8, tokens=32):
    """Seconds per output token of one short prompt: (time for 1 + tokens outputs - time
    for 1 output) / tokens, so the prefill step is not counted."""
    from lmidist_jax import SamplingParams

    prompt = list(range(100, 100 + prompt_len))
    first = SamplingParams(max_new_tokens=1, ignore_eos=True)
    full = SamplingParams(max_new_tokens=1 + tokens, ignore_eos=True)
    llm.generate([prompt], full, use_tqdm=False)  # compiles the prefill and batch-1 decode buckets
    prefill = timed(lambda: llm.generate([prompt], first, use_tqdm=False), repeats)
    total = timed(lambda: llm.generate([prompt], full, use_tqdm=False), repeats)
    return {"prompt_len": prompt_len, "tokens": tokens, "prefill_seconds": prefill, "total_seconds": total,
            "seconds_per_token": (min(total) - min(prefill)) / tokens}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--prefill-len", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="engine option for the default-options rows (e.g. to compare budgets)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tag", default=None, help="suffix of the result file name")
    args = parser.parse_args()

    from lmidist_jax.model_store import resolve_model
    import json

    model_dir = str(resolve_model(args.model))
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(10, vocab - 10, args.input_len))) for _ in range(args.num_requests)]
    long_prompt = list(map(int, rng.integers(10, vocab - 10, args.prefill_len)))
    options = dict(o.split("=", 1) for o in args.option)
    options["dtype"] = "fp32"
    options.setdefault("model_id", model_dir)

    hf = hf_side(model_dir, prompts, args.output_len, long_prompt, args.repeats)
    print(f"transformers: generate {min(hf['generate_seconds']):.2f} s, prefill {min(hf['prefill_seconds']):.2f} s",
          flush=True)
    ours = ours_throughput_and_prefill(prompts, args.output_len, long_prompt, args.repeats, options)
    gc.collect()
    from lmidist_jax import LLM

    short = LLM(model_dir, dtype="fp32", max_model_len=64, progress=False)
    ours64 = {"load_before": load_average(), "decode": short_prompt_decode(short, args.repeats)}
    ours64["load_after"] = load_average()
    del short

    n_out = args.num_requests * args.output_len
    same = sum(a == b for a, b in zip(ours.pop("generate_tokens"), hf.pop("generate_tokens")))
    summary = {
        "throughput_tokens_per_s": {"ours": n_out / min(ours["generate_seconds"]),
                                    "hf": n_out / min(hf["generate_seconds"])},
        "throughput_ratio": min(hf["generate_seconds"]) / min(ours["generate_seconds"]),
        "identical_outputs": f"{same}/{args.num_requests}",
        "decode_seconds_per_token": {"default": ours["decode"]["seconds_per_token"],
                                     "max_model_len_64": ours64["decode"]["seconds_per_token"]},
        "decode_ratio_default_vs_64": ours["decode"]["seconds_per_token"] / ours64["decode"]["seconds_per_token"],
        "prefill_seconds": {"ours": min(ours["prefill_seconds"]), "hf_forward": min(hf["prefill_seconds"])},
        "prefill_ratio": min(ours["prefill_seconds"]) / min(hf["prefill_seconds"]),
        "goals": {"throughput_ratio": ">= 1", "decode_ratio_default_vs_64": "<= 1.5", "prefill_ratio": "<= 2"},
    }
    for k, v in summary.items():
        print(f"{k}: {v}")
    result = {"benchmark": "cpu_path", "model": args.model, "dtype": "fp32", "num_requests": args.num_requests,
              "input_len": args.input_len, "output_len": args.output_len, "prefill_len": args.prefill_len,
              "repeats": args.repeats, "summary": summary, "hf": hf, "ours_default": ours,
              "ours_max_model_len_64": ours64}
    print("wrote", write_result("cpu_path" + (f"-{args.tag}" if args.tag else ""), result, args.out))


if __name__ == "__main__":
    main()
