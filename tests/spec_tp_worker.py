"""Runs in a subprocess with 2 (fake) CPU devices: greedy tokens of a TP=2 target with
its draft replicated (draft_model_tp_size=1). With LMIDIST_NUM_PROCESSES=2 in the
environment it is one of two processes of a jax.distributed run (one device each): the
target and its draft sharded over both (draft_model_tp_size=2), process 0 schedules and
broadcasts each step, process 1 follows. Prints a JSON report.

  python spec_tp_worker.py TARGET_DIR DRAFT_DIR PROMPTS_JSON
"""

import json
import sys

from lmidist_jax.engine import multihost

multihost.initialize_from_env()  # before any other JAX call

from lmidist_jax import LLM, SamplingParams  # noqa: E402

TARGET, DRAFT, PROMPTS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
OPTIONS = dict(dtype="fp32", max_model_len=128, block_size=4, num_kv_blocks=100, max_rolling_batch_size=4,
               max_rolling_batch_prefill_tokens=16, progress=False, tensor_parallel_degree=2,
               speculative_draft_model=DRAFT, speculative_length=3)
report = {}
for draft_tp in ((2,) if multihost.is_multiprocess() else (1,)):
    llm = LLM(TARGET, draft_model_tp_size=draft_tp, **OPTIONS)
    if llm.is_follower:  # LLM() returned: the leader said stop
        print("FOLLOWER DONE")
        sys.exit(0)
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True), use_tqdm=False)
    llm.shutdown()
    runner = llm.engine.runner
    report[draft_tp] = {
        "tokens": [o.token_ids for o in outs],
        "accepted": llm.engine.spec_stats.num_accepted_tokens,
        "target_kv": str(runner.kv_caches[0][0].sharding.spec),
        "draft_kv": str(runner.draft_kv_caches[0][0].sharding.spec),
        "draft_devices": len(runner.draft_kv_caches[0][0].sharding.device_set),
    }
print(json.dumps(report))
