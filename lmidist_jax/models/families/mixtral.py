"""Mixture-of-experts families on the Llama layout: Mixtral (top-2 of 8 experts, softmax
then top-k then renormalize, sliding window) and Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B:
q/k/v biases, top-k without renormalization unless norm_topk_prob, a shared expert with
a sigmoid gate). The MLP is ``models/moe.py``; experts are stacked by the loader.

Checkpoint names: per expert ``experts.{j}.w1/w3/w2`` (Mixtral) or
``experts.{j}.gate_proj/up_proj/down_proj`` (Qwen2-MoE), which is also what
transformers 5.17's ``save_pretrained`` writes (its conversion mapping stacks them into
``mlp.experts.gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I] in memory and splits
them back on save); the stacked names are accepted too."""

from __future__ import annotations

import dataclasses

from ..spec import ModelSpec
from ..weight_map import WeightMap, expert, linear, part, stacked_experts, to
from . import Family, register
from .common import llama_layer_names, llama_model_names, refuse
from .llama import llama_spec

P, L = "model.layers.{i}", "layers.{i}"


def _stacked_names(prefix: str) -> dict:
    """transformers 5's in-memory layout of the experts, if a checkpoint was written in it."""
    return {
        f"{prefix}.experts.gate_up_proj": stacked_experts(f"{L}.mlp.w_gate_up", ("gate", "up")),
        f"{prefix}.experts.down_proj": stacked_experts(f"{L}.mlp.w_down"),
    }


def mixtral_spec(config: dict, architecture: str) -> ModelSpec:
    return dataclasses.replace(
        llama_spec(config, architecture), mlp_type="moe", num_experts=int(config["num_local_experts"]),
        num_experts_per_token=int(config["num_experts_per_tok"]), moe_weight_norm=1.0)


def mixtral_weight_map(spec: ModelSpec) -> WeightMap:
    names = {**llama_model_names(), **llama_layer_names(mlp="moe")}
    for prefix in (f"{P}.block_sparse_moe", f"{P}.mlp"):
        names[f"{prefix}.gate.weight"] = to(f"{L}.mlp.router", linear=True)
        names[f"{prefix}.experts.{{j}}.w1.weight"] = expert(f"{L}.mlp.w_gate_up", "gate")
        names[f"{prefix}.experts.{{j}}.w3.weight"] = expert(f"{L}.mlp.w_gate_up", "up")
        names[f"{prefix}.experts.{{j}}.w2.weight"] = expert(f"{L}.mlp.w_down")
        names.update(_stacked_names(prefix))
    return WeightMap(names)


def qwen2_moe_spec(config: dict, architecture: str) -> ModelSpec:
    layers = int(config["num_hidden_layers"])
    step = int(config.get("decoder_sparse_step") or 1)
    dense = sorted(set(config.get("mlp_only_layers") or []) | {i for i in range(layers) if (i + 1) % step})
    refuse(bool(dense), f"Qwen2-MoE with dense MLP layers ({dense}: mlp_only_layers / decoder_sparse_step="
                        f"{step}) is not supported; every layer must be a mixture of experts")
    refuse(bool(config.get("use_sliding_window")), "Qwen2-MoE use_sliding_window is not supported")
    qkv_bias = bool(config.get("qkv_bias", True))
    return dataclasses.replace(
        llama_spec({**config, "intermediate_size": config["moe_intermediate_size"], "sliding_window": None},
                   architecture),
        qkv_bias=qkv_bias, o_bias=False, mlp_type="moe", num_experts=int(config["num_experts"]),
        num_experts_per_token=int(config["num_experts_per_tok"]),
        moe_weight_norm=1.0 if config.get("norm_topk_prob", False) else None,
        shared_expert_size=int(config.get("shared_expert_intermediate_size") or 0))


def qwen2_moe_weight_map(spec: ModelSpec) -> WeightMap:
    mlp, shared = f"{P}.mlp", f"{P}.mlp.shared_expert"
    return WeightMap({
        **llama_model_names(), **llama_layer_names(mlp="moe"),
        f"{mlp}.gate.weight": to(f"{L}.mlp.router", linear=True),
        f"{mlp}.experts.{{j}}.gate_proj.weight": expert(f"{L}.mlp.w_gate_up", "gate"),
        f"{mlp}.experts.{{j}}.up_proj.weight": expert(f"{L}.mlp.w_gate_up", "up"),
        f"{mlp}.experts.{{j}}.down_proj.weight": expert(f"{L}.mlp.w_down"),
        **_stacked_names(mlp),
        f"{shared}.gate_proj.weight": part(f"{L}.mlp.shared_expert.gate_up_proj", "gate"),
        f"{shared}.up_proj.weight": part(f"{L}.mlp.shared_expert.gate_up_proj", "up"),
        **linear(f"{shared}.down_proj", f"{L}.mlp.shared_expert.down_proj"),
        f"{mlp}.shared_expert_gate.weight": to(f"{L}.mlp.shared_expert_gate", linear=True),
    })


register(Family(
    name="Mixtral", architectures=("MixtralForCausalLM",), build_spec=mixtral_spec,
    weight_map=mixtral_weight_map,
    summary="RMSNorm; rotary; sequential; mixture of gated SiLU experts (softmax, top-k, renormalized); "
            "sliding window"))

register(Family(
    name="Qwen2-MoE", architectures=("Qwen2MoeForCausalLM",), build_spec=qwen2_moe_spec,
    weight_map=qwen2_moe_weight_map,
    summary="RMSNorm; rotary; sequential; mixture of gated SiLU experts (softmax, top-k) + sigmoid-gated "
            "shared expert; q/k/v biases"))
