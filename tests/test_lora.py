"""Many LoRA adapters in one rolling batch: PEFT adapters of several ranks and target sets
on tiny Llama, Qwen2, Mistral and Phi-3 (fused qkv_proj / gate_up_proj checkpoint
tensors) give per prompt the greedy tokens of transformers + PEFT with that adapter
merged; LRU eviction (device slots and host cache) with zero compilations after
warm-up; bad adapters refused without side effects; prefix cache keyed by adapter;
TP=2 equal to TP=1; the Pallas kernels against the XLA reference."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from tiny_models import hf_greedy, make_model

import peft  # noqa: E402  (test-only oracle, pinned in the test extra)

from lmidist_jax import LLM, SamplingParams  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE = dict(dtype="fp32", max_model_len=128, block_size=4, num_kv_blocks=160, max_rolling_batch_size=4,
              max_rolling_batch_prefill_tokens=64, warmup=False, progress=False, enable_lora=True,
              max_loras=2, max_lora_rank=16)
NEW_TOKENS = 12

# family -> two adapters: (rank, lora_alpha, target modules, extra LoraConfig arguments)
ADAPTERS = {
    # q only: must add into the q part of the fused q/k/v kernel and nowhere else.
    "llama": [(8, 8, ["q_proj"], {}),
              (4, 8, ["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {"use_rslora": True})],
    "qwen2": [(16, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               {"alpha_pattern": {"down_proj": 4}}),
              (2, 2, ["v_proj", "down_proj"], {})],
    "mistral": [(8, 16, ["q_proj", "v_proj"], {}), (16, 16, ["gate_proj", "up_proj"], {})],
    # Phi-3's checkpoint fuses q/k/v and gate/up: one A per fused module.
    "phi3": [(8, 8, ["qkv_proj", "o_proj"], {}), (4, 4, ["gate_up_proj", "down_proj"], {"use_rslora": True})],
}


def prompts():
    # No token 0: it is Phi-3's pad token, which transformers' generate() masks out.
    rng = np.random.default_rng(3)
    return [list(map(int, rng.integers(1, 128, n))) for n in (5, 17, 9, 30)]


PROMPT_ADAPTERS = [None, "a1", "a2", "a1"]


def save_adapter(hf, directory, rank, alpha, targets, seed, extra):
    """A random non-zero PEFT LoRA adapter on a copy of ``hf``, saved in ``directory``;
    returns the copy with the adapter merged (the oracle)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                         init_lora_weights=False, **extra))
    model.save_pretrained(str(directory))
    return model.merge_and_unload().eval()


_CASES: dict = {}


def _case(family, tmp_path_factory):
    """(family, directory, oracles by adapter name, expected tokens, LLM with a1/a2), built
    once per module run."""
    if family not in _CASES:
        root = tmp_path_factory.mktemp(f"lora_{family}")
        hf = make_model(root / "base", family)
        oracles = {None: hf}
        for i, (rank, alpha, targets, extra) in enumerate(ADAPTERS[family], 1):
            oracles[f"a{i}"] = save_adapter(hf, root / f"a{i}", rank, alpha, targets, seed=10 * i, extra=extra)
        expected = [hf_greedy(oracles[a], p, NEW_TOKENS) for p, a in zip(prompts(), PROMPT_ADAPTERS)]
        llm = LLM(str(root / "base"), enable_prefix_caching=True, **ENGINE)
        for name in ("a1", "a2"):
            llm.add_adapter(name, str(root / name))
        _CASES[family] = (family, root, oracles, expected, llm)
    return _CASES[family]


@pytest.fixture(scope="module")
def family_case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory):
    return _case("llama", tmp_path_factory)


@pytest.mark.parametrize("family_case", sorted(ADAPTERS), indirect=True)
def test_mixed_adapters_match_transformers_peft(family_case):
    family, root, oracles, expected, llm = family_case
    outs = llm.generate(prompts(), SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False,
                        adapters=PROMPT_ADAPTERS)
    assert [o.token_ids for o in outs] == expected, family
    # Each adapter changes what the base model says on its prompts (the comparison can fail).
    base = [hf_greedy(oracles[None], p, NEW_TOKENS) for p, a in zip(prompts(), PROMPT_ADAPTERS) if a]
    assert base != [e for e, a in zip(expected, PROMPT_ADAPTERS) if a], family


def test_one_adapter_for_all_prompts_and_chat_api(llama_case):
    _, root, oracles, _, llm = llama_case
    ps = prompts()[:2]
    outs = llm.generate(ps, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False,
                        adapters="a2")
    assert [o.token_ids for o in outs] == [hf_greedy(oracles["a2"], p, NEW_TOKENS) for p in ps]
    with pytest.raises(ValueError, match="got 1 adapters for 2 prompts"):
        llm.generate(ps, adapters=["a1"], use_tqdm=False)
    with pytest.raises(ValueError, match="unknown adapter 'nope'; registered adapters: a1, a2"):
        llm.chat([{"role": "user", "content": "hi"}], adapters="nope", use_tqdm=False)


def test_prefix_cache_is_keyed_by_adapter(llama_case):
    _, root, oracles, _, llm = llama_case
    prompt = list(map(int, np.random.default_rng(7).integers(1, 128, 30)))  # 7 full blocks of 4 + 2
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    stats = llm.engine.stats
    computed = []
    for adapter in ("a1", None, "a1", "a2", "a2", None):
        before = stats.num_computed_prompt_tokens
        out = llm.generate([prompt], params, use_tqdm=False, adapters=[adapter])[0]
        assert out.token_ids == hf_greedy(oracles[adapter], prompt, 4), adapter
        computed.append(stats.num_computed_prompt_tokens - before)
    # A cached prefix serves only requests of the same adapter (28 of 30 tokens reused).
    assert computed == [30, 30, 2, 30, 2, 2], computed


def test_pytorch_bin_adapter(llama_case, tmp_path):
    """adapter_model.bin (read with weights_only=True) works like the safetensors file."""
    from safetensors.torch import load_file

    _, root, oracles, expected, llm = llama_case
    directory = tmp_path / "a1_bin"
    directory.mkdir()
    (directory / "adapter_config.json").write_text((root / "a1" / "adapter_config.json").read_text())
    torch.save(load_file(str(root / "a1" / "adapter_model.safetensors")), str(directory / "adapter_model.bin"))
    llm.add_adapter("a1_bin", str(directory))
    try:
        out = llm.generate([prompts()[1]], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
                           use_tqdm=False, adapters="a1_bin")[0]
        assert out.token_ids == expected[1]  # prompt 1 runs with a1 in the parity test
    finally:
        llm.remove_adapter("a1_bin")


def _peft_dir(tmp_path, name, hf, **config):
    """A tampered copy of a valid adapter."""
    directory = tmp_path / name
    save_adapter(hf, directory, 4, 4, ["q_proj"], 0, {})
    if config:
        path = directory / "adapter_config.json"
        data = json.loads(path.read_text())
        data.update(config)
        path.write_text(json.dumps(data))
    return directory


def test_bad_adapters_are_refused_and_change_nothing(llama_case, tmp_path):
    _, root, oracles, expected, llm = llama_case
    hf = oracles[None]
    before = llm.list_adapters()
    corrupt = _peft_dir(tmp_path, "corrupt", hf)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    no_weights = _peft_dir(tmp_path, "noweights", hf)
    os.remove(no_weights / "adapter_model.safetensors")
    big = tmp_path / "big"
    save_adapter(hf, big, 32, 32, ["q_proj"], 0, {})
    embed = tmp_path / "embed"
    save_adapter(hf, embed, 4, 4, ["embed_tokens"], 0, {})
    head = tmp_path / "head"
    save_adapter(hf, head, 4, 4, ["lm_head"], 0, {})
    # PEFT also saves the LM head itself (refused as a full weight); without it, the LoRA
    # matrices of the head are refused on their own.
    from safetensors.numpy import load_file, save_file

    head_only = tmp_path / "head_only"
    head_only.mkdir()
    (head_only / "adapter_config.json").write_text((head / "adapter_config.json").read_text())
    tensors = load_file(str(head / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "lora_" in k}, str(head_only / "adapter_model.safetensors"))
    saved = tmp_path / "modules_to_save"
    save_adapter(hf, saved, 4, 4, ["q_proj"], 0, {"modules_to_save": ["lm_head"]})
    other = make_model(tmp_path / "qwen_base", "qwen2")  # 4 KV heads: k/v do not fit Llama's 2
    wrong_shape = tmp_path / "wrong_shape"
    save_adapter(other, wrong_shape, 4, 4, ["k_proj"], 0, {})
    cases = [
        ("missing", tmp_path / "does_not_exist", "is not a directory"),
        ("noconfig", tmp_path, "has no adapter_config.json"),
        ("corrupt", corrupt, "cannot read"),
        ("noweights", no_weights, "has neither of adapter_model.safetensors, adapter_model.bin"),
        ("big", big, "rank 32, above max_lora_rank=16"),
        ("embed", embed, "embed_tokens.* is (embedding LoRA|a full weight)"),
        ("head", head, "lm_head.* is a full weight"),
        ("head_only", head_only, "'lm_head' is the model's lm_head, which carries no LoRA"),
        ("saved", saved, "modules_to_save"),
        ("wrong_shape", wrong_shape, "does not fit"),
        ("dora", _peft_dir(tmp_path, "dora", hf, use_dora=True), "use_dora"),
        ("prefix", _peft_dir(tmp_path, "prefix", hf, peft_type="PREFIX_TUNING"), "peft_type 'PREFIX_TUNING'"),
        ("a1", root / "a1", "already registered"),
        ("bad/name", root / "a1", "adapter name 'bad/name' is not valid"),
    ]
    for name, path, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.add_adapter(name, str(path))
    assert llm.list_adapters() == before
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        llm.remove_adapter("nope")
    # In use: refused until the request finishes.
    llm.engine.add_request("busy", prompts()[0], SamplingParams(max_new_tokens=2), adapter="a1")
    with pytest.raises(ValueError, match="in use by 1 unfinished request"):
        llm.remove_adapter("a1")
    llm.engine.abort("busy")
    llm.engine.run_until_done()
    outs = llm.generate(prompts(), SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False,
                        adapters=PROMPT_ADAPTERS)
    assert [o.token_ids for o in outs] == expected


def test_lru_eviction_and_no_compilation_after_warmup(llama_case, tmp_path):
    """One device slot and one host copy for three adapters: every switch evicts, host
    misses re-read the directory; after warm-up nothing compiles, also across add/remove."""
    _, root, oracles, _, _ = llama_case
    extra = save_adapter(oracles[None], tmp_path / "a3", 16, 8, ["v_proj", "up_proj"], 30, {})
    oracles = {**oracles, "a3": extra}
    llm = LLM(str(root / "base"), **{**ENGINE, "warmup": True, "max_loras": 1, "max_cpu_loras": 1,
                                     "max_rolling_batch_size": 2, "max_rolling_batch_prefill_tokens": 32})
    for name in ("a1", "a2"):
        llm.add_adapter(name, str(root / name))
    llm.add_adapter("a3", str(tmp_path / "a3"))
    lora = llm.engine.lora
    assert list(lora.host) == ["a3"]  # max_cpu_loras=1
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    ps = prompts()[:3] * 2
    names = ["a1", "a2", "a3", None, "a1", "a3"]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outs = llm.generate(ps, params, use_tqdm=False, adapters=names)
        llm.remove_adapter("a2")
        llm.add_adapter("again", str(root / "a2"))
        again = llm.generate(ps[1:2], params, use_tqdm=False, adapters="again")[0]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f"{len(compiles)} compilations after warm-up"
    assert [o.token_ids for o in outs] == [hf_greedy(oracles[a], p, 6) for p, a in zip(ps, names)]
    assert again.token_ids == hf_greedy(oracles["a2"], ps[1], 6)
    stats = lora.stats
    assert stats.slot_evictions >= 3 and stats.host_evictions >= 3
    assert stats.disk_reads >= 6, stats  # 4 registrations + re-reads of evicted adapters
    assert [a["name"] for a in llm.list_adapters()] == ["a1", "a3", "again"]


def test_scheduler_admits_at_most_max_loras_adapters():
    from lmidist_jax.engine.block_manager import BlockManager
    from lmidist_jax.engine.scheduler import Scheduler
    from lmidist_jax.engine.sequence import Request, Sequence

    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100, max_loras=2)
    order = ["x", "y", None, "z", "x", "y", "z"]
    for i, name in enumerate(order):
        req = Request(f"r{i}", None, [1, 2, 3], SamplingParams(), adapter=name, adapter_uid=None)
        sched.add(Sequence(i, req, 0, [1, 2, 3], seed=0))
    out = sched.schedule()
    got = [item.seq.request.adapter for item in out.scheduled]
    assert got == ["x", "y", None, "x", "y"]
    assert [s.request.adapter for s in sched.waiting] == ["z", "z"]  # kept, in order


def test_pallas_lora_kernels_match_reference():
    from pallas_kernels.lora import lora_expand, lora_expand_pallas, lora_shrink, lora_shrink_pallas

    rng = np.random.default_rng(0)
    num_slots, in_features, rank, out_features, tokens = 4, 64, 16, 256, 13
    x = rng.standard_normal((tokens, in_features), np.float32)
    a = rng.standard_normal((num_slots, in_features, rank), np.float32)
    b = rng.standard_normal((num_slots, rank, out_features), np.float32)
    a[0], b[0] = 0, 0
    slots = rng.integers(0, num_slots, tokens).astype(np.int32)
    h_ref = lora_shrink(x, a, slots)
    h = lora_shrink_pallas(x, a, slots, interpret=True)
    np.testing.assert_allclose(h, h_ref, rtol=1e-4, atol=1e-4)
    expected = np.einsum("ti,tir,tro->to", x, a[slots], b[slots])
    np.testing.assert_allclose(lora_expand(h_ref, b, slots, np.float32), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(lora_expand_pallas(h, b, slots, np.float32, interpret=True), expected,
                               rtol=1e-4, atol=1e-3)


def test_tensor_parallel_two_matches_transformers_peft(tmp_path):
    """Llama with one KV head (replicated at TP=2) and adapters on q/k/v/o/gate/up/down,
    at TP=2 on two CPU devices: the greedy tokens of transformers + PEFT."""
    hf = make_model(tmp_path / "base", "llama3")
    oracles = {None: hf,
               "a1": save_adapter(hf, tmp_path / "a1", 8, 16, ["k_proj", "v_proj", "o_proj"], 1, {}),
               "a2": save_adapter(hf, tmp_path / "a2", 4, 4, ["q_proj", "gate_proj", "down_proj"], 2, {})}
    spec = {"base": str(tmp_path / "base"), "adapters": {n: str(tmp_path / n) for n in ("a1", "a2")},
            "prompts": prompts(), "names": PROMPT_ADAPTERS, "new_tokens": NEW_TOKENS, "engine": ENGINE}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "lora_tp_worker.py"), str(tmp_path / "spec.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("REPORT "))[len("REPORT "):])
    assert report["tp"] == 2
    expected = [hf_greedy(oracles[a], p, NEW_TOKENS) for p, a in zip(prompts(), PROMPT_ADAPTERS)]
    assert report["tokens"] == expected
