"""The CPU path users run, against transformers in the same process (issues 10 and 28).

  python benchmarks/cpu_path.py                          # the default model, fp32, default options
  python benchmarks/cpu_path.py --phases prefill,ttft --prefill-lens 4000,8000 --repeats 3
  python benchmarks/cpu_path.py --phases chunks --chunks 256,512,1024,2048   # the prefill-chunk sweep

Phases (``--phases``, comma-separated; default ``throughput,decode,prefill,ttft``), each with
``LLM()`` at its default options (max_model_len from the model: 8192 for SmolLM2-135M)
unless a row says otherwise:

* throughput: N requests x (input-len in, output-len out) greedy, EOS ignored, against
  transformers' batched ``generate`` (one left-padded batch);
* decode: one short prompt, seconds per output token at default options and with
  ``max_model_len=64`` (cost must follow the context, not max_model_len);
* prefill: one prompt of each of ``--prefill-lens`` tokens (1 output token) against
  transformers' forward pass over the same tokens (with a thread per core and with one
  thread: the faster is the reference); the sides alternate, prompt by prompt,
  ``--repeats`` times after a warm-up of each (medians are compared);
* ttft: the engine loop the server runs, a ``--ttft-long``-token prompt, then
  ``--ttft-delay`` s later a ``--ttft-short``-token request: its time to first token
  beside the long prefill, the step in flight when it arrived and its own step, the long
  prompt's steps; and the short request alone;
* chunks: for each ``--chunks`` prefill budget (``max_rolling_batch_prefill_tokens``), the
  long prompt's prefill time (throughput) and the ttft scenario (the others' wait), to
  choose the CPU's default budget.

The machine's load average is recorded beside each phase (this 2-core machine is shared:
read the times together with it).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import write_result  # noqa: E402

PHASES = ("throughput", "decode", "prefill", "ttft", "chunks")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def load_hf(model_dir):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_generate(model, prompts, output_len, repeats):
    import torch

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
    result["load_after"] = load_average()
    return result


def ours_generate(llm, prompts, output_len, repeats):
    from lmidist_jax import SamplingParams

    result = {"load_before": load_average()}
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    # Warm-up: the same batch shape compiles the buckets the timed runs use.
    llm.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True), use_tqdm=False)
    outs = []
    result["generate_seconds"] = timed(lambda: outs.append(llm.generate(prompts, params, use_tqdm=False)), repeats)
    result["generate_tokens"] = [o.token_ids for o in outs[-1]]
    result["load_after"] = load_average()
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
            "seconds_per_token": (min(total) - min(prefill)) / tokens, "load": load_average()}


class StepRecorder:
    """Wraps an engine's scheduler and step: each step's wall-clock span and the tokens it
    gave each request (the engine thread calls them; the lists are read afterwards)."""

    def __init__(self, engine):
        self.engine = engine
        self.steps: list[dict] = []
        self._schedule, self._step = engine.scheduler.schedule, engine.step

        def schedule():
            out = self._schedule()
            self.steps[-1]["tokens"] = {item.seq.request.request_id: item.num_new_tokens for item in out.scheduled}
            return out

        def step():
            self.steps.append({"start": time.perf_counter(), "tokens": {}})
            try:
                return self._step()
            finally:
                self.steps[-1]["end"] = time.perf_counter()

        engine.scheduler.schedule, engine.step = schedule, step

    def close(self) -> None:
        self.engine.scheduler.schedule, self.engine.step = self._schedule, self._step


def first_token_time(stream) -> float:
    """Consumes a request's stream; returns when its first token arrived."""
    first = None
    for out in stream:
        if first is None and out.new_token_ids:
            first = time.perf_counter()
    return first


def short_beside_long(llm, long_prompt, short_prompt, delay: float) -> dict:
    """The server's engine loop: the long prompt, then ``delay`` s later the short one.
    Times to first token, and the steps around the short request's arrival."""
    from lmidist_jax import SamplingParams
    from lmidist_jax.engine.engine_loop import EngineLoop

    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    # Warm: the short prompt's bucket and a full-budget step (every step of the long prompt).
    llm.generate([short_prompt, long_prompt[:llm.engine.runner.max_num_batched_tokens]], one, use_tqdm=False)
    llm.generate([short_prompt], one, use_tqdm=False)
    recorder = StepRecorder(llm.engine)
    loop = EngineLoop(llm.engine)
    try:
        t = time.perf_counter()
        alone = first_token_time(loop.submit("short-alone", short_prompt, one)) - t
        recorder.steps.clear()
        long_start = time.perf_counter()
        long_stream = loop.submit("long", long_prompt, one)
        long_result = {}
        reader = threading.Thread(target=lambda: long_result.update(first=first_token_time(long_stream)))
        reader.start()
        time.sleep(delay)
        short_sent = time.perf_counter()
        short_stream = loop.submit("short", short_prompt, one)
        short_first = first_token_time(short_stream)
        reader.join()
    finally:
        loop.shutdown()
        recorder.close()
    steps = recorder.steps
    rel = [{"start": round(s["start"] - long_start, 3), "seconds": round(s["end"] - s["start"], 3),
            "tokens": s["tokens"]} for s in steps]
    in_flight = [s for s in steps if s["start"] <= short_sent < s["end"]]
    own = next(s for s in steps if "short" in s["tokens"])
    long_steps = [s["end"] - s["start"] for s in steps if "long" in s["tokens"]]
    return {
        "long_len": len(long_prompt), "short_len": len(short_prompt), "delay": delay,
        "short_ttft_alone": alone,
        "short_ttft": short_first - short_sent,
        "short_steps_to_first_token": short_stream.steps_to_first_token,
        "in_flight_step_seconds": in_flight[0]["end"] - in_flight[0]["start"] if in_flight else 0.0,
        "own_step_seconds": own["end"] - own["start"],
        "long_ttft": long_result["first"] - long_start,
        "long_chunk_steps": len(long_steps),
        "long_step_seconds_median": statistics.median(long_steps),
        "steps": rel, "load": load_average(),
    }


def prefill_interleaved(hf_model, llm, long_prompt, lens, repeats) -> dict:
    """Transformers' forward and our prefill (1 output token) of the same tokens, one
    after the other for each length, ``repeats`` times after a warm-up of each.
    Transformers runs twice each time: with a thread per core (its default) and with one
    thread, since on a loaded machine its threads' synchronisation can cost more than the
    second core gives; the faster of the two medians is the reference. Wall-clock and
    process CPU seconds are recorded."""
    import torch

    from lmidist_jax import SamplingParams

    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    cores = os.cpu_count() or 1
    sides = ("hf_forward", "hf_forward_1_thread", "ours")
    rows = {n: {**{f"{side}_seconds": [] for side in sides}, **{f"{side}_cpu_seconds": [] for side in sides},
                "load": []} for n in lens}

    def run(row, side, fn):
        c, t = time.process_time(), time.perf_counter()
        fn()
        row[f"{side}_seconds"].append(time.perf_counter() - t)
        row[f"{side}_cpu_seconds"].append(time.process_time() - c)

    with torch.no_grad():
        hf_model(torch.tensor([long_prompt[:256]]))
        for n in lens:  # warm: our buckets compiled, torch's allocator primed
            llm.generate([long_prompt[:n]], one, use_tqdm=False)
            hf_model(torch.tensor([long_prompt[:n]]))
        for _ in range(repeats):
            for n in lens:
                ids = torch.tensor([long_prompt[:n]])
                row = rows[n]
                torch.set_num_threads(cores)
                run(row, "hf_forward", lambda: hf_model(ids))
                torch.set_num_threads(1)
                run(row, "hf_forward_1_thread", lambda: hf_model(ids))
                torch.set_num_threads(cores)
                run(row, "ours", lambda: llm.generate([long_prompt[:n]], one, use_tqdm=False))
                row["load"].append(load_average())
    for row in rows.values():
        for side in sides:
            row[f"{side}_median"] = statistics.median(row[f"{side}_seconds"])
        row["hf_best_median"] = min(row["hf_forward_median"], row["hf_forward_1_thread_median"])
        row["ratio"] = row["ours_median"] / row["hf_best_median"]
        row["ratio_vs_hf_default_threads"] = row["ours_median"] / row["hf_forward_median"]
        row["cpu_seconds_ratio_vs_1_thread"] = (statistics.median(row["ours_cpu_seconds"])
                                                / statistics.median(row["hf_forward_1_thread_cpu_seconds"]))
    return rows


def chunk_sweep(chunks, long_prompt, short_prompt, delay, repeats, options) -> dict:
    """Per prefill budget: the long prompt's prefill seconds and the ttft scenario. One
    engine per budget (each with a 0.5 GiB KV cache), measured round-robin so that every
    budget sees the same machine load."""
    from lmidist_jax import LLM, SamplingParams

    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    engines = {}
    for chunk in chunks:  # 0.5 GiB of KV cache each: one max_model_len sequence of SmolLM2 (8192) and more
        engines[chunk] = LLM(progress=False, **{"kv_cache_memory_gb": 0.5, **options,
                                                "max_rolling_batch_prefill_tokens": chunk})
        engines[chunk].generate([long_prompt], one, use_tqdm=False)  # compiles the buckets it uses
    seconds = {chunk: [] for chunk in chunks}
    scenarios = {chunk: [] for chunk in chunks}
    for _ in range(repeats):
        for chunk, llm in engines.items():
            seconds[chunk] += timed(lambda: llm.generate([long_prompt], one, use_tqdm=False), 1)
        for chunk, llm in engines.items():
            scenario = short_beside_long(llm, long_prompt, short_prompt, delay)
            scenario.pop("steps")
            scenarios[chunk].append(scenario)
        print(f"repeat done, load {load_average()}", flush=True)
    result = {}
    for chunk in chunks:
        runs = scenarios[chunk]
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("short_ttft", "in_flight_step_seconds", "own_step_seconds", "long_ttft",
                         "long_step_seconds_median")}
        result[str(chunk)] = {"prefill_seconds": seconds[chunk], "prefill_median": statistics.median(seconds[chunk]),
                              "prefill_tokens_per_s": len(long_prompt) / statistics.median(seconds[chunk]),
                              "scenario_median": med, "scenarios": runs}
        print(f"chunk {chunk}: prefill {result[str(chunk)]['prefill_median']:.2f} s, short ttft "
              f"{med['short_ttft']:.2f} s (in flight {med['in_flight_step_seconds']:.2f} + own "
              f"{med['own_step_seconds']:.2f}), long step {med['long_step_seconds_median']:.2f} s", flush=True)
    for llm in engines.values():
        llm.shutdown()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--phases", default="throughput,decode,prefill,ttft",
                        help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--prefill-lens", default="4000,8000")
    parser.add_argument("--ttft-long", type=int, default=6000)
    parser.add_argument("--ttft-short", type=int, default=5)
    parser.add_argument("--ttft-delay", type=float, default=2.0)
    parser.add_argument("--chunks", default="256,512,1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="engine option for the default-options engine (e.g. to compare budgets)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tag", default=None, help="suffix of the result file name")
    args = parser.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}; expected some of {', '.join(PHASES)}")

    import json

    from lmidist_jax import LLM
    from lmidist_jax.model_store import resolve_model

    model_dir = str(resolve_model(args.model))
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(10, vocab - 10, args.input_len))) for _ in range(args.num_requests)]
    lens = [int(n) for n in args.prefill_lens.split(",") if n]
    long_prompt = list(map(int, rng.integers(10, vocab - 10, max(lens + [args.ttft_long]))))
    short_prompt = list(map(int, rng.integers(10, vocab - 10, args.ttft_short)))
    options = dict(o.split("=", 1) for o in args.option)
    options["dtype"] = "fp32"
    options.setdefault("model_id", model_dir)

    result = {"benchmark": "cpu_path", "model": args.model, "dtype": "fp32", "phases": phases,
              "repeats": args.repeats, "options": options}
    summary = {}
    hf_model = load_hf(model_dir) if {"throughput", "prefill"} & set(phases) else None
    llm = LLM(progress=False, **options) if {"throughput", "decode", "prefill", "ttft"} & set(phases) else None
    if llm is not None:
        result["engine"] = {"max_model_len": llm.engine.max_model_len,
                            "prefill_tokens_per_step": llm.engine.runner.max_num_batched_tokens}

    if "throughput" in phases:
        hf = hf_generate(hf_model, prompts, args.output_len, args.repeats)
        ours = ours_generate(llm, prompts, args.output_len, args.repeats)
        n_out = args.num_requests * args.output_len
        same = sum(a == b for a, b in zip(ours.pop("generate_tokens"), hf.pop("generate_tokens")))
        result["throughput"] = {"num_requests": args.num_requests, "input_len": args.input_len,
                                "output_len": args.output_len, "hf": hf, "ours": ours}
        summary["throughput_tokens_per_s"] = {"ours": n_out / min(ours["generate_seconds"]),
                                              "hf": n_out / min(hf["generate_seconds"])}
        summary["throughput_ratio"] = min(hf["generate_seconds"]) / min(ours["generate_seconds"])
        summary["identical_outputs"] = f"{same}/{args.num_requests}"
        print("throughput:", summary["throughput_tokens_per_s"], flush=True)

    if "prefill" in phases:
        rows = prefill_interleaved(hf_model, llm, long_prompt, lens, args.repeats)
        result["prefill"] = {str(n): row for n, row in rows.items()}
        summary["prefill_seconds_median"] = {
            str(n): {"ours": row["ours_median"], "hf_forward": row["hf_forward_median"],
                     "hf_forward_1_thread": row["hf_forward_1_thread_median"]} for n, row in rows.items()}
        summary["prefill_ratio"] = {str(n): row["ratio"] for n, row in rows.items()}  # vs the faster transformers
        summary["prefill_ratio_vs_hf_default_threads"] = {str(n): row["ratio_vs_hf_default_threads"]
                                                          for n, row in rows.items()}
        summary["prefill_cpu_seconds_ratio_vs_hf_1_thread"] = {str(n): row["cpu_seconds_ratio_vs_1_thread"]
                                                               for n, row in rows.items()}
        print("prefill:", summary["prefill_seconds_median"], "ratio", summary["prefill_ratio"], flush=True)
    hf_model = None
    gc.collect()

    if "decode" in phases:
        result["decode_default"] = short_prompt_decode(llm, args.repeats)

    if "ttft" in phases:
        scenario = short_beside_long(llm, long_prompt[:args.ttft_long], short_prompt, args.ttft_delay)
        result["ttft"] = scenario
        summary["short_ttft_beside_long"] = {
            k: scenario[k] for k in ("long_len", "short_len", "short_ttft", "short_ttft_alone",
                                     "short_steps_to_first_token", "in_flight_step_seconds", "own_step_seconds",
                                     "long_ttft", "long_chunk_steps", "long_step_seconds_median")}
        print("ttft:", summary["short_ttft_beside_long"], flush=True)

    if llm is not None:
        llm.shutdown()
        llm = None
        gc.collect()

    if "decode" in phases:
        short = LLM(model_dir, dtype="fp32", max_model_len=64, progress=False)
        result["decode_max_model_len_64"] = short_prompt_decode(short, args.repeats)
        short.shutdown()
        del short
        per_token = {"default": result["decode_default"]["seconds_per_token"],
                     "max_model_len_64": result["decode_max_model_len_64"]["seconds_per_token"]}
        summary["decode_seconds_per_token"] = per_token
        summary["decode_ratio_default_vs_64"] = per_token["default"] / per_token["max_model_len_64"]

    if "chunks" in phases:
        chunks = [int(c) for c in args.chunks.split(",") if c]
        result["chunks"] = chunk_sweep(chunks, long_prompt[:args.ttft_long], short_prompt, args.ttft_delay,
                                       args.repeats, options)

    summary["goals"] = {"throughput_ratio": ">= 1", "decode_ratio_default_vs_64": "<= 1.5", "prefill_ratio": "<= 2",
                        "short_ttft": "<= in-flight step + own step (+ host time), far below long_ttft"}
    result["summary"] = summary
    for k, v in summary.items():
        print(f"{k}: {v}")
    print("wrote", write_result("cpu_path" + (f"-{args.tag}" if args.tag else ""), result, args.out))


if __name__ == "__main__":
    main()
