"""Tiny in-memory building blocks shared by the tests and benchmarks: tokenizer and configs (no downloads)."""

from tokenizers import pre_tokenizers
from transformers import Qwen2Tokenizer

from tools.local import remote_module

# The official tokenizer adds these to Qwen2.5's; ids differ here but names are the same.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|stream_start|>", "<|stream_end|>"]


def byte_tokenizer():
    """Qwen2 tokenizer of the 256 bare bytes, no merges: Qwen2's pre-tokenizer and class, before any specials."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_tokenizer():
    """Byte-level Qwen2 tokenizer with 256 byte tokens, no merges, and the VideoLLaMA3 specials."""
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tok


def tiny_config(tokenizer=None, *, tie_word_embeddings=True, vision_layers=2, text_layers=2, **overrides):
    """A VideoLLaMA3 config a few hundred kilobytes big, patch 14 like the real one."""
    tokenizer = tokenizer or tiny_tokenizer()
    config_module = remote_module("configuration_videollama3")
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1000000.0,
        tie_word_embeddings=tie_word_embeddings,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        vision_encoder_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2, patch_size=14
        ),
    )
    fields.update(overrides)
    return config_module.Videollama3Qwen2Config(**fields)
