"""Pre-quantized checkpoints (AWQ, GPTQ, SqueezeLLM; tests/quant_formats.py writes them)
against transformers running the dequantized model, at TP=1 and TP=2; the W4A16 Pallas
kernel (interpret mode) against its XLA reference; the startup errors."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converters import quantized_checkpoint
from lmidist_jax import LLM, SamplingParams
from lmidist_jax.models import quantized
from lmidist_jax.models.scoring import prompt_logits
from pallas_kernels import w4a16
from quant_formats import AWQ_ORDER, make_quantized, pack_along_input, pack_along_output
from tiny_models import hf_greedy, hf_logits, make_model

ENGINE = dict(dtype="fp32", max_model_len=128, num_kv_blocks=64, max_rolling_batch_size=4,
              max_rolling_batch_prefill_tokens=64, warmup=False, progress=False)
NEW_TOKENS = 16
# Equal lengths: the teacher-forced check then compiles one forward pass per variant.
PROMPTS = [[int(t) for t in np.random.default_rng(seed).integers(0, 128, 12)] for seed in (3, 4)]

# name -> (family, make_quantized options). Together: GPTQ group 32/64/128/-1, desc_act
# on/off, sym/asym, both checkpoint formats, 8-bit; AWQ 64/128; SqueezeLLM; Llama, Qwen2.
VARIANTS = {
    "llama_gptq_g32_act_asym": ("llama", dict(method="gptq", group_size=32, desc_act=True, sym=False)),
    "llama_gptq_g64_sym": ("llama", dict(method="gptq", group_size=64)),
    "llama_gptq_ch_asym": ("llama", dict(method="gptq", group_size=-1, sym=False)),
    "llama_gptq8_g64_asym": ("llama", dict(method="gptq", bits=8, group_size=64, sym=False)),
    "qwen2_gptq_g128_act_asym": ("qwen2", dict(method="gptq", group_size=128, desc_act=True, sym=False)),
    "qwen2_gptq_g32_asym_v2": ("qwen2", dict(method="gptq", group_size=32, sym=False, checkpoint_format="gptq_v2")),
    "llama_awq_g64": ("llama", dict(method="awq", group_size=64)),
    "qwen2_awq_g128": ("qwen2", dict(method="awq", group_size=128)),
    "llama_squeezellm": ("llama", dict(method="squeezellm")),
    "qwen2_squeezellm": ("qwen2", dict(method="squeezellm")),
}
# Through the whole engine (rolling batch, decode steps) at TP=1; every variant is checked
# teacher-forced below (one forward pass: cheaper to compile). The TP=2 test runs three
# more through the engine.
ENGINE_VARIANTS = ["llama_gptq_g32_act_asym"]
# The Pallas kernel (interpret mode) inside the whole model, against the XLA path: the
# codebook (T = 16: both paths) and act-order group 32 (T = 4: the CUDA-core path); the
# per-shard TP=2 test runs group 128 with act-order.
KERNEL_VARIANTS = ["qwen2_squeezellm", "llama_gptq_g32_act_asym"]
# TP=2 (one subprocess): act-order rows split over devices, one KV head replicated (MQA),
# AWQ with Qwen2's q/k/v biases, the codebook.
TP2_VARIANTS = {"llama_mqa_gptq_g128_act_asym": ("llama", dict(method="gptq", group_size=128, desc_act=True,
                                                               sym=False, num_key_value_heads=1)),
                "qwen2_awq_g64": ("qwen2", dict(method="awq", group_size=64)),
                "llama_squeezellm": VARIANTS["llama_squeezellm"]}

TP2_SHARDING = {"attn.qkv_proj": "(None, 'tp')", "mlp.gate_up_proj": "(None, None, 'tp')",
                "attn.o_proj": "('tp',)", "mlp.down_proj": "('tp',)"}


def quantized_dir(tmp_path_factory, name, family, options):
    directory = tmp_path_factory.mktemp(name)
    return directory, make_quantized(directory, family, **options)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    family, options = VARIANTS[request.param]
    directory, hf = quantized_dir(tmp_path_factory, request.param, family, options)
    return request.param, options, hf, LLM(str(directory), **ENGINE), directory


def test_greedy_tokens_and_logits_match_the_dequantized_model(variant, monkeypatch):
    """The method is detected (quantize unset); teacher-forced on transformers' 16 greedy
    tokens, our argmax at every step is its token, and the logits agree."""
    name, options, hf, llm, directory = variant
    model = llm.engine.runner.model
    assert model.spec.linear_kind.startswith(options["method"] + "-"), model.spec.linear_kind
    assert model.state["layers"][0]["attn"]["qkv_proj"]["qweight"][...].dtype == jnp.int32
    for prompt in PROMPTS:
        expected = hf_greedy(hf, prompt, NEW_TOKENS)
        ids = prompt + expected
        ours = prompt_logits(model, ids)
        ref = hf_logits(hf, ids)
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert rel < 1e-5, f"{name}: relative error {rel:.1e}"
        assert ours[len(prompt) - 1:-1].argmax(-1).tolist() == expected, name
    if name in ENGINE_VARIANTS:
        outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
        assert [o.token_ids for o in outs] == [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS], name
    if name in KERNEL_VARIANTS:
        check_pallas_kernel_in_model(directory, model, monkeypatch)


KERNEL_TP2_VARIANT = "llama_mqa_gptq_g128_act_asym"


@pytest.fixture(scope="module", autouse=True)
def tp2_workers(request, tmp_path_factory):
    """The two TP=2 subprocesses, started with the module's first test when their tests
    are to run: they run while this process runs the TP=1 tests."""
    from test_parallel import HERE, WORKER, BackgroundWorker, selected

    workers = {}
    if selected(request, "test_tensor_parallel_two_matches_transformers"):
        dirs, models = {}, {}
        for name, (family, options) in TP2_VARIANTS.items():
            directory, models[name] = quantized_dir(tmp_path_factory, name, family, options)
            dirs[name] = str(directory)
        spec_dir = tmp_path_factory.mktemp("tp2")
        (spec_dir / "spec.json").write_text(json.dumps({"dirs": dirs, "logit_ids": PROMPTS[1], "prompts": PROMPTS}))
        workers["families"] = (BackgroundWorker([WORKER, "families", str(spec_dir / "spec.json"), "2"], 2, spec_dir),
                               models)
    if selected(request, "test_pallas_kernel_per_shard_at_tensor_parallel_two"):
        directory, hf = quantized_dir(tmp_path_factory, KERNEL_TP2_VARIANT + "_kernel", *TP2_VARIANTS[KERNEL_TP2_VARIANT])
        ids = PROMPTS[0] + hf_greedy(hf, PROMPTS[0], NEW_TOKENS)
        workers["kernel"] = (BackgroundWorker([os.path.join(HERE, "quant_tp_worker.py"), str(directory), "2",
                                               json.dumps(ids)], 2, tmp_path_factory.mktemp("kernel_tp2"),
                                              extra_env={"LMIDIST_QUANT_IMPL": "pallas_interpret"}), hf, ids)
    yield workers
    for worker, *_ in workers.values():
        worker.close()


def test_tensor_parallel_two_matches_transformers(tp2_workers):
    """TP2_VARIANTS at TP=2 on two CPU devices: transformers' 32 greedy tokens, packed
    weights sharded as the dense ones would be."""
    worker, models = tp2_workers["families"]
    ids = PROMPTS[1]
    expected = {name: (hf_logits(hf, ids), [hf_greedy(hf, p, 32) for p in PROMPTS]) for name, hf in models.items()}
    report = worker.report()
    for name, (ref_logits, ref_tokens) in expected.items():
        assert report[name]["tokens"] == ref_tokens, f"{name} at TP=2"
        rel = np.linalg.norm(np.array(report[name]["logits"]) - ref_logits) / np.linalg.norm(ref_logits)
        assert rel < 1e-5, f"{name} at TP=2: relative error {rel:.1e}"
        # Column-parallel along the output, row-parallel along the packed input rows and groups.
        shardings = report[name]["shardings"]
        for proj, spec in TP2_SHARDING.items():
            for leaf in ("qweight", "scales", "zeros", "lut"):
                if f"{proj}.{leaf}" in shardings:
                    want = "(None, None)" if leaf == "lut" and spec == "('tp',)" else spec  # replicated codebook
                    assert shardings[f"{proj}.{leaf}"] == want, (name, proj, leaf, shardings)
        assert f"attn.o_proj.{'lut' if 'squeeze' in name else 'scales'}" in shardings


def test_pallas_kernel_per_shard_at_tensor_parallel_two(tp2_workers):
    """The kernel (interpret mode) inside shard_map at TP=2: column-parallel q/k/v and
    gate/up on their output slices, row-parallel o and down on their rows and groups
    (psum), act-order, one KV head replicated; teacher-forced on transformers' tokens
    (the tensor-core path), and a 4-token forward (the CUDA-core path)."""
    worker, hf, ids = tp2_workers["kernel"]
    prompt = PROMPTS[0]
    report = worker.report()
    assert report["kind"].endswith("-pallas_interpret64-tp2"), report["kind"]
    ours, ref = np.array(report["logits"]), hf_logits(hf, ids)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5
    assert ours[len(prompt) - 1:-1].argmax(-1).tolist() == ids[len(prompt):]
    ours4 = np.array(report["logits4"])
    assert np.linalg.norm(ours4 - ref[:4]) / np.linalg.norm(ref[:4]) < 1e-5


def check_pallas_kernel_in_model(directory, model, monkeypatch):
    """The decoder with the Pallas kernel (interpret mode) in every quantized projection
    gives the XLA path's logits (fused q/k/v with biases and gate/up, the codebook): a
    4-token forward (the CUDA-core path) and the whole sequence (the tensor-core path
    where the layout allows it); the kernel must have run in every projection."""
    from converters.checkpoint import load_config
    from lmidist_jax.models.families import spec_from_hf_config
    from lmidist_jax.models.loader import load_model

    hf_config = load_config(directory)
    config = dataclasses.replace(quantized.detect(directory, hf_config), impl="pallas_interpret")
    spec = dataclasses.replace(spec_from_hf_config(hf_config), linear_kind=quantized.register(config))
    tensors = quantized.checkpoint_tensors(directory, "auto", config, progress=False)
    kernel_model = load_model(spec, quantized.map_checkpoint(spec, tensors, config), dtype=jnp.float32,
                              mesh=model.mesh)
    paths = []
    kernel = w4a16.quant_matmul_pallas

    def counted(x, *args, tile_words, **kwargs):
        paths.append(w4a16.default_config(x.shape[0], args[0].shape[0], args[0].shape[1], tile_words).path)
        return kernel(x, *args, tile_words=tile_words, **kwargs)

    monkeypatch.setattr(w4a16, "quant_matmul_pallas", counted)
    tensor_cores = config.tile_words(spec.hidden_size) >= 16  # else longer inputs take the XLA path
    for ids, path in ((PROMPTS[1][:4], "gemv"), (PROMPTS[1], "mma"))[:2 if tensor_cores else 1]:
        paths.clear()
        ref = prompt_logits(model, ids)
        got = prompt_logits(kernel_model, ids)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
        assert paths == [path] * spec.num_layers * 4, paths  # q/k/v, o, gate/up, down


# -- the kernel ----------------------------------------------------------------------------


def _random_grouped(rng, m, k, n, group, bits, tile):
    groups = k // group
    q = rng.integers(0, 1 << bits, (k, n))
    scales = rng.random((groups, n)).astype(np.float32) + 0.1
    zeros = rng.integers(0, 1 << bits, (groups, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    dense = (q - np.repeat(zeros, group, 0)) * np.repeat(scales, group, 0)
    return x, jnp.asarray(w4a16.pack_rows(q, bits, tile)), scales, zeros, dense


def test_packed_layout():
    """Tiles of P*T rows inside one group; plane j of a tile holds rows j*T .. j*T + T - 1;
    T = 1 is GPTQ's own packing. The magic float of each plane gives q exactly."""
    assert [w4a16.tile_words_for(g, 4) for g in (128, 64, 96, 40, 4, 4096)] == [16, 8, 4, 1, 1, 16]
    assert [w4a16.tile_words_for(g, 8) for g in (128, 32, 12)] == [16, 8, 1]
    rng = np.random.default_rng(0)
    for bits, tile in ((4, 1), (4, 2), (4, 16), (8, 4)):
        q = rng.integers(0, 1 << bits, (32 * 32 // bits, 24))
        packed = w4a16.pack_rows(q, bits, tile)
        assert np.array_equal(np.asarray(w4a16.unpack_rows(jnp.asarray(packed), bits, tile)), q)
    q = rng.integers(0, 16, (128, 3))
    assert np.array_equal(w4a16.pack_rows(q, 4, 1), pack_along_input(q, 4))   # GPTQ's order
    word = (np.asarray(w4a16.pack_rows(q, 4, 16))[:1, :1] >> 4) & 0xF            # word 0, plane 1
    assert word[0, 0] == q[16, 0]
    for bits in (4, 8):
        for j, (shifted, p) in enumerate(w4a16.plane_positions(bits)):
            values = np.arange(1 << bits, dtype=np.uint32) << np.uint32(p)
            f = (values | np.uint32(w4a16.magic_words(bits)[j])).view(np.float32) - np.float32(2.0 ** (23 - p))
            assert np.array_equal(f, np.arange(1 << bits)), (bits, j)
            assert p + bits <= 23 and shifted == (bits * j + bits > 23)


GEMV, MMA = w4a16.KernelConfig(path="gemv"), w4a16.KernelConfig(path="mma")


@pytest.mark.parametrize("m,k,n,group,bits,config", [
    (1, 256, 128, 128, 4, None),
    (3, 512, 64, 64, 4, dataclasses.replace(GEMV, block_n=32, tiles_per_step=1, k_splits=2)),
    (2, 384, 64, 96, 4, dataclasses.replace(GEMV, k_splits=2, reduce="partials")),
    (w4a16.GEMV_MAX_M, 256, 64, -1, 4, None),
    (w4a16.GEMV_MAX_M + 1, 256, 128, 128, 4, None),
    (16, 512, 64, 128, 4, dataclasses.replace(MMA, block_n=32, k_splits=2)),
    (17, 256, 64, 128, 4, dataclasses.replace(MMA, tiles_per_step=1, k_splits=2, reduce="partials")),
    (1, 512, 64, 128, 8, None),
    (8, 512, 64, 64, 8, None)])
def test_grouped_kernel_matches_reference(m, k, n, group, bits, config):
    """Interpret-mode Pallas kernel == XLA reference == numpy: both paths and M at their
    switch, groups of one tile, several tiles and within a tile (96 rows: T = 4), per
    channel, split K with atomic adds and with partials, 8 bits."""
    tile = w4a16.tile_words_for(k if group == -1 else group, bits)
    x, qweight, scales, zeros, dense = _random_grouped(np.random.default_rng(m + k), m, k, n,
                                                       k if group == -1 else group, bits, tile)
    want = x @ dense
    args = (jnp.asarray(x), qweight, jnp.asarray(scales), jnp.asarray(zeros))
    ref = w4a16.quant_matmul_reference(*args, bits=bits, tile_words=tile)
    got = w4a16.quant_matmul_pallas(*args, bits=bits, tile_words=tile, config=config, interpret=True)
    expected_path = (config or w4a16.default_config(m, k * bits // 32, n, tile)).path
    assert expected_path == ("gemv" if m <= w4a16.GEMV_MAX_M else "mma")
    scale = np.abs(want).max()
    assert np.abs(np.asarray(ref) - want).max() / scale < 1e-5
    assert np.abs(np.asarray(got) - want).max() / scale < 1e-5


def test_bf16_kernel_and_unsupported_layouts():
    """bf16 activations and scales (as on the GPU) within bf16 rounding of the reference;
    a layout the kernel cannot take is named."""
    x, qweight, scales, zeros, dense = _random_grouped(np.random.default_rng(9), 2, 256, 64, 128, 4, 16)
    args = (jnp.asarray(x, jnp.bfloat16), qweight, jnp.asarray(scales, jnp.bfloat16), jnp.asarray(zeros, jnp.bfloat16))
    ref = np.asarray(w4a16.quant_matmul_reference(*args, tile_words=16), np.float32)
    got = np.asarray(w4a16.quant_matmul_pallas(*args, tile_words=16, interpret=True), np.float32)
    assert got.dtype == np.float32 and np.abs(got - ref).max() / np.abs(ref).max() < 1e-2
    assert not w4a16.kernel_supports(1, 64, 1) and not w4a16.kernel_supports(8, 64, 8)
    assert w4a16.kernel_supports(4, 64, 8) and w4a16.kernel_supports(64, 64, 16)
    with pytest.raises(ValueError, match="path=mma needs tiles of >= 16 words"):
        w4a16.quant_matmul_pallas(*args, tile_words=8, config=MMA, interpret=True)


@pytest.mark.parametrize("m,config", [(1, None), (7, dataclasses.replace(MMA, tiles_per_step=1, k_splits=2))])
def test_codebook_kernel_matches_reference(m, config):
    rng = np.random.default_rng(m)
    k, n = 256, 64
    q = rng.integers(0, 16, (k, n))
    lut = rng.standard_normal((16, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = x @ np.take_along_axis(lut, q, 0)
    qweight = jnp.asarray(w4a16.pack_rows(q, 4, 16))
    ref = w4a16.lut_matmul_reference(jnp.asarray(x), qweight, jnp.asarray(lut), tile_words=16)
    got = w4a16.quant_matmul_pallas(jnp.asarray(x), qweight, lut=jnp.asarray(lut), tile_words=16, config=config,
                                    interpret=True)
    assert np.abs(np.asarray(ref) - want).max() / np.abs(want).max() < 1e-5
    assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-5


def test_awq_and_gptq_packings_read_back():
    """The readers invert the tools' packings: AWQ's interleaved nibble order along the
    output, GPTQ's zeros stored minus one with the borrow across a packed word; the
    qweight comes out in the kernel's tile order."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 16, (4, 32))
    assert np.array_equal(quantized_checkpoint.unpack_cols(pack_along_output(values, 4, AWQ_ORDER), 4, AWQ_ORDER),
                          values)
    assert not np.array_equal(quantized_checkpoint.unpack_cols(pack_along_output(values, 4, AWQ_ORDER), 4), values)
    assert np.array_equal(quantized_checkpoint.unpack_rows(pack_along_input(values.T.copy(), 4), 4), values.T)
    zeros = np.zeros((1, 8), np.int64)  # zero point 0 everywhere: every nibble borrows
    stored = (pack_along_output(zeros, 4).view(np.uint32) - np.uint32(0x11111111)).view(np.int32)
    tensors = {"qweight": np.zeros((1, 8), np.int32), "qzeros": stored, "scales": np.ones((1, 8), np.float16)}
    config = quantized.QuantConfig("gptq", group_size=-1)
    assert np.array_equal(quantized_checkpoint.convert_module("m", tensors, config)["zeros"], np.zeros((1, 8)))
    q = rng.integers(0, 16, (256, 8))
    tensors = {"qweight": pack_along_input(q, 4), "qzeros": pack_along_output(np.zeros((2, 8), np.int64), 4),
               "scales": np.ones((2, 8), np.float16)}
    config = quantized.QuantConfig("gptq", group_size=128, checkpoint_format="gptq_v2")
    packed = quantized_checkpoint.convert_module("m", tensors, config)["qweight"]
    assert np.array_equal(packed, w4a16.pack_rows(q, 4, 16))


# -- errors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    directory, _ = quantized_dir(tmp_path_factory, "gptq_errors", "llama", dict(method="gptq", group_size=128))
    return directory


def _copy_with(tmp_path, source, *, config_edit=None, drop=None):
    for f in os.listdir(source):
        if f != "model.safetensors":
            with open(os.path.join(source, f), "rb") as src, open(tmp_path / f, "wb") as dst:
                dst.write(src.read())
    tensors = load_file(os.path.join(source, "model.safetensors"))
    if drop:
        del tensors[drop]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    if config_edit:
        config = json.loads((tmp_path / "config.json").read_text())
        config_edit(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_contradicting_quantize_option_is_refused(gptq_dir, tmp_path):
    with pytest.raises(ValueError, match="option.quantize=awq contradicts the checkpoint .* quantized with gptq"):
        LLM(str(gptq_dir), quantize="awq", **ENGINE)
    make_model(tmp_path, "llama")
    with pytest.raises(ValueError, match="option.quantize=gptq but .* is not a quantized checkpoint"):
        LLM(str(tmp_path), quantize="gptq", **ENGINE)


def test_missing_scales_is_refused(gptq_dir, tmp_path):
    bad = _copy_with(tmp_path, gptq_dir, drop="model.layers.1.mlp.down_proj.scales")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj has g_idx, qweight, qzeros but no scales"):
        LLM(str(bad), **ENGINE)


def test_group_size_must_divide_each_devices_inputs(gptq_dir):
    from converters.checkpoint import load_config
    from lmidist_jax.models.families import spec_from_hf_config

    config = load_config(gptq_dir)
    spec = spec_from_hf_config(config)
    quantized.configure(spec, gptq_dir, config, None, 2, platform="cpu")  # o: 256 / 2 = 128 inputs each
    with pytest.raises(ValueError, match=r"group_size=128 does not divide the 64 inputs each of 4 devices holds of o"):
        quantized.configure(spec, gptq_dir, config, None, 4, platform="cpu")


def test_unsupported_bits_are_refused(gptq_dir, tmp_path):
    bad = _copy_with(tmp_path, gptq_dir, config_edit=lambda c: c["quantization_config"].update(bits=3))
    with pytest.raises(ValueError, match="3-bit gptq is not supported; supported bits for gptq: 4, 8"):
        LLM(str(bad), **ENGINE)


def test_detection_sources_and_unsupported_formats(tmp_path):
    """AutoGPTQ's quantize_config.json and SqueezeLLM's quant_config.json are read when
    config.json has no quantization_config; formats we cannot run are named."""
    assert quantized.detect(tmp_path, {}) is None
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64, "desc_act": True}))
    assert quantized.detect(tmp_path, {}) == quantized.QuantConfig("gptq", 4, 64, act_order=True)
    os.remove(tmp_path / "quantize_config.json")
    (tmp_path / "quant_config.json").write_text(json.dumps({"wbits": 4}))
    assert quantized.detect(tmp_path, {}).method == "squeezellm"
    for qc, message in [({"quant_method": "awq", "version": "gemv"}, "version='gemv' is not supported; accepted: gemm"),
                        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "accepted: gptq, gptq_v2"),
                        ({"quant_method": "fp8"}, "quant_method='fp8' is not supported; accepted: awq, gptq, squeezellm")]:
        with pytest.raises(ValueError, match=message):
            quantized.detect(tmp_path, {"quantization_config": qc})
