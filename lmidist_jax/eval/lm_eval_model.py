"""The native lm-evaluation-harness model: ``--model lmidist-jax`` (alias ``lmidist``).

``--model_args pretrained=<model id or dir>,<engine option>=<value>,...`` takes the
engine's options by their serving.properties names (``dtype``, ``max_model_len``,
``max_rolling_batch_size``, ``max_rolling_batch_prefill_tokens``, ...) beside lm-eval's
usual ``tokenizer``, ``max_length``, ``max_gen_toks``, ``add_bos_token``,
``prefix_token_id``. Tokenization is the HF tokenizer's, exactly as lm-eval's ``hf``
model does it; the engine then only sees token ids.

- ``loglikelihood``: each context + continuation is one scoring request
  (``max_new_tokens=0`` with the continuation's logprobs and the best alternative at each
  of its positions): one prefill, no generated token, and every request of the call in
  one rolling batch. Requests sharing a context (a question's choices) are ordered so that
  the later ones take it from the prefix cache (``enable_prefix_caching`` is on by default
  here). ``is_greedy`` is lm-eval's: every continuation token is its position's argmax.
  Inputs are left-truncated to ``max_length + 1`` tokens as the ``hf`` model does.
- ``loglikelihood_rolling``: the ``hf`` model's token windows (``get_rolling_token_windows``
  with ``max_seq_len=max_length``, context 1), all windows of all documents in one batch.
- ``generate_until``: stop strings (``until`` plus the EOS text), ``max_gen_toks``,
  greedy or sampled (``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
  penalties, ``seed``); the output is the HF tokenizer's decoding of the generated ids
  cut at the first stop string, as the ``hf`` model does.

``max_length`` defaults to the engine's ``max_model_len`` (by default the model's
``max_position_embeddings``, the ``hf`` model's default too): a scoring request never
runs its last token, so ``max_length`` input tokens fit in ``max_model_len``.
``batch_size`` / ``max_batch_size`` / ``device`` are accepted and ignored: the rolling
batch (``max_rolling_batch_size``, ``max_rolling_batch_prefill_tokens``) sets the
batching, and JAX the device.
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)

from ..sampling_params import SamplingParams

logger = logging.getLogger("lmidist_jax.eval")

# generate_until keyword -> SamplingParams field.
GEN_KWARGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
              "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
              "frequency_penalty": "frequency_penalty", "seed": "seed"}


@register_model("lmidist-jax", "lmidist")
class LmidistJaxLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, *, tokenizer: str | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 batch_size: Any = None, max_batch_size: Any = None, device: str | None = None,
                 revision: str | None = None, trust_remote_code: bool = False, **engine_options):
        super().__init__()
        import transformers

        from ..llm import LLM
        from ..model_store import DEFAULT_MODEL, resolve_model

        if device not in (None, "cpu", "cuda", "gpu"):
            logger.warning("device=%r is ignored: the engine runs on JAX's default devices", device)
        model_dir = resolve_model(str(pretrained or DEFAULT_MODEL), revision)
        if revision is not None:
            engine_options["revision"] = revision
        # The choices of a question share its context: computed once, reused from the cache.
        engine_options.setdefault("enable_prefix_caching", True)
        self.llm = LLM(str(model_dir), progress=False, **engine_options)
        kwargs = {"trust_remote_code": trust_remote_code}
        if add_bos_token is not None:
            kwargs["add_bos_token"] = add_bos_token
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or str(model_dir), **kwargs)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        engine = self.llm.engine
        self._max_length = int(max_length) if max_length else engine.max_model_len
        if self._max_length > engine.max_model_len:
            raise ValueError(f"max_length={self._max_length} exceeds the engine's max_model_len={engine.max_model_len}"
                             f": lower max_length or raise max_model_len")
        if engine.max_logprobs < 1:
            raise ValueError("loglikelihood needs each position's best token (is_greedy): max_logprobs must be >= 1")
        self._max_gen_toks = int(max_gen_toks)
        self.pretrained = str(pretrained or DEFAULT_MODEL)
        self.model_dir = str(model_dir)

    # -- what lm-eval asks of a model ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_dir": self.model_dir, "dtype": str(self.llm.engine.runner.model.dtype),
                "max_model_len": self.llm.engine.max_model_len}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """As lm-eval's ``hf`` model: the tokenizer's default special tokens (or
        ``add_bos_token``), none when the text already starts with the prefix token."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def _context_encode(self, context: str) -> list[int]:
        """A generation context as the ``hf`` model's batch encoding tokenizes it."""
        special = {}
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        return self.tokenizer(context, **special).input_ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- scoring ------------------------------------------------------------------------

    def _generate(self, prompts: list[list[int]], params, disable_tqdm: bool):
        outs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm)
        for out in outs:
            if out.error:
                raise RuntimeError(f"the engine refused a request of {len(out.prompt_token_ids)} tokens: {out.error}")
        return outs

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(cache key, context ids, continuation ids) -> (sum of the continuation's
        logprobs, whether every continuation token is its position's argmax), all in one
        rolling batch of scoring requests."""
        if not requests:
            return []
        prompts, starts = [], []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("a loglikelihood request needs a non-empty context and continuation")
            if len(continuation) > self.max_length:
                raise ValueError(f"the continuation has {len(continuation)} tokens, over max_length={self.max_length}")
            # The hf model's left truncation: the model reads at most max_length tokens.
            tokens = (context + continuation)[-(self.max_length + 1):]
            prompts.append(tokens)
            starts.append(len(tokens) - len(continuation))
        # Only the continuation's logprobs are wanted: the context may come from the prefix cache.
        params = [SamplingParams(max_new_tokens=0, prompt_logprobs=True, prompt_logprobs_from=start, top_n_tokens=1)
                  for start in starts]
        order = self._context_sharing_order(prompts, starts)
        ran = self._generate([prompts[i] for i in order], [params[i] for i in order], disable_tqdm)
        outs = [None] * len(prompts)
        for i, out in zip(order, ran):
            outs[i] = out
        results = []
        for (cache_key, _, _), tokens, start, out in zip(requests, prompts, starts, outs):
            logprobs = out.prompt_logprobs[start:]
            best = out.prompt_top_logprobs[start:]
            answer = (float(sum(logprobs)), all(top[0][0] == t for top, t in zip(best, tokens[start:])))
            results.append(answer)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return results

    def _context_sharing_order(self, prompts: list[list[int]], starts: list[int]) -> list[int]:
        """The order to submit scoring requests in so that requests sharing a context (the
        choices of a multiple-choice question) reuse its KV from the prefix cache: in waves
        of contexts holding at most half the KV pool, one request per context first, the
        others after them (the scheduler admits in order, so by then their context is
        cached, unless it shared their step)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (tokens, start) in enumerate(zip(prompts, starts)):
            groups.setdefault(tuple(tokens[:start]), []).append(i)
        runner = self.llm.engine.runner
        wave_budget = runner.num_blocks * runner.block_size // 2
        order, leaders, followers, wave_tokens = [], [], [], 0
        for context, members in groups.items():
            leaders.append(members[0])
            followers += members[1:]
            wave_tokens += len(context)
            if wave_tokens >= wave_budget:
                order += leaders + followers
                leaders, followers, wave_tokens = [], [], 0
        return order + leaders + followers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------

    def _sampling_params(self, gen_kwargs: dict, eos: str) -> tuple[SamplingParams, list[str]]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"generation arguments {unknown} are not supported by lmidist-jax; accepted: until, "
                             f"max_gen_toks (or max_new_tokens, max_tokens), do_sample, {', '.join(GEN_KWARGS)}")
        fields = {GEN_KWARGS[k]: v for k, v in kwargs.items() if v is not None}
        if not do_sample:
            fields["temperature"] = 0.0
        # Stop strings are matched on text with special tokens, as the hf model's stopping criteria do.
        params = SamplingParams(max_new_tokens=max_gen_toks, stop_sequences=[s for s in until if s],
                                skip_special_tokens=False, **fields)
        return params, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            p, until = self._sampling_params(gen_kwargs, eos)
            room = self.max_length - p.max_new_tokens
            if room <= 0:
                raise ValueError(f"max_gen_toks={p.max_new_tokens} leaves no room for the context within "
                                 f"max_length={self.max_length}")
            prompts.append(self._context_encode(context)[-room:])
            params.append(p)
            stops.append(until)
        outs = self._generate(prompts, params, disable_tqdm)
        results = []
        for (context, gen_kwargs), out, until in zip((req.args for req in requests), outs, stops):
            text = postprocess_generated_text(self.tok_decode(out.token_ids), until, None)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results
