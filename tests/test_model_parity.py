"""Our decoder vs transformers on tiny random checkpoints of each Llama-family variant."""

import numpy as np
import pytest

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.models.scoring import prompt_logits
from tiny_models import FAMILIES, hf_greedy, hf_logits, make_model

PROMPT_LEN = 40  # longer than the mistral sliding window (8) and llama3's original context (32)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_model(directory, request.param)
    llm = LLM(str(directory), dtype="fp32", max_model_len=256, num_kv_blocks=128,
              max_rolling_batch_size=4, warmup=False, progress=False)
    return request.param, hf, llm


def test_logits_match_transformers(family_model):
    family, hf, llm = family_model
    ids = list(np.random.default_rng(1).integers(0, 128, PROMPT_LEN))
    ours = prompt_logits(llm.engine.runner.model, ids)
    ref = hf_logits(hf, ids)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, f"{family}: relative error {rel:.2e}"


def test_greedy_tokens_match_transformers(family_model):
    family, hf, llm = family_model
    rng = np.random.default_rng(2)
    prompts = [list(map(int, rng.integers(0, 128, n))) for n in (5, 17, PROMPT_LEN)]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 32), family
        assert out.finish_reason == "length"
