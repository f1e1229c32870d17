"""Runs in a subprocess with several (fake) CPU devices; prints a JSON report.

  python parallel_worker.py tp MODEL_DIR 1,2,4,8      tensor parallel degrees, one process
  python parallel_worker.py multihost MODEL_DIR TP     one process of a jax.distributed run
  python parallel_worker.py families SPEC.json TP       greedy tokens + logits of many model dirs
"""

import json
import sys

import numpy as np

MODE, MODEL_DIR = sys.argv[1], sys.argv[2]

from lmidist_jax.engine.multihost import initialize_from_env  # noqa: E402

initialize_from_env()

import jax  # noqa: E402

from lmidist_jax import LLM, SamplingParams  # noqa: E402
from lmidist_jax.models.scoring import prompt_logits  # noqa: E402
from lmidist_jax import parallel  # noqa: E402
from lmidist_jax.models.loader import variables  # noqa: E402

# Few buckets (decode 1/2/4, tokens 16/32): each TP degree compiles its own engine.
OPTIONS = dict(dtype="fp32", max_model_len=128, block_size=4, num_kv_blocks=100, max_rolling_batch_size=4,
               max_rolling_batch_prefill_tokens=32, progress=False)
rng = np.random.default_rng(0)
PROMPTS = [list(map(int, rng.integers(0, 128, n))) for n in (3, 17, 30, 9)]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


def decode_collectives(llm):
    """{op: count} of the collectives in the compiled decode step (the one ``generate``
    compiled already, else the batch-1 bucket compiled now)."""
    runner = llm.engine.runner
    compiled = next((exe for (_, _, decode_only), exe in runner._compiled.items() if decode_only), None)
    if compiled is None:
        compiled = runner._step.lower(*runner._args(runner.dummy_batch(1, 1, True), 1)).compile()
    return parallel.collective_counts(compiled.as_text())


def sharding_report(llm):
    """Each weight's placement vs the rules, and the KV pool split."""
    model = llm.engine.runner.model
    problems = []
    leaves = jax.tree_util.tree_leaves_with_path(model.state, is_leaf=lambda x: hasattr(x, "get_metadata"))
    for path, var in leaves:
        expected = parallel.partition_spec(var.get_metadata()["logical_axes"], var.shape, model.mesh)
        actual = var[...].sharding.spec
        if tuple(actual) + (None,) * (len(var.shape) - len(actual)) != tuple(expected) + (None,) * (len(var.shape) - len(expected)):
            problems.append(f"{jax.tree_util.keystr(path)}: {actual} != {expected}")
    k_pages = llm.engine.runner.kv_caches[0][0]
    shard_heads = sorted({s.data.shape[0] for s in k_pages.addressable_shards})
    return problems, shard_heads, k_pages.shape[0]


if MODE == "tp":
    report = {}
    for tp in map(int, sys.argv[3].split(",")):
        llm = LLM(MODEL_DIR, tensor_parallel_degree=tp, **OPTIONS)
        outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        logits = prompt_logits(llm.engine.runner.model, PROMPTS[2])
        problems, shard_heads, kv_heads = sharding_report(llm)
        report[tp] = dict(tokens=[o.token_ids for o in outs], logits=logits.tolist(), problems=problems,
                          kv_shard_heads=shard_heads, kv_heads=kv_heads,
                          num_layers=llm.engine.runner.spec.num_layers, collectives=decode_collectives(llm),
                          q_sharding=str(llm.engine.runner.model.state["layers"][0]["attn"]["qkv_proj"]["kernel"][...].sharding.spec))
    print("REPORT " + json.dumps(report))
elif MODE == "orbax":
    # Convert once on a TP=2 mesh and save with orbax; restore on TP=4 and TP=1 meshes.
    import time

    from flax import nnx

    save_dir = sys.argv[3]
    t = time.perf_counter()
    source = LLM(MODEL_DIR, tensor_parallel_degree=2, save_converted=save_dir, **OPTIONS)
    convert_s = time.perf_counter() - t
    report = {"convert_and_save_s": convert_s}
    for tp in (4, 1):
        t = time.perf_counter()
        restored = LLM(save_dir, tensor_parallel_degree=tp, **OPTIONS)
        report[f"restore_tp{tp}_s"] = time.perf_counter() - t
        direct = LLM(MODEL_DIR, tensor_parallel_degree=tp, **OPTIONS)
        a = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(restored.engine.runner.model.state))
        b = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(direct.engine.runner.model.state)))
        report[f"tp{tp}_identical"] = all(np.array_equal(np.asarray(v), np.asarray(b[k])) for k, v in a) and len(a) == len(b)
        report[f"tp{tp}_q_sharding"] = str(restored.engine.runner.model.state["layers"][0]["attn"]["qkv_proj"]["kernel"][...].sharding.spec)
        report[f"tp{tp}_tokens"] = [o.token_ids for o in restored.generate(PROMPTS, PARAMS, use_tqdm=False)]
        report[f"tp{tp}_direct_tokens"] = [o.token_ids for o in direct.generate(PROMPTS, PARAMS, use_tqdm=False)]
    print("REPORT " + json.dumps(report))
elif MODE == "families":
    spec = json.load(open(MODEL_DIR))
    options = dict(OPTIONS, block_size=16, num_kv_blocks=64, max_model_len=256, max_rolling_batch_prefill_tokens=64)
    report = {}
    for family, directory in spec["dirs"].items():
        llm = LLM(directory, tensor_parallel_degree=int(sys.argv[3]), warmup=False, **options)
        outs = llm.generate(spec["prompts"], SamplingParams(max_new_tokens=32, ignore_eos=True), use_tqdm=False)
        logits = prompt_logits(llm.engine.runner.model, spec["logit_ids"])
        # Placement of layer 0's parameters ("attn.o_proj.kernel" -> "('tp', None)").
        shardings = {".".join(map(str, path[2:])): str(tuple(var[...].sharding.spec))
                     for path, var in variables(llm.engine.runner.model.state).items() if path[:2] == ("layers", 0)}
        report[family] = dict(tokens=[o.token_ids for o in outs], logits=logits.tolist(), shardings=shardings,
                              num_layers=llm.engine.runner.spec.num_layers, collectives=decode_collectives(llm))
        llm.shutdown()
        del llm
    print("REPORT " + json.dumps(report))
else:
    llm = LLM(MODEL_DIR, tensor_parallel_degree=int(sys.argv[3]), **OPTIONS)
    if jax.process_index() == 0:
        outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        llm.shutdown()
        print("REPORT " + json.dumps(dict(tokens=[o.token_ids for o in outs], devices=jax.device_count(),
                                          processes=jax.process_count())))
    else:
        print("FOLLOWER DONE")
