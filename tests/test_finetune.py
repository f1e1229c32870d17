"""LoRA fine-tuning on the serving modules (lmidist_jax.finetune): the loss falls and is
reproducible for a seed; the written PEFT adapter loads in transformers + PEFT with the
logits of our training forward (families with GQA + fused q/k/v, sliding windows + soft
caps, learned positions + Conv1D weights; ALiBi in the attention test) and in our engine
with PEFT's greedy tokens; chat data learn the assistant's tokens only; bad arguments are
refused by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tiny_models import hf_greedy, make_model

import peft  # noqa: E402  (test-only oracle, pinned in the test extra)

from lmidist_jax import LLM, SamplingParams  # noqa: E402
from lmidist_jax.finetune import TrainingDataError, encode_examples, train_lora  # noqa: E402

ENGINE = dict(dtype="fp32", max_model_len=128, block_size=4, num_kv_blocks=96, max_rolling_batch_size=4,
              max_rolling_batch_prefill_tokens=64, warmup=False, progress=False, enable_lora=True,
              max_loras=2, max_lora_rank=8)


def token_data(count=8, seed=0, prompt_len=6, completion_len=5):
    """Prompt/completion pairs of random token ids (no token 0-2: pad, BOS, EOS)."""
    rng = np.random.default_rng(seed)
    return [{"prompt": rng.integers(3, 128, prompt_len).tolist(), "completion": rng.integers(3, 128, completion_len).tolist()}
            for _ in range(count)]


# family -> train_lora arguments. Each run's adapter goes through transformers + PEFT.
CASES = {
    # GQA with q/k/v fused in our kernel: LoRAs on its q and v parts only, and on down_proj.
    "llama": dict(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")),
    # sliding window 8 (sequences of 24 tokens), attention and final soft caps, sandwich norms;
    # only layer 2 adapted (PEFT's layers_to_transform).
    "gemma2": dict(rank=8, alpha=4, targets=("o_proj", "gate_proj", "up_proj"), layers=[2]),
    # learned positions, Conv1D [in, out] weights, tied head; two modules named c_proj (attn, mlp).
    "gpt2": dict(rank=4, alpha=16, targets=("c_proj", "c_fc")),
}
TRAIN = dict(steps=12, learning_rate=3e-2, batch_size=4, seed=1, progress=False)

_RUNS: dict = {}


def trained(family, tmp_path_factory):
    """(hf model, LLM, data, train_lora result), built once per family."""
    if family not in _RUNS:
        root = tmp_path_factory.mktemp(f"finetune_{family}")
        hf = make_model(root / "base", family)
        llm = LLM(str(root / "base"), **ENGINE)
        data = token_data(8, prompt_len=14, completion_len=10) if family == "gemma2" else token_data(8)
        run = train_lora(llm, data, output_dir=root / "adapter", **TRAIN, **CASES[family])
        _RUNS[family] = hf, llm, data, run
    return _RUNS[family]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    return trained("llama", tmp_path_factory)


def test_loss_falls_and_is_reproducible(llama_run, tmp_path):
    hf, llm, data, run = llama_run
    losses = run.losses
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    assert run.num_step_traces == 1  # one compiled step for the whole run
    again = train_lora(llm, data, output_dir=tmp_path / "again", **TRAIN, **CASES["llama"])
    assert again.losses == losses
    from safetensors.numpy import load_file

    first, second = (load_file(str(d / "adapter_model.safetensors")) for d in (run.adapter_dir, again.adapter_dir))
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    other_seed = train_lora(llm, data, output_dir=tmp_path / "other", **{**TRAIN, "seed": 2}, **CASES["llama"])
    assert other_seed.losses != losses


def test_adapter_directory_is_peft_layout(llama_run):
    from safetensors.numpy import load_file

    hf, llm, data, run = llama_run
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(run.adapter_dir.parent / "base")
    tensors = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    names = [f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight" for i in range(2)
             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for ab in "AB"]
    assert sorted(tensors) == sorted(names)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)   # [r, in]
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)   # [out, r]
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 4)   # 2 KV heads
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 128)
    assert all(np.abs(t).max() > 0 for t in tensors.values())  # every matrix trained


def test_untargeted_parts_stay_zero(llama_run):
    """The k part of the fused q/k/v kernel, o/gate/up and the no-adapter slot 0 were never targeted:
    their LoRA matrices are exactly zero after training (their gradients are exactly zero)."""
    from lmidist_jax.models.loader import variables
    from lmidist_jax.models.lora_linear import LoraParam

    hf, llm, data, run = llama_run
    params = {p: np.asarray(v[...]) for p, v in variables(run.model.state).items() if isinstance(v, LoraParam)}
    for layer in range(2):
        attn, mlp = ("layers", layer, "attn", "qkv_proj"), ("layers", layer, "mlp")
        assert not params[attn + ("lora_b_k",)].any()
        assert params[attn + ("lora_a",)][1, :, 0].any() and not params[attn + ("lora_a",)][1, :, 1].any()
        for path in [("layers", layer, "attn", "o_proj", "lora_a"), mlp + ("gate_up_proj", "lora_a"),
                     mlp + ("gate_up_proj", "lora_b_up")]:
            assert not params[path].any(), path
    assert not any(value[0].any() for value in params.values())


@pytest.mark.parametrize("family", sorted(CASES))
def test_peft_round_trip_logits(family, tmp_path_factory):
    """transformers + PEFT with the written adapter gives our training forward's logits (fp32)."""
    hf, llm, data, run = trained(family, tmp_path_factory)
    peft_model = peft.PeftModel.from_pretrained(hf, str(run.adapter_dir)).eval()
    sequences = [d["prompt"] + d["completion"] for d in data[:3]] + [data[3]["prompt"][:5]]
    ours = run.logits(sequences)
    with torch.no_grad():
        with_adapter = [peft_model(torch.tensor([s])).logits[0].numpy() for s in sequences]
        with peft_model.disable_adapter():
            base = [peft_model(torch.tensor([s])).logits[0].numpy() for s in sequences]
    peft_model.unload()  # gives ``hf`` its own modules back
    for ref, out, plain in zip(with_adapter, ours, base):
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
        assert np.abs(ref - plain).max() > 1e-2  # the adapter changes the logits: the comparison can fail


def test_trained_adapter_served_with_peft_greedy_tokens(llama_run):
    """The adapter served by the engine beside the base model: PEFT's (merged) greedy tokens."""
    hf, llm, data, run = llama_run
    llm.add_adapter("trained", str(run.adapter_dir))
    try:
        peft_model = peft.PeftModel.from_pretrained(hf, str(run.adapter_dir)).eval()
        prompts = [d["prompt"] for d in data[:4]]
        with torch.no_grad():
            expected = [hf_greedy(peft_model, p, 8) for p in prompts]
        peft_model.unload()  # gives ``hf`` its own modules back
        base = [hf_greedy(hf, p, 8) for p in prompts[:2]]
        outs = llm.generate(prompts[:2] + prompts, SamplingParams(max_new_tokens=8, ignore_eos=True),
                            use_tqdm=False, adapters=[None, None] + ["trained"] * 4)
        assert [o.token_ids for o in outs] == base + expected
        assert base != expected[:2]
    finally:
        llm.remove_adapter("trained")


def test_bad_arguments_are_refused(llama_run, tmp_path):
    hf, llm, data, run = llama_run
    bad = [(dict(targets=("q_proj", "nope_proj")), r"target module\(s\) 'nope_proj' not found among the model's "
                                                   r"LoRA-capable modules; accepted: down_proj, gate_proj, k_proj, "
                                                   r"o_proj, q_proj, up_proj, v_proj"),
           (dict(targets=("lm_head",)), "'lm_head' not found"),
           (dict(rank=0), "rank=0 is not valid: accepted an integer >= 1"),
           (dict(rank=2.5), "rank=2.5 is not valid"),
           (dict(rank=33), r"rank=33 is larger than model.layers.0.self_attn.v_proj \(64 inputs, 32 outputs\)"),
           (dict(rank=16), r"rank=16 is above this engine's max_lora_rank=8: it could not serve the adapter"),
           (dict(alpha=0), "alpha=0 is not valid: accepted a finite number > 0"),
           (dict(steps=0), "steps=0 is not valid"),
           (dict(learning_rate=float("nan")), "learning_rate=nan is not valid"),
           (dict(warmup_steps=4, steps=4), "warmup_steps=4 leaves no step"),
           (dict(layers=[2]), r"layers=\[2\] is not valid: accepted a non-empty list of layer indices in 0..1"),
           (dict(targets=()), "targets must name checkpoint modules")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            train_lora(llm, data, **{"steps": 2, "output_dir": tmp_path / "x", "progress": False, **kwargs})
    assert not (tmp_path / "x").exists()  # refused before anything ran or was written
    bad_data = [([], "data must be a non-empty list"),
                ([{"prompt": [5], "answer": [6]}], r"keys \['answer', 'prompt'\]"),
                ([{"prompt": [5], "completion": [500]}], r"completion holds token ids outside the vocabulary"),
                ([{"prompt": "text"}], "keys"),
                ([{"messages": [{"role": "user", "content": "hi"}]}], "example 0: this model has no tokenizer|"
                                                                       "no chat template")]
    for examples, message in bad_data:
        with pytest.raises(TrainingDataError, match=message):
            train_lora(llm, examples, steps=2, progress=False)
    with pytest.raises(ValueError, match="example 0 has 131 tokens, more than max_model_len=128"):
        train_lora(llm, [{"prompt": [5] * 100, "completion": [6] * 30}], steps=2, progress=False)


def test_fused_checkpoint_module_is_refused(tmp_path):
    """Phi-3 stores q/k/v in one qkv_proj tensor: PEFT shares one A across its parts."""
    make_model(tmp_path / "phi3", "phi3")
    llm = LLM(str(tmp_path / "phi3"), **ENGINE)
    with pytest.raises(ValueError, match="target 'qkv_proj': model.layers.0.self_attn.qkv_proj is a fused "
                                         "checkpoint module"):
        train_lora(llm, token_data(2), targets=("qkv_proj",), steps=2, progress=False)


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    """A tiny model with SmolLM2's tokenizer and chat template (only templating is used)."""
    from lmidist_jax.model_store import fetch_model

    smollm2 = fetch_model("smollm2")
    root = tmp_path_factory.mktemp("chat")
    make_model(root, "llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / name).exists():
            shutil.copy(smollm2 / name, root / name)
    return LLM(str(root), **ENGINE)


def test_chat_examples_learn_the_assistant_turns_only(chat_llm):
    tok = chat_llm.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Veloria?"},
                {"role": "assistant", "content": "Quenmar."}, {"role": "user", "content": "Its river?"},
                {"role": "assistant", "content": "The Olun."}]
    chat, pair, text = encode_examples([{"messages": messages}, {"prompt": "Q: Veloria? A:", "completion": " Quenmar"},
                                        {"text": "Veloria"}], chat_llm.engine)
    assert chat.token_ids.tolist() == chat_llm.apply_chat_template(messages, add_generation_prompt=False)
    learned = tok.decode(chat.token_ids[chat.loss_mask])
    assert learned == "Quenmar.<|im_end|>\nThe Olun.<|im_end|>\n"
    # The context before each answer ends with the template's assistant header.
    first = int(np.argmax(chat.loss_mask))
    assert tok.decode(chat.token_ids[:first]).endswith("Capital of Veloria?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(pair.token_ids[pair.loss_mask]) == " Quenmar<|im_end|>"  # completion + EOS
    assert not pair.loss_mask[:len(tok.encode("Q: Veloria? A:"))].any()
    assert text.loss_mask.all()
    with pytest.raises(TrainingDataError, match="example 0 has no token to learn|no assistant message"):
        encode_examples([{"messages": messages[:2]}], chat_llm.engine)


def test_dense_causal_attention_matches_the_paged_reference():
    """The training forward's attention (packed rows + padding, causal, with a sliding
    window, a soft cap and ALiBi) equals the paged reference over the same keys, and its
    gradient exists (the paged paths' run-time loops have none in reverse mode)."""
    import jax
    import jax.numpy as jnp

    from lmidist_jax.models.decoder import alibi_slopes_for
    from pallas_kernels.reference import paged_attention_reference, write_kv_pages
    from pallas_kernels.xla_attention import packed_attention

    rng = np.random.default_rng(0)
    lengths, seq_len, heads, kv_heads, dim, block = (11, 16, 5), 16, 4, 2, 8, 4
    rows = len(lengths)
    T = rows * seq_len
    q = rng.standard_normal((T, heads, dim)).astype(np.float32)
    k, v = (rng.standard_normal((T, kv_heads, dim)).astype(np.float32) for _ in range(2))
    positions = np.tile(np.arange(seq_len), rows).astype(np.int32)
    seq_ids = np.repeat(np.arange(rows), seq_len).astype(np.int32)
    seq_ids = np.where(positions < np.asarray(lengths)[seq_ids], seq_ids, -1).astype(np.int32)
    blocks_per_row = seq_len // block
    tables = (1 + np.arange(rows * blocks_per_row)).reshape(rows, blocks_per_row).astype(np.int32)
    slots = (tables[np.repeat(np.arange(rows), seq_len), positions // block] * block + positions % block)
    k_pages, v_pages = write_kv_pages(jnp.zeros((kv_heads, 1 + rows * blocks_per_row, block, dim)),
                                      jnp.zeros((kv_heads, 1 + rows * blocks_per_row, block, dim)), k, v, slots)
    options = dict(scale=0.3, sliding_window=6, soft_cap=2.0, alibi_slopes=alibi_slopes_for(heads))
    out = packed_attention(q, k, v, seq_ids, positions, seq_ids < 0, causal=True, query_tile=8, **options)
    ref = paged_attention_reference(q, k_pages, v_pages, tables, np.maximum(seq_ids, 0), positions, **options)
    real = seq_ids >= 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda q: packed_attention(q, k, v, seq_ids, positions, seq_ids < 0, causal=True,
                                               query_tile=8, **options)[real].sum())(jnp.asarray(q))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0
