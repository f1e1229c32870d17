"""Correctness of the family variants on the GPU through the Pallas kernels: tiny random
HF models (tests/tiny_models.py), transformers on the CPU as the oracle, our engine in
float32 with the default attention backend (the Triton kernels on a GPU). Covers what
the kernels must handle for these families: per-layer sliding windows, softcaps, ALiBi,
head_dim 8..256, MQA/GQA, partial rotary.

  python benchmarks/gpu_family_check.py [VARIANT ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from benchmarks.common import write_result  # noqa: E402

EXTRA = ["gemma_hd256"]  # Gemma's real head_dim (256) through the kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="tests/tiny_models.py variants (default: all supported)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import numpy as np

    from lmidist_jax import LLM, SamplingParams
    from lmidist_jax.models.scoring import prompt_logits
    from tiny_models import ALL_FAMILIES, UNSUPPORTED, hf_greedy, hf_logits, make_model

    variants = args.variants or sorted(set(ALL_FAMILIES) - set(UNSUPPORTED)) + EXTRA

    rng = np.random.default_rng(2)
    prompts = [list(map(int, rng.integers(0, 128, n))) for n in (5, 17, 40)]
    ids = list(map(int, np.random.default_rng(1).integers(0, 128, 40)))
    results, ok = {}, True
    for variant in variants:
        t = time.perf_counter()
        overrides = {}
        name = variant
        if variant == "gemma_hd256":  # Gemma's real head_dim through the kernels
            name, overrides = "gemma", dict(head_dim=256)
        with tempfile.TemporaryDirectory() as d:
            hf = make_model(d, name, **overrides)
            llm = LLM(d, dtype="fp32", max_model_len=256, num_kv_blocks=64, max_rolling_batch_size=4,
                      max_rolling_batch_prefill_tokens=64, warmup=False, progress=False)
            backend = llm.engine.runner.backend
            outs = llm.generate(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True), use_tqdm=False)
            same = [o.token_ids == hf_greedy(hf, p, 32) for p, o in zip(prompts, outs)]
            ours, ref = prompt_logits(llm.engine.runner.model, ids), hf_logits(hf, ids)
            rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
            llm.shutdown()
        results[variant] = dict(backend=backend, greedy_identical=same, logits_rel_err=rel,
                                seconds=time.perf_counter() - t)
        ok &= all(same)
        print(f"{variant:16s} backend={backend} greedy identical={same} logits rel err={rel:.1e}", flush=True)
    result = {"benchmark": "gpu_family_check", "all_greedy_identical": ok, "variants": results}
    print("wrote", write_result("gpu_family_check", result, args.out))


if __name__ == "__main__":
    main()
