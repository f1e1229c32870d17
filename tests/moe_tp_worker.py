"""Run by test_moe.py on 2 CPU devices: a tiny Mixtral at TP=2 through every expert
implementation; prints REPORT {impl: logits relative error vs transformers, ...}."""

import dataclasses
import json
import sys

import numpy as np

from lmidist_jax import LLM
from lmidist_jax.models import loader
from lmidist_jax.models.scoring import prompt_logits
from tiny_models import hf_logits, make_model

directory = sys.argv[1]
hf = make_model(directory, "mixtral_8x")
ids = list(range(3, 43))
ref = hf_logits(hf, ids)
llm = LLM(directory, dtype="fp32", max_model_len=64, num_kv_blocks=16, warmup=False, progress=False,
          tensor_parallel_degree=2)
model = llm.engine.runner.model
report = {"w_gate_up_spec": str(model.state["layers"][0]["mlp"]["w_gate_up"][...].sharding.spec)}
for impl in ("dense", "xla", "ragged_dot", "pallas"):
    spec = dataclasses.replace(model.spec, moe_impl=impl)
    graphdef, _ = loader.abstract_model(spec, model.dtype, mesh=model.mesh)
    ours = prompt_logits(dataclasses.replace(model, spec=spec, graphdef=graphdef), ids)
    report[impl] = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
print("REPORT " + json.dumps(report))
