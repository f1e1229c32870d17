"""GPT-J: LayerNorm, partial rotary in interleaved (GPT-J) pairs over the first
``rotary_dim`` features of each head, base 10000; parallel residual with ONE shared norm
(``ln_1``); q/k/v/out without biases, MLP ``fc_in``/``fc_out`` with biases; an untied LM
head with a bias."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids
from ..weight_map import WeightMap, linear, norm, part, to
from . import Family, register
from .common import first, refuse

P, L = "transformer.h.{i}", "layers.{i}"


def gptj_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(first(config, "n_embd", "hidden_size"))
    heads = int(first(config, "n_head", "num_attention_heads"))
    head_dim = hidden // heads
    # A tied head would share wte's weight but keep its own bias: the decoder has no such head.
    refuse(bool(config.get("tie_word_embeddings", False)),
           "GPT-J with tie_word_embeddings=true (a tied LM head with a bias) is not supported")
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(first(config, "n_layer", "num_hidden_layers")), num_heads=heads, num_kv_heads=heads,
        head_dim=head_dim, intermediate_size=int(config.get("n_inner") or 4 * hidden),
        max_position_embeddings=int(first(config, "n_positions", "max_position_embeddings", default=2048)),
        norm_type="layer", norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        # modeling_gptj.create_sinusoidal_positions: base 10000, no rope_theta field.
        position_type="rope", rope_theta=10000.0, rotary_dim=int(config.get("rotary_dim") or head_dim),
        rope_interleaved=True,
        mlp_type="plain", activation=config.get("activation_function", "gelu_new"), mlp_bias=True,
        parallel_residual=True, shared_input_norm=True, lm_head_bias=True,
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def gptj_weight_map(spec: ModelSpec) -> WeightMap:
    return WeightMap({
        "transformer.wte.weight": to("embed.embedding"),
        **linear("lm_head", "lm_head"),
        **norm("transformer.ln_f", "final_norm"),
        **norm(f"{P}.ln_1", f"{L}.input_norm"),
        **{f"{P}.attn.{slot}_proj.weight": part(f"{L}.attn.qkv_proj", slot) for slot in "qkv"},
        **linear(f"{P}.attn.out_proj", f"{L}.attn.o_proj"),
        **linear(f"{P}.mlp.fc_in", f"{L}.mlp.up_proj"),
        **linear(f"{P}.mlp.fc_out", f"{L}.mlp.down_proj"),
    }, ignore=[r".*\.attn\.(masked_)?bias"])  # causal-mask buffers of old checkpoints


register(Family(
    name="GPT-J", architectures=("GPTJForCausalLM",), build_spec=gptj_spec, weight_map=gptj_weight_map,
    summary="LayerNorm; partial rotary, interleaved pairs; parallel, one shared norm; plain GeLU-tanh; "
            "LM head bias"))
