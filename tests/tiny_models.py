"""Tiny random models of each supported family (< 1 M parameters) for fast CPU tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
}


def tiny_model(
    family: str = "llama", attn: str = "sdpa", seed: int = 0, layers: int = 2, dtype=torch.float32
):
    """A deterministic random causal LM: hidden 64, 4 heads / 2 kv heads, FFN 128, vocab 128."""
    config = AutoConfig.for_model(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation=attn,
        **FAMILIES[family],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Larger-than-default init so routers and experts see non-trivial activations.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    return model.eval()


CHARS = [chr(i) for i in range(32, 127)] + ["\n"]  # char_tokenizer's vocabulary, after 4 special tokens


def char_tokenizer():
    """One token per character (+ <pad>, <s>, </s>, <unk>); no network, no cache, built in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
