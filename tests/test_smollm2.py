"""The real default model (SmolLM2-135M-Instruct from its GGUF file) against transformers
running the same converted directory, plus the CLI."""

import os
import subprocess
import sys

import pytest
import torch
import transformers

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.model_store import fetch_model

PROMPTS = [
    "The capital of Germany is",
    "def add(a, b):\n    return",
    "List three colors: red,",
    "Once upon a time, in a small village,",
    "The square root of 16 is",
]


@pytest.fixture(scope="module")
def model_dir():
    return str(fetch_model("smollm2"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, max_model_len=256, max_rolling_batch_size=8, warmup=False, progress=False)


def test_greedy_tokens_match_transformers(llm, model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=32), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref, prompt
        assert out.text == tok.decode(ref, skip_special_tokens=True)


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_new_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "eos_token"


def test_stop_sequence_across_tokens(llm):
    base = llm.generate(PROMPTS[3], SamplingParams(max_new_tokens=24), use_tqdm=False)[0]
    words = base.text.split()
    stop = words[3][:3] if len(words[3]) >= 3 else words[3]  # a fragment inside the text
    cut = base.text.index(stop)
    out = llm.generate(PROMPTS[3], SamplingParams(max_new_tokens=24, stop_sequences=[stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop_sequence"
    assert out.text == base.text[:cut]


def test_cli_generate_chat(model_dir):
    exe = os.path.join(os.path.dirname(sys.executable), "lmidist-jax")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "lmidist_jax.cli"]
    result = subprocess.run(cmd + ["generate", "--chat", "--prompt", "What is the capital of France?",
                                   "--max-new-tokens", "24", "--option", "max_model_len=256"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout


def test_stop_token_text_same_streaming_or_not(llm):
    """A stop token's text is left out of the output whether the text is built token by
    token (streaming) or decoded once at the end (LLM.generate)."""
    prompt = "List three colors: red,"
    base = llm.generate(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    stop_at = base.token_ids[4]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_at])
    once = llm.generate(prompt, params, use_tqdm=False)[0]
    engine = llm.engine
    engine.add_request("streamed", prompt, params, stream=True)
    streamed = [o for o in engine.run_until_done() if o.request_id == "streamed"][0]
    assert once.finish_reason == streamed.finish_reason == "stop_sequence"
    assert once.token_ids == streamed.token_ids and once.token_ids[-1] == stop_at
    assert once.text == streamed.text
    assert once.text == llm.tokenizer.decode(once.token_ids[:-1], skip_special_tokens=True)
