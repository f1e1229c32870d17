"""The Python API: ``LLM(model_id, **options).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from typing import Sequence as Seq

import numpy as np

from .outputs import CompletionOutput, RequestOutput
from .sampling_params import RequestError, SamplingParams

Prompt = str | Seq[int]
Message = dict[str, str]


class LLM:
    """An engine for offline use (notebooks, scripts, benchmarks).

    ``model_id``: a local HF directory, an HF id already in the local HF cache, or a
    known name ("smollm2", the default when None). ``options`` use the
    serving.properties option names (``max_rolling_batch_size=8``, ``dtype="bf16"``...).
    Step buckets compile the first time a step uses them (one-off generations compile
    only what they need; with the persistent compilation cache, option
    ``compilation_cache_dir``, a later process loads them from disk). ``warmup=True``
    compiles every bucket up front, as ``serve`` does, so that no later step compiles.
    """

    def __init__(self, model_id: str | None = None, *, warmup: bool = False, progress: bool = True,
                 **options):
        from .config import config_from_kwargs
        from .engine.factory import build_engine

        from .engine import multihost

        self.config = config_from_kwargs(model_id, **options)
        self.engine = build_engine(self.config, warmup=warmup, progress=progress)
        self._ids = itertools.count()
        self.is_follower = multihost.is_multiprocess() and not multihost.is_leader()
        if self.is_follower:
            # Multi-host: processes other than 0 run the leader's steps until it shuts down.
            multihost.follow(self.engine.runner)

    def shutdown(self) -> None:
        """Multi-host: tell the follower processes to return from LLM(...)."""
        from .engine import multihost

        if multihost.is_multiprocess() and multihost.is_leader():
            multihost.broadcast_stop()

    @classmethod
    def from_engine(cls, engine) -> "LLM":
        llm = cls.__new__(cls)
        llm.config = None
        llm.engine = engine
        llm._ids = itertools.count()
        llm.is_follower = False
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, adapters: str | Seq[str | None] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (a string, or a list of token ids). Returns one
        RequestOutput per prompt, in order. An invalid prompt (too long, bad ids) gets
        an output with ``error`` set and finish_reason "error"; the others run normally.

        ``adapters``: a registered LoRA adapter name for every prompt, or a list with a
        name (or None: the base model) per prompt. An unknown name raises ValueError
        before anything runs."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        adapter_list = self._adapter_list(adapters, len(prompts))

        if self.is_follower:
            raise RuntimeError("generate() runs on process 0; this process follows its steps")
        engine = self.engine
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, params, adapter in zip(prompts, params_list, adapter_list):
            request_id = f"gen-{next(self._ids)}"
            order.append(request_id)
            try:
                engine.add_request(request_id, prompt, params, stream=False, adapter=adapter)
            except RequestError as e:
                results[request_id] = _error_output(request_id, prompt, str(e))

        from tqdm.auto import tqdm

        pending = set(order)
        bar = tqdm(total=len(prompts), desc="generating", disable=not use_tqdm, unit="req")
        bar.update(len(results))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id in pending and out.request_id not in results:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[r] for r in order]

    def chat(self, messages: Seq[Message] | Seq[Seq[Message]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True,
             adapters: str | Seq[str | None] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages)
        or to several, through the model's chat template. ``adapters``: as in `generate`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        adapters = self._adapter_list(adapters, len(conversations))  # checked before templating
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, adapters=adapters)

    # -- LoRA adapters -------------------------------------------------------------------

    def add_adapter(self, name: str, path) -> dict:
        """Registers the PEFT LoRA adapter in directory ``path`` (adapter_config.json and
        adapter_model.safetensors or .bin) as ``name``; needs ``enable_lora=True``. Raises
        ValueError naming what is wrong (and changes nothing) if it does not fit the model."""
        return self.engine.add_adapter(name, str(path))

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def list_adapters(self) -> list[dict]:
        """The registered adapters: name, source directory, rank, target modules, where held."""
        return self.engine.list_adapters()

    def _adapter_list(self, adapters, count: int) -> list[str | None]:
        if adapters is None or isinstance(adapters, str):
            names = [adapters] * count
        else:
            names = list(adapters)
            if len(names) != count:
                raise ValueError(f"got {len(names)} adapters for {count} prompts: pass one name for all, or a "
                                 f"name or None per prompt")
        for name in dict.fromkeys(names):
            try:
                self.engine.check_adapter(name)
            except RequestError as e:
                raise ValueError(str(e)) from None
        return names

    def apply_chat_template(self, messages: Seq[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.engine.encode_chat(messages, add_generation_prompt)


def _error_output(request_id: str, prompt, message: str) -> RequestOutput:
    return RequestOutput(
        request_id=request_id, prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=[] if isinstance(prompt, str) else list(prompt),
        outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")],
        finished=True, error=message)
