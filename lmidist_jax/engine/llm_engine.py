"""The rolling-batch engine: requests in, one ``step()`` at a time
(schedule -> run -> postprocess), per-request outputs out."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Sequence as Seq

import numpy as np

from ..outputs import CompletionOutput, RequestOutput, TokenLogprob
from ..sampling_params import RequestError, SamplingParams
from .block_manager import BlockManager
from .detokenizer import Detokenizer, find_stop, streamable_length
from .model_runner import ModelRunner
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Request, Sequence, SequenceStatus
from .spec_decode import SpeculativeDecoding

logger = logging.getLogger("lmidist_jax")


@dataclasses.dataclass
class EngineStats:
    num_steps: int = 0
    num_computed_prompt_tokens: int = 0  # prompt tokens actually run (cache hits excluded)
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    host_time: float = 0.0    # packing batches on the host
    device_time: float = 0.0  # waiting for the device
    schedule_time: float = 0.0
    postprocess_time: float = 0.0


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, *, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_prefix_caching: bool = False,
                 max_logprobs: int = 20, eos_token_ids: Seq[int] = (), seed: int = 0,
                 record_acceptance_rate: bool = False):
        self.runner = runner
        self.spec = runner.spec
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer)
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.eos_token_ids = set(eos_token_ids)
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching)
        self.lora = runner.lora  # LoraManager, or None when LoRA is off
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   max_loras=self.lora.max_loras if self.lora is not None else None)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        # With a draft model: proposal lengths and acceptance records (the runner's step
        # proposes and verifies, the scheduler reserves and rolls back).
        self.speculative = (SpeculativeDecoding(runner.num_speculative_tokens, record_acceptance_rate)
                            if runner.draft is not None else None)
        self._finished_outputs: list[RequestOutput] = []
        self._rng = random.Random(seed)
        self._token_texts: dict[int, str] = {}
        self._max_token_chars: int | None = None
        self._next_seq_id = 0

    @property
    def spec_stats(self):
        """Proposed / accepted token counts with a draft model (None without)."""
        return None if self.speculative is None else self.speculative.stats

    # -- requests ------------------------------------------------------------------

    def encode(self, prompt: str | Seq[int], tokenizer=None) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt. ``tokenizer``: a copy to use instead of the
        engine's own (the engine loop tokenizes in request threads on pooled copies)."""
        if isinstance(prompt, str):
            tok = self.tokenizer if tokenizer is None else tokenizer
            if tok is None:
                raise RequestError("this model has no tokenizer: pass the prompt as a list of token ids")
            if not prompt:
                raise RequestError("the prompt is empty")
            self._check_prompt_chars(prompt, tok)
            return prompt, list(tok.encode(prompt))
        ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.spec.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
                raise RequestError(f"prompt token id {t!r} is not an integer in [0, {vocab})")
        text = None
        return text, [int(t) for t in ids]

    def _check_prompt_chars(self, prompt: str, tokenizer) -> None:
        """Refuses, without tokenizing it, a prompt too long for max_model_len whatever its
        tokens: no token covers more characters than the longest vocabulary entry, so
        such a prompt has at least len(prompt) / that many tokens. (Tokenizing megabytes
        costs seconds of CPU.) A factor of 2 leaves room for normalizers that drop text."""
        if self._max_token_chars is None:
            vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
            self._max_token_chars = max((len(t) for t in vocab), default=0) or 1024
        limit = 2 * self._max_token_chars * self.max_model_len
        if len(prompt) > limit:
            raise RequestError(
                f"the prompt has {len(prompt)} characters, far more than max_model_len={self.max_model_len} "
                f"tokens can hold (no token of this tokenizer covers more than {self._max_token_chars} "
                f"characters); prompts longer than {limit} characters are refused without tokenizing them")

    def encode_chat(self, messages, add_generation_prompt: bool = True, tokenizer=None) -> list[int]:
        """Token ids of a conversation ([{"role", "content"}, ...]) through the model's
        chat template. Raises RequestError when there is none or it rejects the messages.
        ``tokenizer``: as in `encode`."""
        tok = self.tokenizer if tokenizer is None else tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            # Base (pretrained) models such as gemma3-270m ship none: name the model and the way out.
            name = getattr(tok, "name_or_path", None) if tok is not None else None
            model = f"the model {str(name)!r}" if name else "this model"
            raise RequestError(f"{model} has no chat template (its tokenizer defines none, as base/pretrained "
                               "models usually do), so chat messages cannot be formatted; use generate() "
                               "with a plain-text prompt instead")
        try:
            ids = tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                          tokenize=True)
        except Exception as e:  # jinja errors, raise_exception() in the template
            raise RequestError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(t) for t in ids]

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if self.spec.is_encoder_decoder:
            self._validate_encoder_prompt(n, params)
        if params.scores_only:
            # Its last token is scored, never run: max_model_len positions hold one more token.
            if n > self.max_model_len + 1:
                raise RequestError(
                    f"the prompt has {n} tokens, but max_model_len is {self.max_model_len} (a scoring request, "
                    f"max_new_tokens=0, runs every prompt token but the last: at most "
                    f"{self.max_model_len + 1} prompt tokens)")
        elif n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens, but max_model_len is {self.max_model_len} "
                f"(prompt + generated tokens must fit; at most {self.max_model_len - 1} prompt tokens)")
        if params.top_n_tokens > self.max_logprobs:
            raise RequestError(f"top_n_tokens={params.top_n_tokens} exceeds max_logprobs={self.max_logprobs}")

    def _validate_encoder_prompt(self, n: int, params: SamplingParams) -> None:
        """An encoder prompt runs whole in one step, beside at least one decoder token."""
        limit = self.scheduler.max_num_batched_tokens - 1
        if n > limit:
            raise RequestError(
                f"the prompt has {n} tokens; this encoder-decoder model runs a prompt through its encoder in "
                f"one step, so prompts may have at most {limit} tokens "
                f"(max_rolling_batch_prefill_tokens={limit + 1} minus one decoder token)")
        if params.prompt_logprobs:
            raise RequestError("prompt_logprobs are not available for encoder-decoder models (the prompt "
                               "goes through the encoder, which predicts no tokens)")

    def add_request(self, request_id: str, prompt: str | Seq[int],
                    sampling_params: SamplingParams | None = None, *, stream: bool = True,
                    prompt_token_ids: Seq[int] | None = None, adapter: str | None = None) -> Request:
        """Queue a request. Raises RequestError (and changes nothing) if it is invalid.

        ``stream=False`` skips per-token text deltas: the text is decoded once when the
        request finishes (stop strings still detokenize as they go). ``prompt_token_ids``:
        the prompt already tokenized (``prompt`` is then only its text, or the same ids).
        ``adapter``: the name of a registered LoRA adapter (None: the base model)."""
        params = sampling_params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        adapter_uid = self.check_adapter(adapter)
        if prompt_token_ids is not None:
            text, ids = (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
        else:
            text, ids = self.encode(prompt)
        self.validate(ids, params)
        encoder_ids = None
        if self.spec.is_encoder_decoder:  # the prompt feeds the encoder; the decoder starts from one token
            encoder_ids, ids = ids, [self.spec.decoder_start_token_id]
        request = Request(request_id, text, ids, params,
                          incremental_text=stream or bool(params.stop_sequences),
                          adapter=adapter, adapter_uid=adapter_uid, encoder_prompt_token_ids=encoder_ids)
        if params.prompt_logprobs:
            request.prompt_logprobs = [None] * len(ids)
            if params.top_n_tokens:
                request.prompt_top_logprobs = [None] * len(ids)
        if params.scores_only and len(ids) < 2:
            return self._finish_on_arrival(request)
        base_seed = params.seed if params.seed is not None else self._rng.randrange(2**31)
        for i in range(params.num_samples):
            seq = Sequence(self._next_seq_id, request, i, list(ids), seed=(base_seed + i) % 2**32)
            self._next_seq_id += 1
            request.sequences.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        return request

    def _finish_on_arrival(self, request: Request) -> Request:
        """A scoring request with nothing to run (a one-token prompt has no logprob): its
        output comes with the next step's."""
        for i in range(request.sampling_params.num_samples):
            seq = Sequence(self._next_seq_id, request, i, list(request.prompt_token_ids), seed=0,
                           status=SequenceStatus.FINISHED, finish_reason="length")
            self._next_seq_id += 1
            request.sequences.append(seq)
        self._finished_outputs.append(self._request_output(request, {}))
        return request

    # -- LoRA adapters -----------------------------------------------------------------

    def check_adapter(self, adapter: str | None) -> int | None:
        """The registration id of ``adapter`` (None for None); RequestError if it is unknown
        or LoRA is off."""
        if adapter is None:
            return None
        if self.lora is None:
            raise RequestError(f"adapter {adapter!r} was requested, but LoRA adapters are not enabled on this "
                               f"engine (option enable_lora=true)")
        if not isinstance(adapter, str) or adapter not in self.lora.registry:
            raise RequestError(self.lora.unknown_message(adapter))
        return self.lora.registry[adapter].uid

    def _require_lora(self):
        if self.lora is None:
            raise RequestError("LoRA adapters are not enabled on this engine (option enable_lora=true)")
        return self.lora

    def add_adapter(self, name: str, path: str) -> dict:
        """Registers the PEFT LoRA adapter in directory ``path`` as ``name``. Raises
        AdapterError (nothing changes) if it cannot be used with this model."""
        lora = self._require_lora()
        lora.add(name, path)
        return lora.describe(name)

    def remove_adapter(self, name: str) -> None:
        """Unregisters ``name``; refused while unfinished requests use it."""
        from ..models.peft_adapter import AdapterError

        lora = self._require_lora()
        lora.get(name)
        users = sorted(r.request_id for r in self.requests.values() if r.adapter == name)
        if users:
            raise AdapterError(f"adapter {name!r} is in use by {len(users)} unfinished request(s) "
                               f"({', '.join(users[:4])}); remove it once they finish")
        lora.remove(name)

    def list_adapters(self) -> list[dict]:
        return [] if self.lora is None else self.lora.list()

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks. Returns False if it is unknown or done."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        request.aborted = True
        if self.speculative is not None:
            self.speculative.forget(request_id)
        for seq in request.sequences:
            if not seq.is_finished:
                self._finish(seq, "abort")
        self._finished_outputs.append(self._request_output(request, {}))
        del self.requests[request_id]
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._finished_outputs)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run on the device, postprocess. Returns outputs of every request
        that produced tokens or finished in this step."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        self.stats.num_preemptions += len(sched.preempted)
        outputs, self._finished_outputs = self._finished_outputs, []
        if not sched.scheduled:
            return outputs
        t1 = time.perf_counter()
        for item in sched.scheduled:
            seq = item.seq
            prompt_end = max(0, min(seq.num_prompt_tokens, seq.num_computed_tokens + item.num_new_tokens)
                             - seq.num_computed_tokens)
            self.stats.num_computed_prompt_tokens += prompt_end
        num_steps = self.runner.decode_steps
        if self.speculative is not None:
            self.scheduler.reserve_spec_tokens(sched, self.speculative.proposal_lengths(sched, self.max_model_len))
        elif not self.scheduler.reserve_decode_steps(sched, num_steps, self.max_model_len):
            num_steps = 1
        result = self.runner.execute(sched, num_steps)
        self._record_prompt_logprobs(sched, result.prompt_logprobs)  # before num_computed_tokens advances
        self.scheduler.after_step(sched, result.num_tokens)
        if self.speculative is not None:
            self.speculative.record(sched, result.num_tokens)
        t2 = time.perf_counter()
        outputs.extend(self._postprocess(sched, result))
        t3 = time.perf_counter()
        self._record_step(t1 - t0, result, t3 - t2)
        return outputs

    @staticmethod
    def _record_prompt_logprobs(sched: SchedulerOutput, spans) -> None:
        """Stores a step's prompt logprobs (runner PromptLogprobSpans) in their requests;
        call before the step advances num_computed_tokens."""
        for span in spans:
            seq = sched.scheduled[span.row].seq
            request = seq.request
            start = seq.num_computed_tokens + 1 + span.skipped
            request.prompt_logprobs[start:start + len(span.logprobs)] = span.logprobs.tolist()
            if span.top_ids is not None and request.prompt_top_logprobs is not None:
                n = request.sampling_params.top_n_tokens
                ids, lps = span.top_ids[:, :n].tolist(), span.top_logprobs[:, :n].tolist()
                request.prompt_top_logprobs[start:start + len(ids)] = [list(zip(i, lp)) for i, lp in zip(ids, lps)]

    def _record_step(self, schedule_time: float, result, postprocess_time: float) -> None:
        """Adds one step's times to the stats (``result``: the runner's output, which
        carries its host and device times)."""
        st = self.stats
        st.num_steps += 1
        st.schedule_time += schedule_time
        st.host_time += result.host_time
        st.device_time += result.device_time
        st.postprocess_time += postprocess_time

    def _postprocess(self, sched: SchedulerOutput, result) -> list[RequestOutput]:
        now = time.monotonic()
        new_tokens: dict[str, dict[int, list]] = {}
        for i, item in enumerate(sched.scheduled):
            seq = item.seq
            for j in range(int(result.num_tokens[i])):  # 0 for a prompt chunk that samples nothing
                if seq.is_finished:
                    break  # tokens past a stop inside a multi-token step are dropped
                self._append_token(seq, int(result.token_ids[i, j]), float(result.logprobs[i, j]),
                                   result.top_ids[i, j], result.top_logprobs[i, j], now, new_tokens)

        outputs = []
        for request_id, per_seq in new_tokens.items():
            request = self.requests.get(request_id)
            if request is None:
                continue
            out = self._request_output(request, per_seq)
            if request.is_finished:
                request.finish_time = now
                del self.requests[request_id]
                if self.speculative is not None:
                    out.spec_decode = self.speculative.finish(request)
            outputs.append(out)
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: float, top_ids, top_logprobs, now: float,
                      new_tokens: dict[str, dict[int, list]]) -> None:
        """Appends one sampled token to ``seq`` (logprobs, stop checks) and records it in
        ``new_tokens`` (request id -> sequence index -> [(token, logprob entry)])."""
        request = seq.request
        params = request.sampling_params
        if request.first_token_time is None:
            request.first_token_time = now
        if params.scores_only:  # the prompt is scored: nothing to append
            new_tokens.setdefault(request.request_id, {}).setdefault(seq.index, [])
            return self._finish(seq, "length")
        seq.token_ids.append(token)
        self.stats.num_generated_tokens += 1
        seq.cumulative_logprob += logprob
        entry = None
        if params.logprobs or params.top_n_tokens:
            top = [(int(t), float(lp), self._token_text(int(t)))
                   for t, lp in zip(top_ids[:params.top_n_tokens], top_logprobs[:params.top_n_tokens])]
            entry = TokenLogprob(token, logprob, self._token_text(token), top)
            seq.output_logprobs.append(entry)
        new_tokens.setdefault(request.request_id, {}).setdefault(seq.index, []).append((token, entry))
        self._check_stop(seq, token)

    def _token_text(self, token: int) -> str:
        """One token's text (for logprob entries); cached: top-n asks for up to 21 per token."""
        text = self._token_texts.get(token)
        if text is None:
            text = "" if self.tokenizer is None else self.tokenizer.decode([token], skip_special_tokens=False)
            self._token_texts[token] = text
        return text

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.request.sampling_params
        # A stopping token's text is not part of the output (it was never detokenized).
        if token in self.eos_token_ids and not params.ignore_eos:
            return self._finish(seq, "eos_token", text_excludes_last=True)
        if token in params.stop_token_ids:
            return self._finish(seq, "stop_sequence", text_excludes_last=True)
        if seq.request.incremental_text:
            previous_len = len(seq.text)
            self.detokenizer.append(seq)
            cut = find_stop(seq, previous_len)
            if cut is not None:
                seq.text = seq.text[:cut]
                return self._finish(seq, "stop_sequence")
        if seq.num_output_tokens >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, text_excludes_last: bool = False) -> None:
        if not seq.request.incremental_text and self.tokenizer is not None:
            # Decoded once, as the incremental path would have built it.
            ids = seq.output_token_ids[:-1] if text_excludes_last else seq.output_token_ids
            seq.text = self.tokenizer.decode(
                ids, skip_special_tokens=seq.request.sampling_params.skip_special_tokens,
                clean_up_tokenization_spaces=False)
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.scheduler.finish(seq)

    def _request_output(self, request: Request, per_seq: dict[int, list]) -> RequestOutput:
        seqs = request.sequences
        params = request.sampling_params
        finished = request.is_finished
        if finished and params.best_of and params.best_of > params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:params.n]
        elif len(seqs) > params.n:
            seqs = seqs[:params.n]
        # Each sequence's streamable text delta (a possible stop-string start held back).
        deltas = {}
        for s in request.sequences:
            emit_to = streamable_length(s)
            deltas[s.index] = s.text[s.emitted_text_len:emit_to]
            s.emitted_text_len = max(s.emitted_text_len, emit_to)
        completions = [
            CompletionOutput(index=i, text=s.text, token_ids=s.output_token_ids,
                             finish_reason=s.finish_reason,
                             logprobs=list(s.output_logprobs) if (params.logprobs or params.top_n_tokens) else None,
                             cumulative_logprob=s.cumulative_logprob, text_delta=deltas[s.index],
                             new_token_ids=[t for t, _ in per_seq.get(s.index, [])])
            for i, s in enumerate(seqs)]
        # The request-level deltas follow the first sequence.
        new = per_seq.get(0, [])
        delta = deltas[request.sequences[0].index]
        # Complete once the prompt has run (by the first token): attached from then on.
        prompt_done = finished or request.first_token_time is not None
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids, outputs=completions, finished=finished,
            new_token_ids=[t for t, _ in new], text_delta=delta,
            new_logprobs=[e for _, e in new if e is not None],
            error=request.error,
            prompt_logprobs=request.prompt_logprobs if prompt_done else None,
            prompt_top_logprobs=request.prompt_top_logprobs if prompt_done else None)

    # -- convenience -----------------------------------------------------------------

    def run_until_done(self) -> list[RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    finals[out.request_id] = out
        return list(finals.values())

