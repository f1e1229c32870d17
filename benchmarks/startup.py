"""Start-up time of ``lmidist-jax generate`` (issue 10's goals), cold and warm compilation
cache, on whatever device JAX finds (CPU here; a GPU when run there).

  python benchmarks/startup.py                  # default model, default options
  python benchmarks/startup.py --serve-warmup   # also time serve's full warm-up, cold and warm

Each call is a fresh ``lmidist-jax generate`` process, wall-clock timed, with the model
already fetched and converted (set-up done). The compilation cache is a new empty
directory (``--option compilation_cache_dir=DIR``), so call 1 is "the first after set-up"
and call 2 "a second call" reading what call 1 wrote; the default directory
(``compilation_cache_dir=auto``, beside the models) behaves the same.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_result  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_WARMUP = """
import sys, time
t = time.perf_counter()
from lmidist_jax.config import config_from_kwargs
from lmidist_jax.engine.factory import build_engine
engine = build_engine(config_from_kwargs(None, compilation_cache_dir=sys.argv[1]), warmup=True, progress=False)
print("buckets", engine.runner.num_compiled_steps, "seconds", time.perf_counter() - t)
"""


def run_timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--calls", type=int, default=3, help="generate calls on one cache (1 cold, then warm)")
    parser.add_argument("--serve-warmup", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default="startup", help="result file name prefix (results/NAME-DEVICE-DATE.json)")
    parser.add_argument("--note", default=None, help="a note stored in the result")
    args = parser.parse_args()

    from lmidist_jax.model_store import resolve_model

    resolve_model(args.model)  # set-up (fetch + convert) is not timed
    cli = [os.path.join(os.path.dirname(sys.executable), "lmidist-jax")]
    cache = tempfile.mkdtemp(prefix="lmidist-startup-cache-")
    result = {"benchmark": "startup", "model": args.model, "max_new_tokens": args.max_new_tokens,
              "load_before": [round(x, 2) for x in os.getloadavg()]}
    if args.note:
        result["note"] = args.note
    try:
        calls = []
        for i in range(args.calls):
            seconds, text = run_timed(cli + ["generate", "--model", args.model, "--chat", "--prompt", args.prompt,
                                             "--max-new-tokens", str(args.max_new_tokens),
                                             "--option", f"compilation_cache_dir={cache}"])
            calls.append({"seconds": seconds, "text": text, "load": [round(x, 2) for x in os.getloadavg()]})
            print(f"generate call {i + 1}: {seconds:.1f} s", flush=True)
        result["generate_calls"] = calls
        result["cache_entries"] = len(os.listdir(cache))
        executables = os.path.join(cache, "executables")  # engine/executable_cache.py
        result["executable_cache_entries"] = len(os.listdir(executables)) if os.path.isdir(executables) else 0
        result["summary"] = {"first_after_setup_s": calls[0]["seconds"],
                             "second_call_s": calls[1]["seconds"] if len(calls) > 1 else None,
                             "goals": {"first_after_setup_s": "< 60", "second_call_s": "< 15"}}
        if args.serve_warmup:
            shutil.rmtree(cache)
            os.makedirs(cache)
            warm = []
            for i in range(2):
                seconds, text = run_timed([sys.executable, "-c", SERVE_WARMUP, cache])
                warm.append({"seconds": seconds, "report": text})
                print(f"serve warm-up {'cold' if i == 0 else 'warm'} cache: {seconds:.1f} s ({text})", flush=True)
            result["serve_warmup"] = warm
            result["summary"]["serve_warmup_cold_s"] = warm[0]["seconds"]
            result["summary"]["serve_warmup_warm_s"] = warm[1]["seconds"]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(result["summary"])
    print("wrote", write_result(args.name, result, args.out))


if __name__ == "__main__":
    main()
