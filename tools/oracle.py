"""transformers' native `video_llama_3` port as an oracle: same weights, same inputs, its logits.

Tests compare against it and the benchmarks time it. Our checkpoint keys are the official ones; the native port renames them
and uses separate image/video placeholder tokens and input names.
"""

import re
from dataclasses import dataclass, field

import torch
from transformers import Qwen2Config, VideoLlama3Config, VideoLlama3ForConditionalGeneration, VideoLlama3VisionConfig

PATCH_DIM = 3 * 14 * 14

KEY_RENAMES = [
    (r"^model\.vision_encoder\.", "model.vision_model."),
    (r"^model\.mm_projector\.", "model.projector."),
    (r"^model\.(embed_tokens|layers|norm)\b", r"model.language_model.\1"),
]


def native_twin(model, video_token_id: int, attn_implementation: str = "sdpa"):
    """A native `VideoLlama3ForConditionalGeneration` holding exactly `model`'s weights."""
    config = model.config
    vision = config.vision_encoder_config
    text_fields = {
        k: getattr(config, k)
        for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
            "tie_word_embeddings", "eos_token_id", "pad_token_id", "bos_token_id",
        )
    }
    native_config = VideoLlama3Config(
        text_config=Qwen2Config(**text_fields).to_dict(),
        vision_config=VideoLlama3VisionConfig(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.num_hidden_layers,
            num_attention_heads=vision.num_attention_heads,
            patch_size=vision.patch_size,
            layer_norm_eps=vision.layer_norm_eps,
        ).to_dict(),
        image_token_id=config.image_token_index,
        video_token_id=video_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    native = VideoLlama3ForConditionalGeneration._from_config(native_config, attn_implementation=attn_implementation)
    state = {}
    for key, value in model.state_dict().items():
        for pattern, replacement in KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        state[key] = value
    native.load_state_dict(state, strict=True)
    return native.eval()


@dataclass
class Item:
    """One visual item: an image (t=1, m=1) or a video (t frames, m=2), with random patches."""

    t: int
    h: int
    w: int
    m: int
    video: bool
    keep: torch.Tensor | None = None  # (t*h/m*w/m,) bool; None keeps all
    pixels: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.pixels = torch.randn(self.t * self.h * self.w, PATCH_DIM)

    @property
    def merged(self) -> int:
        return self.t * (self.h // self.m) * (self.w // self.m)

    def keep_mask(self) -> torch.Tensor:
        return self.keep if self.keep is not None else torch.ones(self.merged, dtype=torch.bool)


def image(h, w):
    return Item(1, h, w, 1, video=False)


def video(t, h, w, keep_fraction=None):
    item = Item(t, h, w, 2, video=True)
    if keep_fraction is not None:
        keep = torch.rand(item.merged) < keep_fraction
        keep[: (h // 2) * (w // 2)] = True  # frame 0 is kept whole, as DiffFP does
        item.keep = keep
    return item


def prompt_ids(tokenizer, items, text, image_token_id, video_token_id=None):
    """Chat-formatted ids with one placeholder run per kept token; videos may use another token."""
    ids = tokenizer.encode("<|im_start|>user\n")
    for item in items:
        token = video_token_id if (item.video and video_token_id is not None) else image_token_id
        ids += [token] * int(item.keep_mask().sum())
        ids += tokenizer.encode("\n")
    ids += tokenizer.encode(text + "<|im_end|>\n<|im_start|>assistant\n")
    return ids


def our_inputs(tokenizer, samples, image_token_id, padding_side="left"):
    """Model inputs in our contract for a batch of `(items, text)` samples, padded on one side."""
    rows = [prompt_ids(tokenizer, items, text, image_token_id) for items, text in samples]
    input_ids, attention_mask = pad(rows, tokenizer.pad_token_id, padding_side)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    items = [item for sample_items, _ in samples for item in sample_items]
    if items:
        inputs["pixel_values"] = torch.cat([i.pixels for i in items])
        inputs["grid_sizes"] = torch.tensor([[i.t, i.h, i.w] for i in items])
        inputs["merge_sizes"] = torch.tensor([i.m for i in items])
        inputs["compression_mask"] = torch.cat([i.keep_mask() for i in items])
    return inputs


def packed_inputs(tokenizer, samples, image_token_id):
    """`(samples alone, one packed row)`: the samples' ids end to end, position ids restarting at each."""
    alone = [our_inputs(tokenizer, [sample], image_token_id) for sample in samples]
    packed = {
        "input_ids": torch.cat([a["input_ids"] for a in alone], dim=1),
        "position_ids": torch.cat([torch.arange(a["input_ids"].shape[1]) for a in alone])[None],
    }
    for name in ("pixel_values", "grid_sizes", "merge_sizes", "compression_mask"):
        if any(name in a for a in alone):
            packed[name] = torch.cat([a[name] for a in alone if name in a])
    return alone, packed


def native_inputs(tokenizer, items, text, image_token_id, video_token_id):
    """The same single sample in the native port's input names."""
    ids = torch.tensor([prompt_ids(tokenizer, items, text, image_token_id, video_token_id)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    images = [i for i in items if not i.video]
    videos = [i for i in items if i.video]
    if images:
        inputs["pixel_values"] = torch.cat([i.pixels for i in images])
        inputs["image_grid_thw"] = torch.tensor([[i.t, i.h, i.w] for i in images])
        inputs["image_merge_sizes"] = torch.tensor([i.m for i in images])
    if videos:
        inputs["pixel_values_videos"] = torch.cat([i.pixels for i in videos])
        inputs["video_grid_thw"] = torch.tensor([[i.t, i.h, i.w] for i in videos])
        inputs["video_merge_sizes"] = torch.tensor([i.m for i in videos])
        inputs["video_compression_mask"] = torch.cat([i.keep_mask() for i in videos])
    return inputs


def pad(rows, pad_id, side):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[b, span] = torch.tensor(row)
        mask[b, span] = 1
    return ids, mask
