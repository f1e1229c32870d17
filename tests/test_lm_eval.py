"""lm-evaluation-harness through both routes, against lm-eval's own ``hf`` model.

Local tasks built from the JSON files in ``lm_eval_data/`` (nothing downloaded): a
multiple-choice task (13 questions x 4 choices, ``loglikelihood``; one question has a
passage longer than ``max_length``, so both left-truncate it), a rolling
loglikelihood task over 4 paragraphs (~100 tokens each; with ``max_length=64`` every
paragraph spans two windows), and a greedy ``generate_until`` task (stop at a newline,
24 tokens at most). The default model in fp32, evaluated by:

- the ``hf`` oracle (computed once for the module): ``HFLM(dtype=float32,
  softmax_dtype=float64)``. torch's float32 log-softmax over the 49K vocabulary is off by
  ~1e-5 per token, always the same way, so a 100-token paragraph's sum drifts by ~1e-3;
  the float64 softmax keeps the oracle exact to the fp32 model (the engine's logprobs are
  within ~1e-4 of it, measured against a float64 forward);
- the native model ``lmidist-jax`` (``lm_eval.simple_evaluate(model=LmidistJaxLM(...))``);
- ``local-completions`` against ``POST /v1/completions`` served from the same engine,
  16 prompts per request.

Both routes must give every item's loglikelihood within 1e-3 of the oracle, the same
is_greedy flags, accuracy and perplexities, and the same greedy generations. The engine's
scoring requests (``max_new_tokens=0``) are checked on a tiny random model at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.timeout(1200)

DATA = Path(__file__).resolve().parent / "lm_eval_data"
MAX_LENGTH = 64  # the hf model's and ours: two windows per paragraph
ENGINE_OPTIONS = dict(dtype="fp32", max_model_len=256, max_rolling_batch_size=8)  # as test_smollm2's engine
TOLERANCE = 1e-3


def task_configs() -> list[dict]:
    def dataset(name):
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(DATA / name)}},
                "test_split": "test"}

    return [
        {"task": "lmidist_mc", **dataset("multiple_choice.jsonl"), "output_type": "multiple_choice",
         "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
         "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        {"task": "lmidist_rolling", **dataset("paragraphs.jsonl"), "output_type": "loglikelihood_rolling",
         "doc_to_text": "", "doc_to_target": "{{text}}",
         "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}]},
        {"task": "lmidist_gen", **dataset("generation.jsonl"), "output_type": "generate_until",
         "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
         "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": False},
         "metric_list": [{"metric": "exact_match"}]},
    ]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No hub access, and a datasets cache of the module's own."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def model_dir():
    from lmidist_jax.model_store import fetch_model

    return str(fetch_model("smollm2", progress=False))


def evaluate(model, offline, **kwargs) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=task_configs(), log_samples=True, bootstrap_iters=0,
                                   **kwargs)


@pytest.fixture(scope="module")
def hf_results(model_dir, offline):
    from lm_eval.models.huggingface import HFLM

    return evaluate(HFLM(pretrained=model_dir, dtype="float32", softmax_dtype="float64", device="cpu",
                         batch_size=1, max_length=MAX_LENGTH), offline)


@pytest.fixture(scope="module")
def native_lm(model_dir, offline):
    import lmidist_jax.eval  # noqa: F401  (registers the model)
    from lmidist_jax.eval import LmidistJaxLM

    return LmidistJaxLM(pretrained=model_dir, max_length=MAX_LENGTH, **ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def native_results(native_lm, offline):
    return evaluate(native_lm, offline)


@pytest.fixture(scope="module")
def completions_results(native_lm, native_results, model_dir, offline):
    """local-completions against /v1/completions over the native model's engine (used
    after the native evaluation, never at the same time)."""
    from lmidist_jax.engine.engine_loop import EngineLoop
    from lmidist_jax.server import create_app
    from server_fixtures import ServerThread

    loop = EngineLoop(native_lm.llm.engine)
    srv = ServerThread(create_app(loop, native_lm.llm.config), loop)
    try:
        # max_length: the API model keeps max_length - 1 input tokens and rolls windows of
        # max_length - 2: MAX_LENGTH + 2 gives the hf model's MAX_LENGTH windows.
        args = (f"base_url={srv.url}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
                f"model=smollm2,batch_size=16,max_length={MAX_LENGTH + 2},max_retries=1")
        return evaluate("local-completions", offline, model_args=args)
    finally:
        srv.close()
        loop.shutdown()


def loglikelihoods(results: dict, task: str) -> list[list[float]]:
    """Per document, the loglikelihood of each request (each choice; a paragraph's total)."""
    values = []
    for sample in results["samples"][task]:
        values.append([float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in sample["resps"]])
    return values


def greedy_flags(results: dict) -> list[list[bool]]:
    return [[bool(r[0][1]) for r in s["resps"]] for s in results["samples"]["lmidist_mc"]]


def generations(results: dict) -> list[str]:
    return [s["resps"][0][0] for s in results["samples"]["lmidist_gen"]]


def assert_matches_oracle(results: dict, oracle: dict) -> None:
    for task in ("lmidist_mc", "lmidist_rolling"):
        ours, want = loglikelihoods(results, task), loglikelihoods(oracle, task)
        assert len(ours) == len(want) and all(len(a) == len(b) for a, b in zip(ours, want))
        np.testing.assert_allclose(sum(ours, []), sum(want, []), rtol=0, atol=TOLERANCE, err_msg=task)
    assert greedy_flags(results) == greedy_flags(oracle)
    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"]["lmidist_mc"][metric] == oracle["results"]["lmidist_mc"][metric]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert results["results"]["lmidist_rolling"][metric] == pytest.approx(
            oracle["results"]["lmidist_rolling"][metric], rel=1e-5)
    assert generations(results) == generations(oracle)
    assert results["results"]["lmidist_gen"]["exact_match,none"] == oracle["results"]["lmidist_gen"]["exact_match,none"]


def test_oracle_is_meaningful(hf_results):
    """The local tasks discriminate: not every answer right, perplexity finite, texts vary."""
    assert 0.25 < hf_results["results"]["lmidist_mc"]["acc,none"] < 1.0
    assert len(set(generations(hf_results))) == len(generations(hf_results))
    assert all(len(v) == 4 for v in loglikelihoods(hf_results, "lmidist_mc"))
    assert np.isfinite(hf_results["results"]["lmidist_rolling"]["word_perplexity,none"])


def test_native_model_matches_hf(native_results, hf_results):
    assert_matches_oracle(native_results, hf_results)


def test_completions_route_matches_hf(completions_results, hf_results):
    assert_matches_oracle(completions_results, hf_results)


def test_rolling_windows_are_the_hf_models(native_lm, model_dir):
    """Each paragraph spans several windows of max_length tokens (so the test above
    compares window sums, not one forward pass), built exactly as the hf model builds them."""
    import json

    from lm_eval import utils

    for line in (DATA / "paragraphs.jsonl").read_text().splitlines():
        tokens = native_lm.tok_encode(json.loads(line)["text"])
        windows = list(utils.get_rolling_token_windows(tokens, native_lm.prefix_token_id, MAX_LENGTH, 1))
        assert len(windows) >= 2
        assert all(len(inp) <= MAX_LENGTH for inp, _ in windows)


def test_command_line(model_dir, offline, tmp_path, monkeypatch, capsys):
    """``python -m lmidist_jax.eval run --model lmidist-jax ...`` (lm-eval's command line
    with the model registered) on a task from a YAML file under --include_path; the model
    resolves through lm-eval's registry (alias ``lmidist`` too) and is built from the
    model_args string."""
    import yaml
    from lm_eval.api.registry import get_model

    from lmidist_jax.eval import LmidistJaxLM
    from lmidist_jax.eval.__main__ import main

    assert get_model("lmidist-jax") is LmidistJaxLM and get_model("lmidist") is LmidistJaxLM
    (tmp_path / "lmidist_mc.yaml").write_text(yaml.safe_dump(task_configs()[0]))
    args = ",".join([f"pretrained={model_dir}", f"max_length={MAX_LENGTH}"]
                    + [f"{k}={v}" for k, v in ENGINE_OPTIONS.items()])
    monkeypatch.setattr("sys.argv", ["lm-eval", "run", "--model", "lmidist", "--model_args", args,
                                     "--tasks", "lmidist_mc", "--include_path", str(tmp_path), "--limit", "2"])
    main()
    table = capsys.readouterr().out
    assert "lmidist_mc" in table and "acc" in table


def instances(request_type: str, args_list: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=request_type, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def test_generate_until_sampling_stops_and_lengths(native_lm):
    lm = native_lm
    prompt = "Write a list of fruits: apple, banana,"
    greedy = lm.generate_until(instances("generate_until", [(prompt, {"until": [], "max_gen_toks": 12})]))[0]
    short = lm.generate_until(instances("generate_until", [(prompt, {"until": [], "max_gen_toks": 3})]))[0]
    assert short and greedy.startswith(short) and len(short) < len(greedy)
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    cut = lm.generate_until(instances("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 12})]))[0]
    assert cut == greedy[:greedy.index(stop)]
    sampled = {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0, "top_p": 0.95, "seed": 3}
    first = lm.generate_until(instances("generate_until", [(prompt, sampled)] * 2))
    assert first[0] == first[1]  # one seed: the same sample
    others = lm.generate_until(instances("generate_until", [(prompt, {**sampled, "seed": s}) for s in range(4)]))
    assert len(set(others + [greedy])) > 1
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until(instances("generate_until", [(prompt, {"until": [], "num_beams": 2})]))


def test_loglikelihood_is_greedy(native_lm):
    """is_greedy as lm-eval defines it: every continuation token is its position's argmax."""
    from lmidist_jax import SamplingParams

    lm = native_lm
    context = lm.tok_encode("The capital of France is")
    greedy = lm.llm.generate([context], SamplingParams(max_new_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    other = lm.tok_encode(" purple elephants")
    (ll, is_greedy), (ll_other, other_greedy), (ll_part, part_greedy) = lm._loglikelihood_tokens(
        [(None, context, greedy.token_ids), (None, context, other), (None, context, greedy.token_ids[:2] + other)])
    assert is_greedy and not other_greedy and not part_greedy
    assert ll == pytest.approx(greedy.outputs[0].cumulative_logprob, abs=1e-4) and ll > ll_other


# -- the engine's scoring requests (tiny random model) ----------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A small KV pool (24 blocks of 4 tokens: one max_model_len sequence and a little)
    and a 16-token prefill budget: requests wait, chunk and get preempted; prefix caching on."""
    from lmidist_jax import LLM
    from tiny_models import make_model

    directory = tmp_path_factory.mktemp("scoring_llama")
    make_model(directory, "llama", num_key_value_heads=2)
    return LLM(str(directory), dtype="fp32", max_model_len=64, block_size=4, num_kv_blocks=24,
               max_rolling_batch_size=8, max_rolling_batch_prefill_tokens=16, max_logprobs=4,
               enable_prefix_caching=True, progress=False)


def reference(llm, prompt) -> np.ndarray:
    from lmidist_jax.models.scoring import prompt_logits

    return np.asarray(jax.nn.log_softmax(prompt_logits(llm.engine.runner.model, prompt), axis=-1))


def test_scoring_requests(tiny_llm):
    """max_new_tokens=0 with prompt logprobs: nothing generated, every prompt token's
    logprob and top alternatives equal a whole-prompt forward pass; chunked over a
    16-token budget, mixed with generating requests; a prompt of max_model_len + 1 tokens
    fits (its last token is never run), one more does not; a one-token prompt finishes at once."""
    from lmidist_jax import SamplingParams
    from lmidist_jax.sampling_params import RequestError

    llm = tiny_llm
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, 128, n))) for n in (5, 37, 65, 2, 20)]
    score = SamplingParams(max_new_tokens=0, prompt_logprobs=True, top_n_tokens=3)
    generate = SamplingParams(max_new_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts + [prompts[1]], [score] * len(prompts) + [generate], use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == [] and out.finish_reason == "length" and out.text == ""
        assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
        ref = reference(llm, prompt)
        np.testing.assert_allclose(out.prompt_logprobs[1:], [ref[i, prompt[i + 1]] for i in range(len(prompt) - 1)],
                                   atol=1e-4)
        for i, top in enumerate(out.prompt_top_logprobs[1:]):
            # The 3 best logprobs, each that of its token (ties within 1e-4 may swap places).
            np.testing.assert_allclose([x for _, x in top], np.sort(ref[i])[::-1][:3], atol=1e-4)
            np.testing.assert_allclose([x for _, x in top], [ref[i, t] for t, _ in top], atol=1e-4)
            if top[0][0] == prompt[i + 1]:
                assert top[0][1] == out.prompt_logprobs[i + 1]  # the same number, bit for bit
    assert len(outs[-1].token_ids) == 6
    assert llm.engine.block_manager.num_used_blocks == 0
    (single,) = llm.generate([[7]], score, use_tqdm=False)
    assert single.prompt_logprobs == [None] and single.finish_reason == "length" and single.token_ids == []
    with pytest.raises(RequestError, match="66 tokens.*at most 65"):
        llm.engine.add_request("too-long", [1] * 66, score)
    with pytest.raises(RequestError, match="64 tokens"):
        llm.engine.add_request("too-long-gen", [1] * 64, generate)
    with pytest.raises(RequestError, match="0 only with prompt_logprobs"):
        SamplingParams(max_new_tokens=0)


def test_scoring_survives_preemption(tiny_llm):
    """Scoring requests between generating ones in a pool too small for them all: they are
    preempted and recomputed, and the logprobs stay those of a whole-prompt forward pass."""
    from lmidist_jax import SamplingParams

    llm = tiny_llm
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(0, 128, 30))) for _ in range(6)]
    gen = SamplingParams(max_new_tokens=30, ignore_eos=True)
    score = SamplingParams(max_new_tokens=0, prompt_logprobs=True)
    before = llm.engine.stats.num_preemptions
    outs = llm.generate([prompts[0]] + prompts + [prompts[1]], [gen] + [score] * 6 + [gen], use_tqdm=False)
    assert llm.engine.stats.num_preemptions > before
    for prompt, out in zip(prompts, outs[1:-1]):
        ref = reference(llm, prompt)
        np.testing.assert_allclose(out.prompt_logprobs[1:], [ref[i, prompt[i + 1]] for i in range(len(prompt) - 1)],
                                   atol=1e-4)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_scoring_reuses_a_cached_context(tiny_llm):
    """prompt_logprobs_from: the context before it may come from the prefix cache (its
    entries are then None); the wanted logprobs are still those of a whole forward pass."""
    from lmidist_jax import SamplingParams

    llm = tiny_llm
    rng = np.random.default_rng(2)
    context = list(map(int, rng.integers(0, 128, 21)))
    continuations = [list(map(int, rng.integers(0, 128, n))) for n in (3, 1, 5)]
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=True, prompt_logprobs_from=len(context), top_n_tokens=1)
    first = llm.generate([context + continuations[0]], params, use_tqdm=False)[0]
    computed = llm.engine.stats.num_computed_prompt_tokens
    outs = llm.generate([context + c for c in continuations[1:]], params, use_tqdm=False)
    # 20 of the context's 21 tokens are in 5 cached blocks: only the rest ran.
    assert llm.engine.stats.num_computed_prompt_tokens - computed == sum(1 + len(c) - 1 for c in continuations[1:])
    for cont, out in zip(continuations, [first] + outs):
        prompt = context + cont
        ref = reference(llm, prompt)
        want = [ref[i - 1, prompt[i]] for i in range(len(context), len(prompt))]
        np.testing.assert_allclose(out.prompt_logprobs[len(context):], want, atol=1e-4)
        assert [top[0][0] for top in out.prompt_top_logprobs[len(context):]] == \
            [int(np.argmax(ref[i - 1])) for i in range(len(context), len(prompt))]
    assert outs[0].prompt_logprobs[:len(context)] == [None] * len(context)
