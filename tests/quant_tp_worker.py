"""Runs in a subprocess with several CPU devices: whole-prompt logits of a quantized
checkpoint at a tensor-parallel degree (the matmul path from LMIDIST_QUANT_IMPL), and of
its first 4 tokens (with the kernel: the CUDA-core path rather than the tensor cores).

  python quant_tp_worker.py MODEL_DIR TP TOKEN_IDS_JSON   -> REPORT {"kind", "logits", "logits4"}
"""

import json
import sys

from lmidist_jax import LLM  # noqa: E402
from lmidist_jax.models.scoring import prompt_logits  # noqa: E402

model_dir, tp, ids = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
llm = LLM(model_dir, tensor_parallel_degree=tp, dtype="fp32", max_model_len=64, num_kv_blocks=16, warmup=False,
          progress=False)
model = llm.engine.runner.model
print("REPORT " + json.dumps({"kind": model.spec.linear_kind, "logits": prompt_logits(model, ids).tolist(),
                              "logits4": prompt_logits(model, ids[:4]).tolist()}))
