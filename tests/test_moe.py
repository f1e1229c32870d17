"""Mixture of experts: routing against transformers' formulas (ties included), the
grouped-matmul kernel (Pallas, interpret mode) against its XLA reference and numpy
(empty experts, padding rows, split K), the expert paths against each other (repeated
experts, padding tokens), the loader's expert stacking, and a tiny Mixtral through
every implementation. Parity with transformers: test_model_parity.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lmidist_jax.models import loader, moe
from lmidist_jax.models.weight_map import Expert, Part, WeightMap, expert, stacked_experts
from lmidist_jax.parallel import make_mesh
from pallas_kernels.grouped_matmul import (
    SHARED_MEMORY_BYTES,
    grouped_matmul,
    grouped_matmul_pallas,
    grouped_matmul_reference,
    pipeline_stages,
    tile_schedule,
)


# ------------------------------------------------------------------------------- routing

def torch_route(logits, top_k, norm):
    """transformers' routers: Mixtral (softmax fp32, topk, / sum), DBRX (/ p-norm),
    Qwen2-MoE without norm_topk_prob (norm None)."""
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float32), dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    if norm is not None:
        top = top / torch.norm(top, p=norm, dim=-1, keepdim=True)
    return top.numpy(), idx.numpy()


@pytest.mark.parametrize("top_k,norm", [(2, 1.0), (4, 1.0), (3, 2.0), (2, None)])
def test_routing_matches_transformers(top_k, norm):
    logits = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32) * 3
    weights, experts = moe.route(jnp.asarray(logits), top_k, norm)
    ref_w, ref_e = torch_route(logits, top_k, norm)
    np.testing.assert_array_equal(np.asarray(experts), ref_e)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-6, atol=1e-7)
    if norm == 1.0:
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def test_routing_ties():
    """Ties inside the chosen set route exactly as transformers (the same experts, equal
    weights). Ties across the k-th place are broken towards the lowest expert index
    (jax.lax.top_k); torch.topk on a CPU picks another tied expert here, a documented
    difference (moe.route): it needs bit-identical router logits."""
    within = np.log(np.array([[0.3, 0.3, 0.3, 0.1], [0.1, 0.4, 0.1, 0.4]], np.float32))
    weights, experts = moe.route(jnp.asarray(within), 3, 1.0)
    ref_w, ref_e = torch_route(within, 3, 1.0)
    for ours, theirs in zip(np.asarray(experts), ref_e):
        assert sorted(ours[:2]) == sorted(theirs[:2]) or sorted(ours) == sorted(theirs)
    np.testing.assert_allclose(np.sort(np.asarray(weights), -1), np.sort(ref_w, -1), rtol=1e-6)
    across = np.zeros((3, 8), np.float32)  # all eight tied (a zero hidden state)
    weights, experts = moe.route(jnp.asarray(across), 2, 1.0)
    np.testing.assert_array_equal(np.asarray(experts), [[0, 1]] * 3)
    np.testing.assert_allclose(np.asarray(weights), 0.5)
    _, torch_experts = torch_route(across, 2, 1.0)
    assert len(set(torch_experts[0])) == 2  # (torch: a different, still distinct pair)


def test_padding_tokens_are_routed_nowhere():
    experts = jnp.array([[1, 3], [3, 1], [0, 0], [2, 3]], jnp.int32)  # token 2 repeats expert 0
    valid = jnp.array([True, False, True, True])
    order, row_token, group_sizes = moe.sort_by_expert(experts, valid, 4)
    np.testing.assert_array_equal(np.asarray(group_sizes), [2, 1, 1, 2])  # token 1 not counted
    assert int(group_sizes.sum()) == 6
    assert set(np.asarray(row_token)[6:]) == {1}  # its pairs sort after every group
    np.testing.assert_array_equal(np.asarray(experts).reshape(-1)[np.asarray(order)][:6], [0, 0, 1, 2, 3, 3])


# ----------------------------------------------------------------------- grouped matmul

def numpy_grouped(lhs, rhs, sizes):
    out, row = np.zeros((lhs.shape[0], rhs.shape[2]), np.float64), 0
    for g, size in enumerate(sizes):
        out[row:row + size] = lhs[row:row + size].astype(np.float64) @ rhs[g].astype(np.float64)
        row += size
    return out


GROUP_CASES = {
    "empty_groups_and_padding": (13, [3, 0, 5, 0, 1]),   # 4 padding rows, two experts without rows
    "one_row_one_expert": (1, [0, 0, 1, 0]),             # batch-1 decode, top-1
    "decode_top2_padded": (16, [0, 1, 0, 1, 0, 0, 0, 0]),  # 2 real rows in a 16-row bucket
    "all_rows_one_group": (40, [0, 40, 0]),
    "nothing_routed": (8, [0, 0, 0]),
    "many_rows": (150, [70, 0, 33, 47]),
}


@pytest.mark.parametrize("case", sorted(GROUP_CASES))
@pytest.mark.parametrize("config", [{}, dict(block_m=16, block_n=16, block_k=16, k_splits=3)])
def test_pallas_grouped_matmul_matches_reference(case, config):
    num_rows, sizes = GROUP_CASES[case]
    rng = np.random.default_rng(len(case))
    lhs = rng.standard_normal((num_rows, 80)).astype(np.float32)
    rhs = rng.standard_normal((len(sizes), 80, 48)).astype(np.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    expected = numpy_grouped(lhs, rhs, sizes)
    ref = grouped_matmul_reference(jnp.asarray(lhs), jnp.asarray(rhs), group_sizes)
    np.testing.assert_allclose(np.asarray(ref), expected, rtol=1e-5, atol=1e-4)
    out = grouped_matmul_pallas(jnp.asarray(lhs), jnp.asarray(rhs), group_sizes, interpret=True, **config)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-4)
    assert not np.asarray(out)[sum(sizes):].any()  # padding rows are zeros
    ragged = grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), group_sizes, impl="ragged_dot")
    np.testing.assert_allclose(np.asarray(ragged), expected, rtol=1e-5, atol=1e-4)


def test_pallas_grouped_matmul_bf16():
    rng = np.random.default_rng(3)
    lhs = jnp.asarray(rng.standard_normal((6, 64)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((4, 64, 32)), jnp.bfloat16)
    sizes = jnp.array([2, 0, 3, 0], jnp.int32)
    out = grouped_matmul_pallas(lhs, rhs, sizes, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = grouped_matmul_reference(lhs, rhs, sizes)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-1)


def test_tile_schedule_reads_only_experts_with_rows():
    group, start, end = tile_schedule(jnp.array([0, 2, 0, 0, 19, 0], jnp.int32), 32, 16)
    group, start, end = map(np.asarray, (group, start, end))
    active = end > start
    assert len(group) == 2 + 6  # cdiv(32, 16) + G
    assert set(group[active]) == {1, 4}  # experts 0, 2, 3, 5 never read
    np.testing.assert_array_equal(np.stack([group, start, end])[:, active], [[1, 4, 4], [0, 2, 18], [2, 18, 21]])
    assert not active[3:].any()  # the active tiles come first
    _, start, end = tile_schedule(jnp.zeros((4,), jnp.int32), 8, 16)
    assert not (np.asarray(end) > np.asarray(start)).any()


def test_pipeline_stages_fit_shared_memory():
    # 64-row bf16 tiles at 256 x 128 need 80 KiB a stage: three stages overflowed the
    # H200's 227 KiB (a compile error at >= 512 tokens); decode's 16-row tiles keep three.
    assert pipeline_stages(64, 256, 128, 2) == 2
    assert pipeline_stages(16, 256, 128, 2) == 3
    for block_m, block_n, block_k, itemsize in [(64, 256, 128, 2), (64, 256, 128, 4), (128, 256, 256, 4)]:
        stages = pipeline_stages(block_m, block_n, block_k, itemsize)
        assert stages >= 1
        assert stages == 1 or stages * (block_m * block_k + block_k * block_n) * itemsize <= SHARED_MEMORY_BYTES


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="unknown grouped-matmul implementation 'cuda'"):
        grouped_matmul(jnp.zeros((2, 4)), jnp.zeros((1, 4, 4)), jnp.array([2]), impl="cuda")
    with pytest.raises(ValueError, match="unknown moe_impl 'fast'"):
        moe.resolve_impl("fast", 4, platform_backend="xla")
    assert moe.resolve_impl("auto", 4, platform_backend="xla") == "dense"
    # On a GPU: the Pallas kernel for decode, ragged_dot in between, Mosaic GPU for large bf16 batches.
    gpu = dict(platform_backend="triton", shape=(4096, 14336))
    assert moe.resolve_impl("auto", 2, **gpu) == "pallas"
    assert moe.resolve_impl("auto", 16, **gpu) == "ragged_dot"
    assert moe.resolve_impl("auto", 128, **gpu) == "ragged_dot"  # batch-64 decode, top-2
    assert moe.resolve_impl("auto", 256, **gpu) == "mosaic_gpu"
    assert moe.resolve_impl("auto", 1024, **gpu) == "mosaic_gpu"
    assert moe.resolve_impl("auto", 1024, platform_backend="triton", dtype=jnp.float32,
                            shape=(4096, 14336)) == "ragged_dot"
    assert moe.resolve_impl("auto", 1024, platform_backend="triton", shape=(64, 48)) == "ragged_dot"
    assert moe.resolve_impl("ragged_dot", 2, platform_backend="xla") == "ragged_dot"


# ------------------------------------------------------------------------- expert paths

def expert_inputs(num_tokens=9, num_experts=4, top_k=2, embed=32, inner=24, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((num_tokens, embed)), jnp.float32)
    w_gate_up = jnp.asarray(rng.standard_normal((num_experts, embed, 2, inner)) * 0.2, jnp.float32)
    w_down = jnp.asarray(rng.standard_normal((num_experts, inner, embed)) * 0.2, jnp.float32)
    weights, experts = moe.route(jnp.asarray(rng.standard_normal((num_tokens, num_experts))), top_k, 1.0)
    return x, weights, experts, w_gate_up, w_down


def numpy_moe(x, weights, experts, valid, w_gate_up, w_down):
    x, w_gate_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate_up, w_down))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        if not valid[t]:
            continue
        for w, e in zip(np.asarray(weights[t]), np.asarray(experts[t])):
            h = np.einsum("h,hci->ci", x[t], w_gate_up[e])
            inner = h[0] / (1 + np.exp(-h[0])) * h[1]
            out[t] += w * inner @ w_down[e]
    return out


@pytest.mark.parametrize("impl", ["dense", "xla", "ragged_dot", "pallas"])
def test_expert_paths_match_numpy_with_padding_and_repeats(impl):
    x, weights, experts, w_gate_up, w_down = expert_inputs()
    experts = experts.at[4].set(jnp.array([2, 2], jnp.int32))  # a token that picks one expert twice
    valid = jnp.array([True] * 6 + [False] * 3)  # three padding tokens (a bucketed step)
    expected = numpy_moe(x, weights, experts, np.asarray(valid), w_gate_up, w_down)
    act = jax.nn.silu
    with jax.default_matmul_precision("highest"):
        if impl == "dense":
            out = moe.dense_experts(x, weights, experts, valid, w_gate_up, w_down, act)
        else:
            out = moe.grouped_experts(x, weights, experts, valid, w_gate_up, w_down, act, impl, interpret=True)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    assert not np.asarray(out)[6:].any()
    # Padding tokens change nothing for the real ones: the same with garbage in their rows.
    x_garbage = x.at[6:].set(1e4)
    if impl != "dense":
        again = moe.grouped_experts(x_garbage, weights, experts, valid, w_gate_up, w_down, act, impl,
                                    interpret=True)
        np.testing.assert_array_equal(np.asarray(again)[:6], np.asarray(out)[:6])


def test_token_mask_follows_the_trash_slot():
    class Md:
        slot_mapping = jnp.array([16, 17, 0, 0], jnp.int32)
    np.testing.assert_array_equal(np.asarray(moe.token_mask(Md, 4)), [True, True, False, False])
    assert bool(moe.token_mask(None, 3).all())


# ---------------------------------------------------------------------- loader stacking

class TinySpec:
    architecture = "test"
    num_experts = 3


def test_stacked_experts_split_rows_and_expert_major_layouts():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((3 * 4, 5))  # DBRX: [E * ffn, d], [out, in] per expert
    emitted = stacked_experts("layers.{i}.mlp.w_gate_up", ("gate",), layout="rows")(w1, TinySpec, {"i": "0"})
    assert [value.index for _, value in emitted] == [0, 1, 2]
    np.testing.assert_array_equal(emitted[1][1].value.array.array, w1[4:8])
    gate_up = rng.standard_normal((3, 8, 5))  # transformers 5: [E, 2I, H]
    emitted = stacked_experts("layers.{i}.mlp.w_gate_up", ("gate", "up"))(gate_up, TinySpec, {"i": "1"})
    assert [(v.index, v.value.slot) for _, v in emitted] == [(0, "gate"), (0, "up"), (1, "gate"), (1, "up"),
                                                            (2, "gate"), (2, "up")]
    np.testing.assert_array_equal(emitted[3][1].value.array.array, gate_up[1, 4:])
    with pytest.raises(ValueError, match="has 2 experts; the model has 3"):
        stacked_experts("x")(np.zeros((2, 4, 4)), TinySpec, {})
    name_map = WeightMap({"m.{i}.e.{j}.w": expert("layers.{i}.w", "up")})
    (path, value), = name_map.map(TinySpec, [("m.3.e.7.w", np.zeros((2, 2)))])
    assert path == ("layers", 3, "w") and value.index == 7 and value.value.slot == "up"


def mixtral_spec(**kw):
    from lmidist_jax.models.spec import ModelSpec

    return ModelSpec(architecture="MixtralForCausalLM", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=2, head_dim=8, intermediate_size=8, max_position_embeddings=64, mlp_type="moe",
                     num_experts=3, num_experts_per_token=2, **kw)


def test_loader_stacks_experts_and_reports_missing_ones():
    spec = mixtral_spec()
    mesh = make_mesh(1)
    model = loader.random_model(spec, dtype=jnp.float32, mesh=mesh)
    params = {path: np.asarray(var[...]) for path, var in loader.variables(model.state).items()}
    rng = np.random.default_rng(1)
    gate = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3)]  # HF [out, in]
    up = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3)]

    def tensors(skip_expert=None):
        yield from loader.parts_of(spec, {p: v for p, v in params.items() if p[-1] != "w_gate_up"}, jnp.float32)
        for j in range(3):
            if j == skip_expert:
                continue
            yield ("layers", 0, "mlp", "w_gate_up"), Expert(j, Part("up", loader.Transposed(up[j])))
            yield ("layers", 0, "mlp", "w_gate_up"), Expert(j, Part("gate", loader.Transposed(gate[j])))

    loaded = loader.load_model(spec, tensors(), dtype=jnp.float32, mesh=mesh)
    stacked = np.asarray(loader.variables(loaded.state)[("layers", 0, "mlp", "w_gate_up")][...])
    assert stacked.shape == (3, 16, 2, 8)
    for j in range(3):
        np.testing.assert_array_equal(stacked[j, :, 0], gate[j].T)
        np.testing.assert_array_equal(stacked[j, :, 1], up[j].T)
    with pytest.raises(ValueError, match=r"missing expert\(s\) 1"):
        loader.load_model(spec, tensors(skip_expert=1), dtype=jnp.float32, mesh=mesh)
    with pytest.raises(ValueError, match="names expert 5; the model has 3"):
        loader.load_model(spec, [(("layers", 0, "mlp", "w_down"), Expert(5, np.zeros((8, 16))))],
                          dtype=jnp.float32, mesh=mesh)
    # A stacked parameter saved whole (the converted cache) loads as it is.
    whole = loader.load_model(spec, loader.parts_of(spec, params, jnp.float32), dtype=jnp.float32, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(loader.variables(whole.state)[("layers", 0, "mlp", "w_down")][...]),
                                  params[("layers", 0, "mlp", "w_down")])


# ---------------------------------------------------------------- a tiny Mixtral, every path

def test_tiny_mixtral_every_impl_gives_the_same_logits(tmp_path):
    from lmidist_jax.models import families
    from lmidist_jax.models.scoring import prompt_logits
    from tiny_models import hf_logits, make_model
    from lmidist_jax import LLM

    hf = make_model(tmp_path, "mixtral_4x")
    llm = LLM(str(tmp_path), dtype="fp32", max_model_len=64, num_kv_blocks=16, warmup=False, progress=False)
    model = llm.engine.runner.model
    ids = list(np.random.default_rng(5).integers(0, 128, 20))
    ref = hf_logits(hf, ids)
    assert isinstance(families.family_of("MixtralForCausalLM"), families.Family)
    for impl in ("dense", "xla", "ragged_dot", "pallas"):
        spec = dataclasses.replace(model.spec, moe_impl=impl)
        graphdef, _ = loader.abstract_model(spec, model.dtype)
        variant = dataclasses.replace(model, spec=spec, graphdef=graphdef)
        ours = prompt_logits(variant, ids)
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert rel < 1e-4, f"{impl}: relative error {rel:.2e}"


def test_tensor_parallel_two_every_impl(tmp_path):
    """TP=2 (experts split by their inner dimension, one psum under shard_map): every
    implementation gives transformers' logits. Greedy tokens at TP=2: test_model_parity."""
    import os
    import subprocess
    import sys

    from test_parallel import report_of

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, os.path.join(here, "moe_tp_worker.py"), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    report = report_of(proc, timeout=600)
    assert report.pop("w_gate_up_spec") == "P(None, None, None, 'tp')"  # every device: a slice of every expert
    for impl, rel in report.items():
        assert rel < 1e-4, f"{impl} at TP=2: relative error {rel:.2e}"
