"""A VideoLLaMA3 processor with small token budgets, so tests run in milliseconds."""

from tools.tiny import tiny_tokenizer
from tools.local import remote_module


def tiny_processor(*, min_tokens: int = 4, max_tokens: int = 256, tokenizer=None, **processor_kwargs):
    """Processor with the tiny byte-level tokenizer and a `max_tokens`-merged-token budget per sample."""
    images = remote_module("image_processing_videollama3")
    processing = remote_module("processing_videollama3")
    image_processor = images.Videollama3ImageProcessor(min_tokens=min_tokens, max_tokens=max_tokens)
    return processing.Videollama3Qwen2Processor(
        image_processor=image_processor, tokenizer=tokenizer or tiny_tokenizer(), **processor_kwargs
    )


def frame_token_counts(grid_sizes, merge_sizes, compression_mask) -> list[list[int]]:
    """Kept merged tokens of every frame of every item: the placeholders each `<image>` becomes."""
    counts, offset = [], 0
    for (t, gh, gw), m in zip(grid_sizes.tolist(), merge_sizes.tolist()):
        size = t * (gh // m) * (gw // m)
        counts.append(compression_mask[offset : offset + size].view(t, -1).sum(dim=1).tolist())
        offset += size
    return counts
