"""Baichuan-13B and Baichuan2-13B (``BaichuanForCausalLM`` with ALiBi, remote code) against an
independent torch reference forward: transformers has no RMSNorm + ALiBi model to serve as the
oracle (Baichuan-7B and Baichuan2's NormHead with rotary are checked against Llama in
test_model_parity: tiny_models ``baichuan_7b``, ``baichuan2_normhead``). Also the rules that
tell the Baichuan checkpoints apart (families/baichuan.py).

The reference follows the remote modeling_baichuan.py of Baichuan-13B / Baichuan2-13B: RMSNorm,
``W_pack`` rows [q | k | v], scores ``q.k / sqrt(d) + slope_h * key_position`` (``_gen_alibi_mask``;
Baichuan2's relative form differs by a per-row constant), slopes from ``_get_interleave``, causal
mask, ``down(silu(gate(x)) * up(x))``, and for Baichuan2 (vocab 125696) ``NormHead``: the
lm_head rows divided by their L2 norm.
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.models.families import map_checkpoint, spec_from_hf_config
from lmidist_jax.models.scoring import prompt_logits
from lmidist_jax.models.weight_map import Transposed

ENGINE = dict(dtype="fp32", max_model_len=256, num_kv_blocks=128, max_rolling_batch_size=4,
              max_rolling_batch_prefill_tokens=64, warmup=False, progress=False)
# Baichuan-13B style (4 heads, vocab 64000 -> 128: Baichuan 1), and Baichuan2-13B style: 6 heads
# (non-power-of-two slopes, as 13B's 40) and Baichuan2's vocabulary 125696 (NormHead).
VARIANTS = {"baichuan_13b": dict(hidden=64, heads=4, vocab=128),
            "baichuan2_13b": dict(hidden=48, heads=6, vocab=125696)}
LAYERS, INTER, EPS = 2, 96, 1e-6


def interleave(n):
    """Baichuan's ``_get_interleave``: the ALiBi slopes of n heads."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    closest = 2 ** math.floor(math.log2(n))
    return interleave(closest) + interleave(2 * closest)[0::2][:n - closest]


def random_weights(hidden, heads, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.1, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g, dtype=torch.float64)

    w = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden, mean=1.0),
         # rows of any scale: Baichuan2's NormHead must normalize them
         "lm_head.weight": rand(vocab, hidden) * (0.5 + 2 * torch.rand(vocab, 1, generator=g, dtype=torch.float64))}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": rand(hidden, mean=1.0),
                  p + "post_attention_layernorm.weight": rand(hidden, mean=1.0),
                  p + "self_attn.W_pack.weight": rand(3 * hidden, hidden),
                  p + "self_attn.o_proj.weight": rand(hidden, hidden),
                  p + "mlp.gate_proj.weight": rand(INTER, hidden), p + "mlp.up_proj.weight": rand(INTER, hidden),
                  p + "mlp.down_proj.weight": rand(hidden, INTER)})
    return w


def reference_logits(w, heads, ids):
    """float64 forward of the whole sequence ``ids`` -> logits [len(ids), vocab]."""
    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight

    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    n, hidden = x.shape
    d = hidden // heads
    pos = torch.arange(n, dtype=torch.float64)
    alibi = torch.tensor(interleave(heads), dtype=torch.float64)[:, None, None] * pos[None, None, :]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        qkv = (h @ w[p + "self_attn.W_pack.weight"].T).chunk(3, -1)  # rows [q | k | v]
        q, k, v = (t.reshape(n, heads, d).transpose(0, 1) for t in qkv)
        s = (q @ k.transpose(1, 2)) / math.sqrt(d) + alibi
        s = s.masked_fill(future, float("-inf"))
        o = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(n, hidden)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w["lm_head.weight"]
    if head.shape[0] == 125696:
        head = torch.nn.functional.normalize(head)
    return (rms(x, w["model.norm.weight"]) @ head.T).numpy()


def reference_greedy(w, heads, prompt, steps=32):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(reference_logits(w, heads, seq)[-1].argmax()))
    return seq[len(prompt):]


def write_checkpoint(directory, w, hidden, heads, vocab):
    save_file({k: v.float().contiguous() for k, v in w.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": heads, "hidden_act": "silu", "model_max_length": 512, "rms_norm_eps": EPS,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
        "torch_dtype": "float32"}))


def prompts():
    rng = np.random.default_rng(2)
    return [list(map(int, rng.integers(0, 128, n))) for n in (5, 17, 40)]


LOGIT_IDS = list(map(int, np.random.default_rng(1).integers(0, 128, 40)))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    sizes = VARIANTS[request.param]
    w = random_weights(**sizes)
    directory = tmp_path_factory.mktemp(request.param)
    write_checkpoint(directory, w, **sizes)
    heads = sizes["heads"]
    expected = (reference_logits(w, heads, LOGIT_IDS), [reference_greedy(w, heads, p) for p in prompts()])
    return request.param, directory, expected


def relative_error(ours, ref):
    return np.linalg.norm(ours - ref) / np.linalg.norm(ref)


def test_alibi_baichuan_matches_reference(variant):
    name, directory, (ref_logits, ref_tokens) = variant
    llm = LLM(str(directory), **ENGINE)
    spec = llm.engine.runner.model.spec
    assert spec.position_type == "alibi" and spec.norm_type == "rms"
    assert relative_error(prompt_logits(llm.engine.runner.model, LOGIT_IDS), ref_logits) < 1e-4, name
    outs = llm.generate(prompts(), SamplingParams(max_new_tokens=32, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == ref_tokens, name


def test_alibi_baichuan_tensor_parallel_two(variant, tmp_path):
    from test_parallel import report_of, run_worker

    name, directory, (ref_logits, ref_tokens) = variant
    spec = {"dirs": {name: str(directory)}, "logit_ids": LOGIT_IDS, "prompts": prompts()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    got = report_of(run_worker(["families", str(tmp_path / "spec.json"), "2"], devices=2), timeout=900)[name]
    assert got["tokens"] == ref_tokens, f"{name} at TP=2"
    assert relative_error(np.array(got["logits"]), ref_logits) < 1e-4, f"{name} at TP=2"


def _config(architecture, hidden, vocab=64000):
    return {"architectures": [architecture], "hidden_size": hidden, "num_attention_heads": 32, "vocab_size": vocab,
            "num_hidden_layers": 1, "intermediate_size": 8, "model_max_length": 4096}


@pytest.mark.parametrize("architecture, hidden, positions", [
    ("BaiChuanForCausalLM", 4096, "rope"),     # Baichuan-7B
    ("BaiChuanForCausalLM", 5120, "rope"),     # the 7B class is always rotary
    ("BaichuanForCausalLM", 4096, "rope"),     # Baichuan2-7B
    ("BaichuanForCausalLM", 5120, "alibi"),    # Baichuan-13B, Baichuan2-13B
])
def test_rotary_or_alibi_rule(architecture, hidden, positions):
    assert spec_from_hf_config(_config(architecture, hidden)).position_type == positions


@pytest.mark.parametrize("vocab, normalized", [(125696, True), (64000, False)])
def test_normhead_only_for_the_baichuan2_vocabulary(vocab, normalized):
    spec = spec_from_hf_config(_config("BaichuanForCausalLM", 5120, vocab))
    head = np.random.default_rng(0).normal(size=(vocab, 4)).astype(np.float32) * 3
    [(path, value)] = list(map_checkpoint(spec, [("lm_head.weight", head)]))
    assert path == ("lm_head", "kernel") and isinstance(value, Transposed)
    rows = np.asarray(value.array)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0 if normalized else np.linalg.norm(head, axis=1),
                               rtol=1e-5)
