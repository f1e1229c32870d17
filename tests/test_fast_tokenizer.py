"""The transformers-free tokenizer path (engine/fast_tokenizer.py) gives transformers'
results: encode, decode, special tokens, chat template; and falls back where it cannot."""

from __future__ import annotations

import copy
import json

import pytest
import transformers

from lmidist_jax.engine.factory import load_tokenizer
from lmidist_jax.engine.fast_tokenizer import FastTokenizer, load_fast_tokenizer
from lmidist_jax.model_store import fetch_model

TEXTS = ["What is the capital of France?", "  leading spaces and\ttabs\nnewlines  ", "émoji 🙂 and 日本語",
         "<|im_start|>user\nhi<|im_end|>", "def add(a, b):\n    return a + b", ""]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


@pytest.fixture(scope="module")
def default_model_dir():
    return fetch_model("smollm2")


def _both(model_dir):
    fast = load_tokenizer(model_dir)
    assert isinstance(fast, FastTokenizer), "the default model's tokenizer should take the fast path"
    return fast, transformers.AutoTokenizer.from_pretrained(str(model_dir))


def test_default_model_matches_transformers(default_model_dir):
    fast, hf = _both(default_model_dir)
    for text in TEXTS:
        assert fast.encode(text) == hf.encode(text), text
        assert fast.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    ids = hf.encode("Paris is the capital <|im_end|> of France 🙂") + [0, 1, 2, 49151]
    for skip in (False, True):
        assert fast.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == \
            hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert fast.decode(ids[3:7], skip_special_tokens=skip) == hf.decode(ids[3:7], skip_special_tokens=skip)
    assert fast.get_vocab() == hf.get_vocab()
    assert fast.special_tokens_map == hf.special_tokens_map
    assert fast.chat_template == hf.chat_template
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert fast.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == \
                hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert fast.apply_chat_template(messages, add_generation_prompt=gen)["input_ids"] == \
                list(hf.apply_chat_template(messages, add_generation_prompt=gen)["input_ids"])
    # Delegated attributes come from transformers; copies work (the engine loop pools them).
    assert fast.eos_token_id == hf.eos_token_id
    assert copy.deepcopy(fast).encode(TEXTS[0]) == hf.encode(TEXTS[0])


def make_tokenizer(directory) -> None:
    """A word-level tokenizer (<pad> 0, </s> 1, <unk> 2, then words; </s> appended to every
    text) saved as tokenizer.json + tokenizer_config.json, its special tokens not added ones."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = "hello world good day user assistant system red blue tools are not supported".split()
    vocab = ["<pad>", "</s>", "<unk>"] + words
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 512}))


def _template_model(tmp_path, template: str, **config):
    from tokenizers import Tokenizer

    make_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])  # as transformers would add them
    tok.save(str(tmp_path / "tokenizer.json"))
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"chat_template": template, "bos_token": "<pad>"}
                               | config))
    return str(tmp_path)


# Special-token variables, loop controls, tojson (not HTML-escaped), raise_exception, strftime_now.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
            "{{ raise_exception('tools are not supported') }}{% endif %}"
            "{% if loop.index > 3 %}{% break %}{% endif %}"
            "{{ m['role'] }} {{ m['content'] }} {{ m | tojson }} {{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant {{ strftime_now('%Y') }}{% endif %}")


def test_template_features_match_transformers(tmp_path):
    model_dir = _template_model(tmp_path, TEMPLATE)
    fast, hf = _both(model_dir)
    messages = [{"role": "user", "content": "hello <world> & good day"}] * 5
    for gen in (True, False):
        assert fast.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == \
            hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert fast.apply_chat_template(messages, add_generation_prompt=gen)["input_ids"] == \
            list(hf.apply_chat_template(messages, add_generation_prompt=gen)["input_ids"])
    assert fast.encode("hello world") == hf.encode("hello world")  # its post-processor appends </s>
    for bad in (fast, hf):
        with pytest.raises(Exception, match="tools are not supported"):
            bad.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("change", ["auto_map", "add_bos_token", "class", "no_json", "generation_tag",
                                    "special_token_not_added"])
def test_falls_back_to_transformers(tmp_path, change):
    model_dir = _template_model(tmp_path, TEMPLATE)
    path = tmp_path / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if change == "auto_map":
        config["auto_map"] = {"AutoTokenizer": ["tok.MyTokenizer", None]}
    elif change == "add_bos_token":
        config["add_bos_token"] = True
    elif change == "class":
        config["tokenizer_class"] = "LlamaTokenizer"
    elif change == "generation_tag":
        config["chat_template"] = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    elif change == "special_token_not_added":
        config["mask_token"] = "red"  # a vocabulary word, which transformers would make special
    else:
        (tmp_path / "tokenizer.json").unlink()
    path.write_text(json.dumps(config))
    assert load_fast_tokenizer(model_dir) is None
