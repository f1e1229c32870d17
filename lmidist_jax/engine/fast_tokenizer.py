"""A model's tokenizer.json through the ``tokenizers`` library and its chat template
through jinja2, as transformers' fast tokenizers do, without importing transformers
(which imports torch: ~15 s of a 2-core CPU's start-up). Only tokenizers that
transformers loads as tokenizer.json unchanged take this path (``load_fast_tokenizer``
says which); anything else this class does not implement is delegated to the
transformers tokenizer, loaded on first use.
"""

from __future__ import annotations

import copy
import json
import os
import re
from datetime import datetime

# tokenizer_config classes that transformers loads as tokenizer.json as it is (model
# classes such as LlamaTokenizer may rebuild the pipeline from the vocabulary instead).
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# transformers' special_tokens_map: these attributes, when set.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def load_fast_tokenizer(model_dir) -> "FastTokenizer | None":
    """The fast tokenizer of ``model_dir``, or None when transformers should load it: no
    tokenizer.json, remote code, a model-specific class, options that make transformers
    rewrite the post-processor (add_bos_token / add_eos_token), several chat templates."""
    path = os.path.join(model_dir, "tokenizer.json")
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    if not (os.path.exists(path) and os.path.exists(config_path)):
        return None
    with open(config_path) as f:
        config = json.load(f)
    if ("auto_map" in config or config.get("tokenizer_class") not in GENERIC_CLASSES
            or "add_bos_token" in config or "add_eos_token" in config
            or config.get("clean_up_tokenization_spaces", False)):
        return None
    template = config.get("chat_template")
    template_file = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(template_file):
        with open(template_file) as f:
            template = f.read()
    if (template is not None and not isinstance(template, str)) \
            or os.path.exists(os.path.join(model_dir, "chat_template.json")) \
            or (template is not None and re.search(r"\{%-?\s*generation\s*-?%\}", template)):
        return None  # several templates, or {% generation %} (transformers' own jinja extension)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    if tokenizer.post_processor is None:  # transformers would build one
        return None
    # transformers adds the config's special and added tokens that tokenizer.json lacks
    # (changing how text splits): only a tokenizer.json that has them all is used as it is.
    added = {(t.content, t.special) for t in tokenizer.get_added_tokens_decoder().values()}
    wanted = {(_token_text(config[name]), True) for name in SPECIAL_TOKEN_NAMES if config.get(name) is not None}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key) or []
        wanted |= {(_token_text(t), True) for t in (extra.values() if isinstance(extra, dict) else extra)}
    wanted |= {(t["content"], bool(t.get("special"))) for t in (config.get("added_tokens_decoder") or {}).values()}
    if not wanted <= added:
        return None
    return FastTokenizer(str(model_dir), tokenizer, config, template)


class FastTokenizer:
    """encode / decode / get_vocab / apply_chat_template of a transformers fast tokenizer,
    with the same results; other attributes come from the transformers tokenizer."""

    def __init__(self, name_or_path: str, tokenizer, config: dict, chat_template: str | None):
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.special_tokens_map = {name: _token_text(config[name]) for name in SPECIAL_TOKEN_NAMES
                                   if config.get(name) is not None}
        self._config = config
        self._tokenizer = tokenizer
        self._compiled_template = None
        self._transformers_tokenizer = None

    # -- what the engine uses ------------------------------------------------------

    def encode(self, text: str, *args, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if args or kwargs or not isinstance(text, str):  # pairs, truncation, pre-split words...
            return self._transformers().encode(text, *args, add_special_tokens=add_special_tokens, **kwargs)
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
               **kwargs) -> str:
        if kwargs or clean_up_tokenization_spaces:
            return self._transformers().decode(token_ids, skip_special_tokens=skip_special_tokens,
                                               clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self._tokenizer.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True,
                            return_dict: bool = True, **kwargs):
        """As transformers' for one conversation and these arguments (tokenize=True gives
        {"input_ids", "attention_mask"}, as its return_dict=True default); other
        arguments go to transformers."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        if kwargs or batched or self.chat_template is None:
            return self._transformers().apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                return_dict=return_dict, **kwargs)
        text = self._template().render(messages=conversation, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt, **self.special_tokens_map)
        if not tokenize:
            return text
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids

    # -- the rest ------------------------------------------------------------------

    def _template(self):
        """The chat template compiled as transformers compiles it (chat_template_utils)."""
        if self._compiled_template is None:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                # transformers' replacement of jinja's tojson (which escapes HTML characters)
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            def strftime_now(format):
                return datetime.now().strftime(format)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = strftime_now
            self._compiled_template = env.from_string(self.chat_template)
        return self._compiled_template

    def _transformers(self):
        if self._transformers_tokenizer is None:
            from transformers import AutoTokenizer

            self._transformers_tokenizer = AutoTokenizer.from_pretrained(self.name_or_path,
                                                                         trust_remote_code=False)
        return self._transformers_tokenizer

    def __getattr__(self, name):
        if name.startswith("_"):  # copy / pickle probes, private fields not yet set
            raise AttributeError(name)
        return getattr(self._transformers(), name)

    def __deepcopy__(self, memo):  # a copy per request thread (engine_loop.TokenizerPool)
        return FastTokenizer(self.name_or_path, copy.deepcopy(self._tokenizer, memo), self._config,
                             self.chat_template)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)
