"""Remote-code tokenizers rebuilt from their data files (converters/remote_tokenizers.py),
checked against the libraries the remote classes call: tiktoken for Qwen v1, sentencepiece
for ChatGLM2/3, InternLM2 and Baichuan. Tiny vocabularies are trained here."""

import base64
import io
import json
import unicodedata

import pytest
import sentencepiece as spm
import tiktoken

from converters.remote_tokenizers import (
    CHATGLM_SPECIAL, QWEN_PATTERN, QWEN_SPECIAL, RemoteTokenizerError, load_remote_tokenizer, read_sentencepiece,
    sentencepiece_backend)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2026, isn't it? Aesop wrote fables.",
    "def add(a, b):\n    return a + b  # sums\n\n\tindented\twith tabs",
    "我们在北京学习机器学习。今天天气很好！",
    "Emoji 🙂🚀 and accents: café, naïve, Ångström; numbers 1234567 and 3.14159.",
    "   leading spaces, trailing spaces   , multiple    inner     spaces\r\nwindows line",
] * 20
TEXTS = [
    "Hello world", "  two leading spaces and  double  inside ", "isn't it 12345?", "机器学习很有趣",
    "café 🙂 naïve", "line one\nline two\n\n\ttab", "Aesop and isopropyl", "unseen ŋ ʒ ǂ characters ∑∫",
    "cafe\u0301 (decomposed)", "x" * 50, " ", "a",
]


# ------------------------------------------------------------------------------------------------
# Qwen v1: qwen.tiktoken
# ------------------------------------------------------------------------------------------------

def _tiny_ranks():
    """A consistent tiktoken rank file: the 256 bytes, then BPE merges learned on CORPUS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
        raw = bytes(decode[c] for c in token)
        if raw not in ranks:
            ranks[raw] = len(ranks)
    return ranks


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_tok")
    ranks = _tiny_ranks()
    (d / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "QWenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    return d, ranks


def test_qwen_tiktoken_ids_match_tiktoken(qwen_dir):
    d, ranks = qwen_dir
    special = {t: len(ranks) + i for i, t in enumerate(QWEN_SPECIAL)}
    reference = tiktoken.Encoding("qwen_tiny", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    tok = load_remote_tokenizer(d)
    texts = TEXTS + ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b<|extra_3|>"]
    for text in texts:
        # tokenization_qwen.py: NFC first, every special token allowed.
        want = reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert tok.encode(text) == want, text
        assert tok.decode(want) == unicodedata.normalize("NFC", text)
    assert tok.convert_tokens_to_ids("<|im_end|>") == len(ranks) + 2
    assert tok.eos_token == "<|endoftext|>"


def test_qwen_chat_template_is_chatml(qwen_dir):
    tok = load_remote_tokenizer(qwen_dir[0])
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_bad_rank_file_is_a_clear_error(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("not-a-line\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "QWenTokenizer"}))
    with pytest.raises(RemoteTokenizerError, match="line 1"):
        load_remote_tokenizer(tmp_path)
    (tmp_path / "qwen.tiktoken").unlink()
    with pytest.raises(RemoteTokenizerError, match="qwen.tiktoken"):
        load_remote_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------------
# SentencePiece: ChatGLM2/3, InternLM2, Baichuan
# ------------------------------------------------------------------------------------------------

def _train_sp(**options) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=600,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2,
                                   **options)
    return model.getvalue()


SP_SETTINGS = {
    "llama_like": dict(add_dummy_prefix=True, remove_extra_whitespaces=False),
    "sp_defaults": dict(add_dummy_prefix=True, remove_extra_whitespaces=True),
    "no_prefix": dict(add_dummy_prefix=False, remove_extra_whitespaces=False),
}


@pytest.fixture(scope="module", params=sorted(SP_SETTINGS))
def sp_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"sp_{request.param}")
    (d / "tokenizer.model").write_bytes(_train_sp(**SP_SETTINGS[request.param]))
    return d, spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def test_sentencepiece_backend_matches_sentencepiece(sp_model):
    d, sp = sp_model
    backend = sentencepiece_backend(read_sentencepiece(str(d / "tokenizer.model")))
    for text in TEXTS:
        want = sp.encode(text)
        assert backend.encode(text, add_special_tokens=False).ids == want, text
        assert backend.decode(want) == sp.decode(want), text


def _write_config(d, config):
    (d / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("cls,add_bos", [("InternLM2Tokenizer", True), ("BaichuanTokenizer", False)])
def test_llama_style_remote_tokenizers(sp_model, cls, add_bos):
    d, sp = sp_model
    _write_config(d, {"tokenizer_class": cls, "add_bos_token": add_bos, "add_eos_token": False,
                      "auto_map": {"AutoTokenizer": [f"tokenization.{cls}", None]},
                      "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    tok = load_remote_tokenizer(d)
    for text in TEXTS:
        assert tok.encode(text) == ([sp.bos_id()] if add_bos else []) + sp.encode(text), text
    assert tok.bos_token_id == sp.bos_id() and tok.eos_token_id == sp.eos_id()
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello world"}], tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == [sp.bos_id()] + sp.encode("Hello world")


def test_chatglm_prefix_and_command_tokens(sp_model):
    d, sp = sp_model
    # ChatGLM3's own template (tokenizer_config.json of THUDM/chatglm3-6b).
    template = ("{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n "
                "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    _write_config(d, {"tokenizer_class": "ChatGLMTokenizer", "chat_template": template,
                      "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}})
    tok = load_remote_tokenizer(d)
    base = sp.vocab_size()
    command = {t: base + i for i, t in enumerate(CHATGLM_SPECIAL)}
    for text in TEXTS:
        # get_prefix_tokens: [gMASK], sop; then SentencePiece's ids.
        assert tok.encode(text) == [base + 1, base + 3] + sp.encode(text), text
    assert base + 3 not in tok.encode("Aesop sop eop", add_special_tokens=False)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids[:3] == [command["[gMASK]"], command["<sop>"], command["<|user|>"]]
    assert ids[-1] == command["<|assistant|>"]
    assert tok.eos_token_id == sp.eos_id()


def test_sentencepiece_file_errors(tmp_path):
    _write_config(tmp_path, {"tokenizer_class": "InternLM2Tokenizer"})
    with pytest.raises(RemoteTokenizerError, match="tokenizer.model"):
        load_remote_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(RemoteTokenizerError, match="not a SentencePiece model"):
        load_remote_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------------
# In the engine: a remote-code checkpoint takes text prompts and chat through the rebuilt tokenizer.
# ------------------------------------------------------------------------------------------------

def test_engine_uses_rebuilt_qwen_tokenizer(tmp_path, qwen_dir):
    import shutil

    from tiny_models import make_model

    from lmidist_jax import LLM, SamplingParams

    src, ranks = qwen_dir
    vocab = len(ranks) + len(QWEN_SPECIAL)
    make_model(tmp_path, "qwen", vocab_size=vocab)
    for name in ("qwen.tiktoken", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "tokenization_qwen.py").write_text("raise SystemExit('remote tokenizer code must never run')\n")
    llm = LLM(str(tmp_path), dtype="fp32", max_model_len=128, num_kv_blocks=32, warmup=False, progress=False)
    assert llm.engine.tokenizer is not None
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompt = "Hello world, 机器学习"
    by_text = llm.generate([prompt], params, use_tqdm=False)[0]
    ids = load_remote_tokenizer(src).encode(prompt)
    by_ids = llm.generate([ids], params, use_tqdm=False)[0]
    assert by_text.token_ids == by_ids.token_ids
    assert isinstance(by_text.text, str)
    chat = llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False)[0]
    assert len(chat.token_ids) == 8
