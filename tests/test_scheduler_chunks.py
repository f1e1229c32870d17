"""With default options a long prompt is prefilled in chunks (max_rolling_batch_prefill_tokens
defaults to 2048), and the requests already decoding get a token at every step of it."""

from __future__ import annotations

from lmidist_jax import LLM, SamplingParams
from tiny_models import make_model


def test_long_prompt_is_chunked_between_running_decodes(tmp_path):
    make_model(tmp_path, "llama", num_key_value_heads=2, max_position_embeddings=8192)
    llm = LLM(str(tmp_path), dtype="fp32", max_rolling_batch_size=4, num_kv_blocks=700, progress=False)
    engine = llm.engine
    assert engine.max_model_len == 8192 and engine.runner.max_num_batched_tokens == 2048
    scheduler = engine.scheduler
    steps = []
    schedule = scheduler.schedule

    def recording_schedule():
        out = schedule()
        steps.append({item.seq.request.request_id: item.num_new_tokens for item in out.scheduled})
        return out

    scheduler.schedule = recording_schedule
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"short{i}", [1, 2, 3, 4], params, stream=False)
    engine.step()  # the short prompts' prefill
    engine.add_request("long", [1 + i % 120 for i in range(4995)], SamplingParams(max_new_tokens=1), stream=False)
    while engine.has_unfinished_requests():
        engine.step()
    long_steps = [s for s in steps if "long" in s]
    assert [s["long"] for s in long_steps] == [2045, 2045, 905], long_steps
    # Every step of the long prompt's prefill also decodes each running request.
    assert all(s.get(f"short{i}") == 1 for s in long_steps for i in range(3)), long_steps
