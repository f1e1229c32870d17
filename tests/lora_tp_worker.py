"""Runs in a subprocess with two CPU devices: greedy tokens of base + LoRA adapters at
TP=2 (tests/test_lora.py). Prints REPORT {json}."""

import json
import sys

from lmidist_jax import LLM, SamplingParams

spec = json.loads(open(sys.argv[1]).read())
llm = LLM(spec["base"], tensor_parallel_degree=2, **spec["engine"])
for name, path in spec["adapters"].items():
    llm.add_adapter(name, path)
outs = llm.generate(spec["prompts"], SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True),
                    use_tqdm=False, adapters=spec["names"])
tp = llm.engine.runner.mesh.devices.size
print("REPORT " + json.dumps({"tp": int(tp), "tokens": [o.token_ids for o in outs]}))
