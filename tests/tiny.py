"""The tiny builders live in `tools.tiny` (the benchmarks use them too); tests import them from here as well."""

from tools.tiny import SPECIAL_TOKENS, tiny_config, tiny_tokenizer

__all__ = ["SPECIAL_TOKENS", "tiny_config", "tiny_tokenizer"]
