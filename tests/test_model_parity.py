"""Our decoder vs transformers on tiny random checkpoints of every family variant
(tests/tiny_models.py lists them and what each covers), at TP=1 and TP=2."""

import json

import numpy as np
import pytest

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.models.scoring import prompt_logits
from tiny_models import ALL_FAMILIES, UNSUPPORTED, hf_greedy, hf_logits, make_model

PROMPT_LEN = 40  # longer than the sliding windows (8) and llama3's original context (32)
# HF Falcon rounds each ALiBi slope and each slope x key position to bfloat16 (also in a
# float32 model); we keep them in float32, as vLLM does. With 12 heads the slopes are not
# powers of two and the rounding shows (2e-3 at 40 tokens); with 4 or 8 heads it is exact.
TOLERANCE = {"falcon_rw_alibi_12h": 5e-3}
VARIANTS = sorted(set(ALL_FAMILIES) - set(UNSUPPORTED))
# TP=2 runs one or two variants per family (those with the most to get wrong under
# sharding: MQA/GQA with replicated KV heads, fused packings, ALiBi, norms over all heads);
# every variant against transformers at TP=1 above. Keeps the suite within its time.
TP2_VARIANTS = ["llama3", "qwen2", "internlm", "gemma2", "gemma3_1b", "gpt2", "starcoder_mqa", "starcoder2",
                "neox", "phi_qkln", "phi3_window", "falcon7b_mqa", "falcon40b_newarch", "falcon_rw_alibi",
                "gptj", "glm_mqa_tied", "qwen_partial_tied", "internlm2_mqa_linear", "chatglm", "opt_350m",
                "bloom_6h", "mpt_remote_qkln", "baichuan2_normhead", "decilm",
                "mixtral_8x", "dbrx", "qwen2_moe"]
ENGINE = dict(dtype="fp32", max_model_len=256, num_kv_blocks=128, max_rolling_batch_size=4,
              max_rolling_batch_prefill_tokens=64, warmup=False, progress=False)


def prompts():
    rng = np.random.default_rng(2)
    return [list(map(int, rng.integers(0, 128, n))) for n in (5, 17, PROMPT_LEN)]


def logit_ids():
    return list(map(int, np.random.default_rng(1).integers(0, 128, PROMPT_LEN)))


class References:
    """Each variant's checkpoint and transformers' outputs on it (logits of logit_ids(), 32
    greedy tokens of each of prompts()), made once for the TP=1 and the TP=2 tests alike:
    transformers' generate() costs more than our engine's run on these models."""

    def __init__(self, root):
        self.root, self.made, self.models = root, {}, {}

    def directory(self, family):
        """The checkpoint alone (transformers' outputs are made on first use)."""
        if family not in self.models and family not in self.made:
            self.models[family] = make_model(self.root / family, family)
        return str(self.root / family)

    def __getitem__(self, family):
        if family not in self.made:
            directory = self.directory(family)
            hf = self.models.pop(family)
            self.made[family] = (directory, hf_logits(hf, logit_ids()), [hf_greedy(hf, p, 32) for p in prompts()])
        return self.made[family]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return References(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module", autouse=True)
def tp2_worker(request, references, tmp_path_factory):
    """The TP=2 subprocess, started with the module's first test when the TP=2 test is to
    run: it runs while this process runs the TP=1 tests."""
    from test_parallel import WORKER, BackgroundWorker, selected

    if not selected(request, "test_tensor_parallel_two_matches_transformers"):
        yield None
        return
    directory = tmp_path_factory.mktemp("tp2")
    spec = {"dirs": {f: references.directory(f) for f in TP2_VARIANTS}, "logit_ids": logit_ids(), "prompts": prompts()}
    (directory / "spec.json").write_text(json.dumps(spec))
    worker = BackgroundWorker([WORKER, "families", str(directory / "spec.json"), "2"], 2, directory)
    yield worker
    worker.close()


@pytest.fixture(scope="module", params=VARIANTS)
def family_model(request, references):
    directory, ref_logits, ref_tokens = references[request.param]
    return request.param, ref_logits, ref_tokens, LLM(directory, **ENGINE)


def test_logits_and_greedy_tokens_match_transformers(family_model):
    family, ref, ref_tokens, llm = family_model
    ours = prompt_logits(llm.engine.runner.model, logit_ids())
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < TOLERANCE.get(family, 1e-4), f"{family}: relative error {rel:.2e}"
    # Three prompts in one rolling batch (chunked: the prefill budget is 64 tokens).
    outs = llm.generate(prompts(), SamplingParams(max_new_tokens=32, ignore_eos=True), use_tqdm=False)
    for expected, out in zip(ref_tokens, outs):
        assert out.token_ids == expected, family
        assert out.finish_reason == "length"


def test_tensor_parallel_two_matches_transformers(references, tp2_worker):
    """TP2_VARIANTS at TP=2 on CPU devices (one subprocess for all of them, started with
    the module): the same greedy tokens as transformers, and logits within the same tolerance."""
    assert set(TP2_VARIANTS) <= set(VARIANTS)
    expected = {family: references[family][1:] for family in TP2_VARIANTS}
    report = tp2_worker.report(timeout=1200)
    for family in TP2_VARIANTS:
        ref_logits, ref_tokens = expected[family]
        got = report[family]
        assert got["tokens"] == ref_tokens, f"{family} at TP=2"
        rel = np.linalg.norm(np.array(got["logits"]) - ref_logits) / np.linalg.norm(ref_logits)
        assert rel < TOLERANCE.get(family, 1e-4), f"{family} at TP=2: relative error {rel:.2e}"
    # The decode step's communication: at most two all-reduces per layer (fewer where XLA
    # combines a parallel block's attention and MLP partial sums) plus the embedding's,
    # and one all-gather of the logits for the sampler; nothing else.
    # MPT's qk LayerNorm normalizes q and k over all heads: its mean/variance reductions
    # cross the head shards (three more all-reduces per layer as XLA combines them).
    per_layer = {"mpt_remote_qkln": 5}
    unexpected = {}
    for family in TP2_VARIANTS:
        got = report[family]
        collectives, limit = got["collectives"], per_layer.get(family, 2) * got["num_layers"] + 1
        if (set(collectives) != {"all-reduce", "all-gather"} or collectives["all-gather"] != 1
                or collectives["all-reduce"] > limit):
            unexpected[family] = collectives
    assert unexpected == {}, unexpected


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_variant_is_refused_clearly(tmp_path, family):
    make_model(tmp_path, family)
    with pytest.raises(ValueError, match=UNSUPPORTED[family]):
        LLM(str(tmp_path), **ENGINE)
