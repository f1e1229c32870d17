"""The declarative weight maps and fused-parameter assembly: layouts of fused checkpoint
tensors, KV-head replication, and the errors for tensors that do not fit."""

import json

import numpy as np
import pytest
import safetensors.numpy

from lmidist_jax import LLM
from lmidist_jax.models.linear import FusedLayout, assemble_fused, split_fused
from lmidist_jax.models.spec import ModelSpec
from lmidist_jax.models.weight_map import split_qkv_array
from tiny_models import make_model

SPEC = ModelSpec(architecture="x", vocab_size=8, hidden_size=4, num_layers=1, num_heads=4, num_kv_heads=2,
                 head_dim=3, intermediate_size=8, max_position_embeddings=16)


def _rows(heads, name):
    return [f"{name}{h}.{d}" for h in range(heads) for d in range(3)]


def test_split_qkv_layouts():
    """Each packing puts the same q/k/v rows (labelled by head and dim) in the same parts."""
    q, k, v = _rows(4, "q"), _rows(2, "k"), _rows(2, "v")
    concat = np.array(q + k + v)
    grouped = np.array([r for g in range(2) for r in q[6 * g:6 * g + 6] + k[3 * g:3 * g + 3] + v[3 * g:3 * g + 3]])
    for layout, packed in (("concat", concat), ("grouped", grouped)):
        parts = split_qkv_array(packed, layout, SPEC)
        assert [list(parts[s]) for s in "qkv"] == [q, k, v], layout
    mha = ModelSpec(**{**SPEC.__dict__, "num_kv_heads": 4})
    q4, k4, v4 = _rows(4, "q"), _rows(4, "k"), _rows(4, "v")
    per_head = np.array([r for h in range(4) for r in q4[3 * h:3 * h + 3] + k4[3 * h:3 * h + 3] + v4[3 * h:3 * h + 3]])
    parts = split_qkv_array(per_head, "per_head", mha)
    assert [list(parts[s]) for s in "qkv"] == [q4, k4, v4]
    # Along the columns of a Conv1D [in, out] tensor, and a wrong size is an error.
    parts = split_qkv_array(np.stack([concat, concat]), "concat", SPEC, out_axis=1)
    assert list(parts["k"][1]) == k
    with pytest.raises(ValueError, match="fused q/k/v tensor has 23 outputs"):
        split_qkv_array(concat[:-1], "concat", SPEC)


def test_fused_assembly_replicates_kv_heads_and_splits_back():
    kv_heads, group, d = 2, 2, 3
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(5, n * d)) for n in (kv_heads * group, kv_heads, kv_heads))
    layout = FusedLayout(axis=1, parts=(("q", (kv_heads, group, d)), ("k", (kv_heads, 1, d)), ("v", (kv_heads, 1, d))),
                         replicable=("k", "v"))
    fused = assemble_fused({"q": q, "k": k, "v": v}, layout, 1, xp=np)
    assert fused.shape == (5, 2, 4, 3)
    np.testing.assert_array_equal(fused[:, 1, 2], k[:, 3:])  # KV head 1's key follows its two queries
    # TP=4 over 2 KV heads: each KV head twice, each device one query head.
    wide = FusedLayout(axis=1, parts=(("q", (4, 1, d)), ("k", (4, 1, d)), ("v", (4, 1, d))), replicable=("k", "v"))
    replicated = assemble_fused({"q": q, "k": k, "v": v}, wide, 1, xp=np)
    np.testing.assert_array_equal(replicated[:, 0, 1], replicated[:, 1, 1])
    np.testing.assert_array_equal(replicated[:, 2, 1], k[:, 3:])
    back = split_fused(replicated, wide, 1, repeats=2, xp=np)
    for slot, original in (("q", q), ("k", k), ("v", v)):
        np.testing.assert_array_equal(back[slot], original)
    with pytest.raises(ValueError, match="part 'q' has 9 outputs"):
        assemble_fused({"q": q[:, :9], "k": k, "v": v}, layout, 1, xp=np)


def _rewrite_checkpoint(directory, edit):
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(str(path))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(path))


OPTIONS = dict(dtype="fp32", max_model_len=64, num_kv_blocks=16, max_rolling_batch_size=2, warmup=False,
               progress=False)


def test_unmapped_tensor_is_an_error(tmp_path):
    make_model(tmp_path, "llama")
    _rewrite_checkpoint(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", np.zeros(2, np.float32)))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.extra\.weight' has no place in the "
                                         r"LlamaForCausalLM model"):
        LLM(str(tmp_path), **OPTIONS)


def test_missing_part_of_a_fused_parameter_is_an_error(tmp_path):
    make_model(tmp_path, "llama")
    _rewrite_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing the k part\(s\) of layers\.1\.attn\.qkv_proj\.kernel"):
        LLM(str(tmp_path), **OPTIONS)


def test_wrong_shape_of_a_part_is_an_error(tmp_path):
    make_model(tmp_path, "llama")
    _rewrite_checkpoint(tmp_path, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight",
                                                            t["model.layers.0.mlp.up_proj.weight"][:-1]))
    with pytest.raises(ValueError, match=r"part 'up' of layers\.0\.mlp\.gate_up_proj\.kernel has shape"):
        LLM(str(tmp_path), **OPTIONS)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    make_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model architecture MambaForCausalLM") as err:
        LLM(str(tmp_path), **OPTIONS)
    for name in ("GPT2LMHeadModel", "Gemma3ForCausalLM", "FalconForCausalLM", "Phi3ForCausalLM"):
        assert name in str(err.value)
