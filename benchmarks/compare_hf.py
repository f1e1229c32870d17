"""lmidist-jax vs HF transformers ``generate`` on the same model, prompts and machine.

  # CPU, the default model, 16 concurrent requests (the README's CPU comparison)
  python benchmarks/compare_hf.py --model smollm2 --num-requests 16 --input-len 32 --output-len 64
  # GPU, batch-1 decode on a random Llama-3-8B-shaped model in bf16
  python benchmarks/compare_hf.py --shape llama3-8b --num-requests 1 --input-len 128 --output-len 128

Both sides generate exactly output-len greedy tokens per request (EOS ignored). HF runs
first (all requests as one left-padded batch), is freed, then lmidist-jax runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Leave room for torch's copy of the model while JAX starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import numpy as np  # noqa: E402

from benchmarks.common import SHAPES, write_result  # noqa: E402


def hf_generate(model_dir_or_config, prompts, output_len, device, dtype):
    import torch
    import transformers

    if isinstance(model_dir_or_config, dict):
        config = transformers.AutoConfig.for_model(**{k: v for k, v in model_dir_or_config.items()
                                                      if k not in ("architectures",)})
        with torch.device(device):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir_or_config, dtype=dtype).to(device)
    model.eval()
    pad = 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len,
                  pad_token_id=pad)
    with torch.no_grad():
        model.generate(ids[:, :8], attention_mask=mask[:, :8], do_sample=False, max_new_tokens=4, pad_token_id=pad)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
    tokens = out[:, width:].cpu().tolist()
    del model, out
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return elapsed, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", default=None)
    src.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    rng = np.random.default_rng(0)

    if args.shape:
        source = SHAPES[args.shape]
        vocab = source["vocab_size"]
    else:
        from lmidist_jax.model_store import resolve_model

        source = str(resolve_model(args.model or "smollm2"))
        with open(os.path.join(source, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
    prompts = [list(map(int, rng.integers(10, vocab - 10, args.input_len))) for _ in range(args.num_requests)]

    hf_time, hf_tokens = hf_generate(source, prompts, args.output_len, device, torch_dtype)
    n_out = args.num_requests * args.output_len
    print(f"transformers generate: {n_out} tokens in {hf_time:.2f} s = {n_out / hf_time:.1f} tok/s", flush=True)

    from lmidist_jax import LLM, SamplingParams
    from lmidist_jax.config import config_from_kwargs
    from lmidist_jax.engine.factory import engine_for_model
    from converters.checkpoint import parse_dtype
    from lmidist_jax.models.loader import random_model
    from lmidist_jax.models.families import spec_from_hf_config
    from lmidist_jax import parallel

    options = dict(o.split("=", 1) for o in args.option)
    options.setdefault("max_rolling_batch_size", max(args.num_requests, 1))
    options.setdefault("max_model_len", args.input_len + args.output_len + 16)
    options["dtype"] = dtype_name
    if args.shape:
        config = config_from_kwargs(None, **options)
        spec = spec_from_hf_config(source)
        model = random_model(spec, dtype=parse_dtype(dtype_name, {}), mesh=parallel.make_mesh(config.tensor_parallel_degree),
                             max_model_len=config.max_model_len)
        llm = LLM.from_engine(engine_for_model(model, None, config, max_model_len=config.max_model_len))
    else:
        llm = LLM(source, warmup=True, **options)  # every bucket compiled before the timed run
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_new_tokens=4, ignore_eos=True), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    ours_time = time.perf_counter() - t
    ours_tokens = [o.token_ids for o in outs]
    # With --shape both sides draw their own random weights: outputs are not comparable.
    same = None if args.shape else sum(a == b for a, b in zip(ours_tokens, hf_tokens))
    print(f"lmidist-jax:           {n_out} tokens in {ours_time:.2f} s = {n_out / ours_time:.1f} tok/s")
    print(f"speed-up {hf_time / ours_time:.2f}x" + ("" if same is None else
          f"; identical greedy outputs: {same}/{len(prompts)}"))
    result = {
        "benchmark": "compare_hf",
        "model": args.model or args.shape or "smollm2",
        "dtype": dtype_name, "num_requests": args.num_requests,
        "input_len": args.input_len, "output_len": args.output_len, "options": options,
        "hf_seconds": hf_time, "hf_tokens_per_s": n_out / hf_time,
        "ours_seconds": ours_time, "ours_tokens_per_s": n_out / ours_time,
        "speedup": hf_time / ours_time, "identical_outputs": same,
    }
    print("wrote", write_result("compare_hf", result, args.out))


if __name__ == "__main__":
    main()
