"""Load time: converting an HF checkpoint vs restoring the orbax cache of the converted
parameters (``save_converted``), in one run.

  python benchmarks/orbax_cache.py --model smollm2 --repeats 3
  python benchmarks/orbax_cache.py --random tinyllama-1.1b --checkpoint-format pt

``--random SHAPE`` writes a random bf16 HF checkpoint of a shape from benchmarks/common.py
(as ``model.safetensors`` or a PyTorch ``pytorch_model.bin``; needs torch) to a
temporary directory and measures that. ``--num-layers`` cuts the shape's layer count
(a 70B checkpoint and its orbax copy do not both fit a 128 GB disk; the JSON records the
per-layer times too), ``--tensor-parallel-degree`` loads onto a mesh of that many devices:

  python benchmarks/orbax_cache.py --random llama2-70b --num-layers 16 --tensor-parallel-degree 2 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import write_result  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--random", default=None, help="a shape from benchmarks/common.py instead of --model")
    parser.add_argument("--checkpoint-format", choices=("safetensors", "pt"), default="safetensors")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-layers", type=int, default=None, help="with --random: fewer layers than the shape")
    parser.add_argument("--tensor-parallel-degree", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import jax

    from lmidist_jax.models import converted_cache
    from converters.checkpoint import iter_checkpoint_tensors, load_config, parse_dtype
    from lmidist_jax.model_store import resolve_model
    from lmidist_jax import parallel
    from lmidist_jax.models.loader import load_model
    from lmidist_jax.models.families import map_checkpoint, spec_from_hf_config

    scratch = tempfile.TemporaryDirectory()
    if args.random:
        model_dir = write_random_checkpoint(args.random, args.checkpoint_format, scratch.name, args.num_layers)
        label = f"{args.random}-{args.checkpoint_format}"
        if args.num_layers:
            label += f"-{args.num_layers}layers"
        if args.tensor_parallel_degree > 1:
            label += f"-tp{args.tensor_parallel_degree}"
    else:
        model_dir = resolve_model(args.model)
        label = args.model
    hf_config = load_config(model_dir)
    spec = spec_from_hf_config(hf_config)
    dtype = parse_dtype(args.dtype, hf_config)
    mesh = parallel.make_mesh(args.tensor_parallel_degree)

    def convert():
        tensors = iter_checkpoint_tensors(model_dir, "auto", progress=False)
        model = load_model(spec, map_checkpoint(spec, tensors), dtype=dtype, mesh=mesh)
        jax.block_until_ready(jax.tree_util.tree_leaves(model.state))
        return model

    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "converted")
        model = convert()
        t = time.perf_counter()
        converted_cache.save_converted(model, hf_config, saved, tokenizer_dir=model_dir)
        save_s = time.perf_counter() - t
        convert_times, restore_times = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            convert()
            convert_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            restored = converted_cache.load_converted(spec, saved, dtype=dtype, mesh=mesh)
            jax.block_until_ready(jax.tree_util.tree_leaves(restored.state))
            restore_times.append(time.perf_counter() - t)
    scratch.cleanup()
    result = {
        "benchmark": "orbax_cache", "model": label, "dtype": str(dtype), "num_layers": spec.num_layers,
        "tensor_parallel_degree": args.tensor_parallel_degree, "devices": [str(d) for d in mesh.devices.flat],
        "parameter_bytes": model.num_parameter_bytes,
        "convert_s_median": float(np.median(convert_times)), "restore_s_median": float(np.median(restore_times)),
        "save_s": save_s, "convert_s": convert_times, "restore_s": restore_times,
    }
    print(f"convert {result['convert_s_median']:.2f} s, orbax restore {result['restore_s_median']:.2f} s "
          f"({model.num_parameter_bytes / 1e9:.2f} GB), save {save_s:.2f} s")
    name = "orbax_cache" if label == "smollm2" else f"orbax_cache-{label}"
    print("wrote", write_result(name, result, args.out))


def write_random_checkpoint(shape: str, fmt: str, directory: str, num_layers: int | None = None) -> str:
    """A random bf16 Llama-layout HF checkpoint of a benchmarks/common.py shape (with
    ``num_layers`` layers instead of the shape's when given)."""
    import json

    import torch

    from benchmarks.common import SHAPES

    cfg = dict(SHAPES[shape])
    if num_layers:
        cfg["num_hidden_layers"] = num_layers
    e, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = e // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], e), "model.norm.weight": (e,),
              "lm_head.weight": (cfg["vocab_size"], e)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (e, e), p + "self_attn.k_proj.weight": (kv, e),
                   p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.o_proj.weight": (e, e),
                   p + "mlp.gate_proj.weight": (inter, e), p + "mlp.up_proj.weight": (inter, e),
                   p + "mlp.down_proj.weight": (e, inter), p + "input_layernorm.weight": (e,),
                   p + "post_attention_layernorm.weight": (e,)}
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(s, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
               for name, s in shapes.items()}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    if fmt == "pt":
        torch.save(tensors, os.path.join(directory, "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(directory, "model.safetensors"))
    return directory


if __name__ == "__main__":
    main()
