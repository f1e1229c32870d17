"""Tiny random T5 checkpoints (transformers + torch as the oracle), their greedy decoder
tokens and logits, and a small word-level tokenizer that AutoTokenizer loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# v1.0: ReLU MLP, head tied to the embeddings and fed d_model ** -0.5 x the last hidden
# state. v1.1 / Flan-T5: gated GeLU-tanh, an untied head, no scaling. Encoder and decoder
# depths differ, and max_distance 20 puts prompts of 40 tokens in the logarithmic buckets.
VARIANTS = {
    "t5_v10": dict(feed_forward_proj="relu", tie_word_embeddings=True, init_std=0.3),
    "t5_v11": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, init_std=0.2),
}
VOCAB = 128


def make_t5(directory, variant: str, *, vocab_size: int = VOCAB, seed: int = 0):
    """Writes config.json + model.safetensors of a tiny random T5 ``variant`` into
    ``directory``; returns the transformers model (float32, eval) it holds."""
    import torch
    import transformers
    from safetensors.torch import save_file

    options = VARIANTS[variant]
    config = transformers.T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj=options["feed_forward_proj"], tie_word_embeddings=options["tie_word_embeddings"],
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # transformers' init leaves a tiny random T5 repeating one token (its embeddings
        # dominate the residual stream); N(0, init_std) everywhere gives varied greedy tokens.
        # Norm weights start at 1: perturbed, so that a swapped or missing norm shows.
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, options["init_std"])
        if not options["tie_word_embeddings"]:  # Flan-T5: a head of its own (transformers 5 ties it)
            model.lm_head.weight = torch.nn.Parameter(options["init_std"] * torch.randn(vocab_size, config.d_model))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tied = options["tie_word_embeddings"]
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
               if not k.endswith("embed_tokens.weight") and (k != "lm_head.weight" or not tied)}
    save_file(tensors, str(directory / "model.safetensors"))
    saved = config.to_dict()
    # The config as the checkpoints on the hub have it: v1.1 says tie_word_embeddings=false
    # (an untied, unscaled head); v1.0 omits it (tied, scaled).
    saved.pop("scale_decoder_outputs", None)
    saved.pop("tie_word_embeddings", None)
    if not options["tie_word_embeddings"]:
        saved["tie_word_embeddings"] = False
    saved["architectures"] = ["T5ForConditionalGeneration"]
    (directory / "config.json").write_text(json.dumps(saved))
    return model


def hf_greedy(model, prompt_ids, max_new_tokens: int) -> list[int]:
    """transformers' greedy decoder tokens (EOS ignored), one full forward per token."""
    import torch

    enc = torch.tensor([list(prompt_ids)])
    dec = [model.config.decoder_start_token_id]
    with torch.no_grad():
        encoder_out = model.get_encoder()(input_ids=enc)
        for _ in range(max_new_tokens):
            logits = model(encoder_outputs=encoder_out, decoder_input_ids=torch.tensor([dec])).logits
            dec.append(int(logits[0, -1].argmax()))
    return dec[1:]


def hf_logits(model, prompt_ids, decoder_ids) -> np.ndarray:
    """[len(decoder_ids), vocab] logits of transformers for the decoder inputs ``decoder_ids``."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(prompt_ids)]), decoder_input_ids=torch.tensor([list(decoder_ids)]))
    return out.logits[0].float().numpy()


WORDS = ("the a of to and in is it that for on with as was be by this are or at from an not but have "
         "translate English German French summarize question answer cat dog house red blue green big small "
         "one two three four five hello world good day night sun moon").split()


def make_tokenizer(directory) -> list[str]:
    """A word-level tokenizer (<pad> 0, </s> 1, <unk> 2, then words; whitespace split;
    </s> appended to every prompt, as T5's) saved as tokenizer.json + tokenizer_config.json
    in ``directory``. Returns the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = ["<pad>", "</s>", "<unk>"] + WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 512}))
    return vocab
