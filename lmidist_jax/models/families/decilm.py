"""DeciLM (remote code ``DeciLMForCausalLM``, DeciLM-7B; mapped, never executed): Llama with
"variable GQA", a KV-head count per layer (``num_key_value_heads_per_layer``).

Each layer keeps its own head count: its q/k/v kernel, its KV cache and the attention kernel
call are all per layer, so no KV head is duplicated and the cache holds exactly the heads the
checkpoint has (vLLM instead repeats every layer's heads up to the largest count). Under tensor
parallelism each layer's heads are replicated only as far as that layer needs
(``loader.spec_for_mesh``).

Refused: the Nemotron-NAS descendants that reuse the architecture name with per-block
``block_configs`` (layers without attention or with other MLP widths).
"""

from __future__ import annotations

import dataclasses

from ..spec import ModelSpec
from . import Family, register
from .common import refuse
from .llama import llama_spec, llama_weight_map


def decilm_spec(config: dict, architecture: str) -> ModelSpec:
    refuse("block_configs" in config,
           "DeciLMForCausalLM with block_configs (Nemotron-NAS) is not supported; the DeciLM-7B "
           "layout (num_key_value_heads_per_layer) is")
    spec = llama_spec(config, architecture)
    per_layer = config.get("num_key_value_heads_per_layer")
    if per_layer is None:
        return spec  # uniform GQA: plain Llama
    per_layer = tuple(int(k) for k in per_layer)
    refuse(len(per_layer) != spec.num_layers,
           f"num_key_value_heads_per_layer has {len(per_layer)} entries for {spec.num_layers} layers")
    bad = [k for k in per_layer if k <= 0 or spec.num_heads % k]
    refuse(bool(bad), f"num_key_value_heads_per_layer {list(per_layer)}: each entry must divide "
                      f"num_attention_heads={spec.num_heads}")
    return dataclasses.replace(spec, num_kv_heads=max(per_layer), kv_heads_per_layer=per_layer)


register(Family(
    name="DeciLM", architectures=("DeciLMForCausalLM",), build_spec=decilm_spec, weight_map=llama_weight_map,
    summary="RMSNorm; rotary (linear/dynamic scaling); sequential; gated SiLU; KV heads per layer"))
