"""Scoring loglikelihood requests through lm-evaluation-harness: our native model
(``lmidist-jax``) against lm-eval's ``hf`` model, same process, same requests (issue 29).

  python benchmarks/lm_eval_loglikelihood.py                 # 1,000 requests, fp32, CPU
  python benchmarks/lm_eval_loglikelihood.py --num-requests 100 --repeats 1   # a quick check

The requests are a synthetic multiple-choice set, seeded: ``num_requests / 4`` contexts of
20-100 words, each with 4 continuations of 1-8 words (the shape of a 0-shot multiple-choice
task such as ARC or HellaSwag). Both models get them through ``LM.loglikelihood`` (the
call the harness makes), so tokenization is lm-eval's own. Every repeat draws a new set
(seed = repeat), the same for every side, so no side's cache holds a repeat's contexts.

- ours: ``LmidistJaxLM(pretrained=smollm2, dtype=fp32)`` at its default options (the
  engine's, plus prefix caching on); its first call, on a set of its own, compiles the
  step buckets the workload uses and is reported apart (``ours_first_call_s``; a later
  process loads them from the executable cache).
- hf: lm-eval's ``HFLM(pretrained=<same dir>, dtype=float32, device=cpu)`` in each
  ``--hf`` configuration ``batch_size:torch_threads`` (``1:default`` is lm-eval's
  default; ``default`` = torch's own thread count). On a machine shared with other jobs,
  torch's OpenMP threads spin against them: 2 threads ran 9x slower than 1 on this
  2-core machine at load 10, so the 1-thread configurations are the fair ones there.

Repeats are interleaved (the sides' order alternates) and the load average is recorded
beside each timing: compare the minimum of each side. The per-request loglikelihoods of
ours and the first hf configuration are compared too (max difference, is_greedy agreement).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_result  # noqa: E402

WORDS = ("the of and to in is was that for on with as by at from this which or an be are his had not but were "
         "have they one all she there been their has more when who will would no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much "
         "your way well down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three river bread garden "
         "window morning winter letter music market village mountain engine teacher animal forest question").split()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def make_requests(num_requests: int, seed: int = 0):
    """(context, continuation) pairs: num_requests / 4 contexts with 4 continuations each."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < num_requests:
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 100))).capitalize() + ". Answer:"
        for _ in range(4):
            pairs.append((context, " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))))
    return pairs[:num_requests]


def instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def timed_call(lm, reqs) -> tuple[float, list]:
    gc.collect()
    start = time.perf_counter()
    results = lm.loglikelihood(reqs, disable_tqdm=True)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model id or directory (default: smollm2)")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hf", default="1:default,1:1,16:1",
                        help="comma-separated hf configurations batch_size:torch_threads (default: torch's own)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an engine option for ours (repeatable)")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--name", default="lm_eval_loglikelihood")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import numpy as np
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from lmidist_jax.eval import LmidistJaxLM
    from lmidist_jax.model_store import resolve_model

    model_dir = str(resolve_model(args.model))
    options = dict(o.split("=", 1) for o in args.option)
    request_sets = [instances(make_requests(args.num_requests, seed=r)) for r in range(args.repeats)]
    pairs = make_requests(args.num_requests, seed=0)
    default_threads = torch.get_num_threads()
    result: dict = {"model": args.model, "dtype": "fp32", "num_requests": args.num_requests,
                    "num_contexts": len({c for c, _ in pairs}), "engine_options": options,
                    "torch_default_threads": default_threads, "cpu_count": os.cpu_count(),
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "lm_eval": __import__("lm_eval").__version__}}

    t = time.perf_counter()
    ours = LmidistJaxLM(pretrained=model_dir, dtype="fp32", **options)
    result["ours_load_s"] = time.perf_counter() - t
    warmup = instances(make_requests(args.num_requests, seed=1000))
    result["ours_first_call_s"], _ = timed_call(ours, warmup)  # compiles the buckets this workload uses
    result["ours_first_call_load"] = load_average()
    token_counts = [len(ours.tok_encode(c + x)) for c, x in pairs]
    result["tokens_per_request"] = {"mean": float(np.mean(token_counts)), "max": int(max(token_counts)),
                                    "total": int(sum(token_counts))}

    hf_configs = []
    for config in [c for c in args.hf.split(",") if c]:
        bs, threads = config.split(":")
        threads = default_threads if threads == "default" else int(threads)
        name = f"hf_bs{bs}_threads{threads}"
        t = time.perf_counter()
        hf_configs.append((name, HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=int(bs)),
                           threads))
        result[f"{name}_load_s"] = time.perf_counter() - t

    timings: dict[str, list[dict]] = {"ours": [], **{name: [] for name, _, _ in hf_configs}}
    diffs, greedy_equal = [], 0
    for r, reqs in enumerate(request_sets):
        sides = [(name, lm, threads) for name, lm, threads in hf_configs] + [("ours", ours, None)]
        if r % 2:  # alternate which side runs first
            sides.reverse()
        values = {}
        for name, lm, threads in sides:
            torch.set_num_threads(threads or default_threads)
            before = load_average()
            seconds, values[name] = timed_call(lm, reqs)
            timings[name].append({"seconds": seconds, "load_before": before, "load_after": load_average()})
            print(f"repeat {r}: {name}: {seconds:.1f} s (load {before})", flush=True)
        torch.set_num_threads(default_threads)
        if hf_configs:
            reference = values[hf_configs[0][0]]
            diffs += [abs(a[0] - b[0]) for a, b in zip(values["ours"], reference)]
            greedy_equal += sum(a[1] == b[1] for a, b in zip(values["ours"], reference))
    result["timings"] = timings
    result["min_seconds"] = {name: min(t["seconds"] for t in ts) for name, ts in timings.items()}
    result["requests_per_second_at_min"] = {name: args.num_requests / s for name, s in result["min_seconds"].items()}
    if diffs:
        result["agreement"] = {"against": hf_configs[0][0], "max_abs_loglikelihood_diff": float(max(diffs)),
                               "mean_abs_loglikelihood_diff": float(np.mean(diffs)),
                               "is_greedy_equal": int(greedy_equal), "of": len(diffs)}
    result["load_average_end"] = load_average()
    path = write_result(args.name, result, args.out_dir)
    print({k: result[k] for k in ("min_seconds", "requests_per_second_at_min", "ours_first_call_s")})
    print(result.get("agreement"))
    print("wrote", path)


if __name__ == "__main__":
    main()
