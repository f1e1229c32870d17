"""Tokenizers of remote-code checkpoints, rebuilt from their data files without their code.

Qwen v1, ChatGLM2/3, InternLM2 and Baichuan ship a Python tokenizer class
(``tokenizer_config.json`` names it through ``auto_map``) that lmidist-jax never runs. The
data those classes read is plain: a tiktoken rank file or a SentencePiece model. Each is
rebuilt here as a transformers fast tokenizer that encodes the same ids:

  QWenTokenizer      ``qwen.tiktoken`` (base64 token, rank per line): byte-level BPE, merges
                     derived from the ranks (tiktoken merges the lowest-rank pair, a whole
                     pre-token found in the ranks is one token); Qwen's split regex, NFC; the
                     special tokens <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0..204|>
                     numbered from 151643 (tokenization_qwen.py); ChatML chat template.
  ChatGLMTokenizer   ``tokenizer.model``: SentencePiece encode, prefixed with [gMASK] sop;
                     the command tokens [MASK] [gMASK] [sMASK] sop eop <|system|> <|user|>
                     <|assistant|> <|observation|> numbered from the SentencePiece vocabulary
                     size (ChatGLM2 uses the first five; ChatGLM3 all nine). sop/eop are
                     spelled <sop>/<eop> here, so that the word "Aesop" in a prompt stays text
                     (the remote class never matches command tokens in text); a chat template's
                     "[gMASK]sop" is read as "[gMASK]<sop>".
  InternLM2Tokenizer ``tokenizer.model``: LlamaTokenizer's (legacy) SentencePiece encode, with
  BaichuanTokenizer  bos/eos per ``add_bos_token``/``add_eos_token``.

A SentencePiece BPE model becomes an HF BPE whose merges are every split of each normal piece
ranked by its score (SentencePiece merges the adjacent pair whose concatenation scores
highest), with its normalizer settings (dummy prefix, extra whitespace, whitespace escaping)
and byte fallback. Added tokens and the chat template come from ``tokenizer_config.json``.
"""

from __future__ import annotations

import base64
import json
import os

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
QWEN_SPECIAL_START = 151643
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATGLM_SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
                   "<|observation|>")

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SP_BPE = 2


class RemoteTokenizerError(ValueError):
    """A remote-code tokenizer whose files cannot be rebuilt."""


def remote_tokenizer_class(model_dir) -> str | None:
    """The tokenizer class a checkpoint's tokenizer_config.json names, if it is one we rebuild."""
    config = _tokenizer_config(model_dir)
    name = config.get("tokenizer_class")
    return name if name in BUILDERS else None


def load_remote_tokenizer(model_dir):
    """A fast tokenizer equivalent to the checkpoint's remote one, or None when its class is
    not one of ``BUILDERS``."""
    config = _tokenizer_config(model_dir)
    builder = BUILDERS.get(config.get("tokenizer_class"))
    return None if builder is None else builder(str(model_dir), config)


def _tokenizer_config(model_dir) -> dict:
    path = os.path.join(str(model_dir), "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _require(model_dir: str, name: str, cls: str) -> str:
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
        raise RemoteTokenizerError(f"{cls} needs {name} in {model_dir}, which is missing")
    return path


def _token_text(token) -> str:
    return token["content"] if isinstance(token, dict) else token


def _fast(backend, config: dict, *, default_chat_template: str | None = None, **kwargs):
    """The transformers tokenizer around ``backend``; the checkpoint's own chat template
    (tokenizer_config.json) wins over the family's default."""
    from transformers import PreTrainedTokenizerFast

    kwargs["chat_template"] = config.get("chat_template") or default_chat_template
    kwargs.setdefault("clean_up_tokenization_spaces", False)
    max_len = config.get("model_max_length")
    if isinstance(max_len, int):
        kwargs["model_max_length"] = max_len
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in kwargs.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# Qwen v1 (tiktoken)
# ---------------------------------------------------------------------------------------------

def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """``qwen.tiktoken``: one "base64(token bytes) rank" per line."""
    ranks = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise RemoteTokenizerError(f"{path} line {number} is not 'base64-token rank'") from None
    return ranks


def tiktoken_backend(ranks: dict[bytes, int], pattern: str, special: dict[str, int]):
    """A byte-level BPE ``tokenizers.Tokenizer`` that encodes as tiktoken does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_encoder = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        # Every split whose halves are tokens: the BPE reaches `token` from one of them.
        splits = sorted((ranks[token[:k]], ranks[token[k:]], k) for k in range(1, len(token))
                        if token[:k] in ranks and token[k:] in ranks)
        merges.extend((text(token[:k]), text(token[k:])) for _, _, k in splits)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # Special tokens get the ids the remote class gives them (after the ranks).
    for token, token_id in sorted(special.items(), key=lambda item: item[1]):
        if backend.get_vocab_size(with_added_tokens=True) != token_id:
            raise RemoteTokenizerError(f"special token {token} should have id {token_id}, but the rank file has "
                                       f"{backend.get_vocab_size(with_added_tokens=True)} entries before it")
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return backend


def build_qwen(model_dir: str, config: dict):
    ranks = read_tiktoken_ranks(_require(model_dir, "qwen.tiktoken", "QWenTokenizer"))
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise RemoteTokenizerError("qwen.tiktoken ranks are not 0..n-1")
    start = QWEN_SPECIAL_START if len(ranks) == QWEN_SPECIAL_START else len(ranks)
    special = {token: start + i for i, token in enumerate(QWEN_SPECIAL)}
    backend = tiktoken_backend(ranks, QWEN_PATTERN, special)
    # tokenization_qwen.py: eos/pad are <|endoftext|>; no bos; chat (qwen_generation_utils) is ChatML.
    return _fast(backend, config, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                 default_chat_template=CHATML_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# SentencePiece (ChatGLM2/3, InternLM2, Baichuan)
# ---------------------------------------------------------------------------------------------

def read_sentencepiece(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        try:
            proto.ParseFromString(f.read())
        except Exception as e:  # noqa: BLE001  (protobuf's DecodeError)
            raise RemoteTokenizerError(f"{path} is not a SentencePiece model: {e}") from None
    if proto.trainer_spec.model_type != _SP_BPE:
        raise RemoteTokenizerError(f"{path} is a SentencePiece model of type {proto.trainer_spec.model_type}; "
                                   f"only BPE (2) models are rebuilt")
    return proto


def sentencepiece_backend(proto, *, added: tuple[str, ...] = ()):
    """An HF BPE ``tokenizers.Tokenizer`` encoding as ``SentencePieceProcessor.encode`` does
    (for text without the user-defined pieces; those in ``added`` split the text first, as
    the remote classes' added tokens do)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    pieces = proto.pieces
    tokens = [p.piece for p in pieces]
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = sorted((i for i, p in enumerate(pieces) if p.type == _NORMAL and len(p.piece) > 1),
                    key=lambda i: (-pieces[i].score, i))
    merges = []
    for i in normal:
        t = tokens[i]
        splits = sorted((vocab[t[:k]], vocab[t[k:]], k) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab)
        merges.extend((t[:k], t[k:]) for _, _, k in splits)
    unk = tokens[proto.trainer_spec.unk_id] if 0 <= proto.trainer_spec.unk_id < len(tokens) else None
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                   byte_fallback=byte_fallback, dropout=None))
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    backend.normalizer = normalizers.Sequence(steps) if steps else None
    decode = [decoders.Replace("\u2581", " ")] + ([decoders.ByteFallback()] if byte_fallback else [])
    decode.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(decode)
    control = [t for t, p in zip(tokens, pieces) if p.type in (_CONTROL, _UNKNOWN)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if added:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    return backend


def _post_processor(prefix: list[tuple[str, int]], suffix: list[tuple[str, int]]):
    from tokenizers import processors

    if not prefix and not suffix:
        return None
    single = [f"{t}:0" for t, _ in prefix] + ["$A:0"] + [f"{t}:0" for t, _ in suffix]
    pair = single + [f"{t}:1" for t, _ in prefix] + ["$B:1"] + [f"{t}:1" for t, _ in suffix]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict(prefix + suffix).items()))


def _config_added_tokens(config: dict) -> dict[int, str]:
    return {int(i): _token_text(t) for i, t in (config.get("added_tokens_decoder") or {}).items()}


def build_llama_style(model_dir: str, config: dict, cls: str):
    """InternLM2Tokenizer / BaichuanTokenizer: copies of the (legacy) LlamaTokenizer over
    SentencePiece; bos/eos from the SentencePiece model unless the config names others."""
    from tokenizers import AddedToken

    proto = read_sentencepiece(_require(model_dir, "tokenizer.model", cls))
    tokens = [p.piece for p in proto.pieces]
    added = _config_added_tokens(config)
    extra = sorted((i, t) for i, t in added.items() if i >= len(tokens))
    inside = tuple(t for i, t in sorted(added.items()) if i < len(tokens) and tokens[i] == t)
    for i, t in added.items():
        if i < len(tokens) and tokens[i] != t:
            raise RemoteTokenizerError(f"tokenizer_config.json gives id {i} to {t!r}, the SentencePiece model "
                                       f"to {tokens[i]!r}")
    backend = sentencepiece_backend(proto, added=inside)
    for i, t in extra:
        if backend.get_vocab_size(with_added_tokens=True) != i:
            raise RemoteTokenizerError(f"added token {t!r} has id {i}, not the next free id")
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)])

    def piece(key: str, index: int) -> str | None:
        value = config.get(key)
        if value is not None:
            return _token_text(value)
        return tokens[index] if 0 <= index < len(tokens) else None

    bos, eos = piece("bos_token", proto.trainer_spec.bos_id), piece("eos_token", proto.trainer_spec.eos_id)
    unk = piece("unk_token", proto.trainer_spec.unk_id)
    add_bos = bool(config.get("add_bos_token", True)) and bos is not None
    add_eos = bool(config.get("add_eos_token", False)) and eos is not None
    vocab = backend.get_vocab()
    backend.post_processor = _post_processor([(bos, vocab[bos])] if add_bos else [],
                                             [(eos, vocab[eos])] if add_eos else [])
    pad = config.get("pad_token")
    return _fast(backend, config, bos_token=bos, eos_token=eos, unk_token=unk,
                 pad_token=_token_text(pad) if pad is not None else None)


def build_chatglm(model_dir: str, config: dict):
    """ChatGLM2/3: SentencePiece ids, then the command tokens after the vocabulary; every
    encoded prompt starts with [gMASK] sop (``get_prefix_tokens``)."""
    from tokenizers import AddedToken

    proto = read_sentencepiece(_require(model_dir, "tokenizer.model", "ChatGLMTokenizer"))
    backend = sentencepiece_backend(proto, added=())
    base = len(proto.pieces)
    for i, token in enumerate(CHATGLM_SPECIAL):
        if backend.get_vocab_size(with_added_tokens=True) != base + i:
            raise RemoteTokenizerError(f"ChatGLM command token {token} should get id {base + i}")
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    vocab = backend.get_vocab()
    backend.post_processor = _post_processor([("[gMASK]", vocab["[gMASK]"]), ("<sop>", vocab["<sop>"])], [])
    tokens = [p.piece for p in proto.pieces]
    eos = tokens[proto.trainer_spec.eos_id]
    unk = tokens[proto.trainer_spec.unk_id]
    template = config.get("chat_template")
    if template:
        config = dict(config, chat_template=template.replace("[gMASK]sop", "[gMASK]<sop>"))
    return _fast(backend, config, eos_token=eos, unk_token=unk, pad_token=unk)


BUILDERS = {
    "QWenTokenizer": build_qwen,
    "ChatGLMTokenizer": build_chatglm,
    "InternLM2Tokenizer": lambda d, c: build_llama_style(d, c, "InternLM2Tokenizer"),
    "BaichuanTokenizer": lambda d, c: build_llama_style(d, c, "BaichuanTokenizer"),
}
