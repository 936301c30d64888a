"""Benchmark 4: greedy generation tokens/s, ours vs the native port with identical weights.

The text model has the Qwen2.5-0.5B layer shape (width 896, 14 heads, 2 KV heads, MLP 4864) with
fewer layers and a 32k vocabulary; the vision encoder is a narrow 2-layer one. The prompt holds an
image and a video whose compression mask drops part of its tokens, so both models run their full
multimodal prefill before decoding. Tokens/s counts new tokens over the whole `generate` call.
"""

from dataclasses import dataclass

import torch

from bench.common import Row, Stat, alternate, spec_model


@dataclass(frozen=True)
class GenSpec:
    hidden: int = 896
    heads: int = 14
    kv_heads: int = 2
    mlp: int = 4864
    layers: int = 4
    vocab: int = 32000
    vision_hidden: int = 256
    vision_layers: int = 2
    new_tokens: int = 24
    frames: int = 8


FULL = GenSpec()
TOY = GenSpec(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2, vocab=512, vision_hidden=32, vision_layers=1,
              new_tokens=4, frames=2)


def build(spec: GenSpec):
    """Our model, its native twin, and one prompt in both input conventions."""
    from tools.oracle import image, native_inputs, native_twin, our_inputs, video

    tok, config, ours = spec_model(spec)
    ours.eval()
    video_token = tok.convert_tokens_to_ids("<|stream_start|>")
    native = native_twin(ours, video_token)
    items = [image(8, 8), video(spec.frames, 8, 8, keep_fraction=0.6)]
    text = "Describe what happens in the video and how it relates to the picture."
    ours_in = our_inputs(tok, [(items, text)], config.image_token_index)
    native_in = native_inputs(tok, items, text, config.image_token_index, video_token)
    return ours, native, ours_in, native_in, tok


def run(spec: GenSpec = FULL, repeats: int = 3) -> list[Row]:
    ours, native, ours_in, native_in, tok = build(spec)
    kwargs = dict(do_sample=False, max_new_tokens=spec.new_tokens, min_new_tokens=spec.new_tokens,
                  pad_token_id=tok.pad_token_id)

    def gen(model, inputs):
        with torch.no_grad():
            return model.generate(**inputs, **kwargs)

    # Prompts differ (the native port marks video frames with their own token); new tokens must not.
    prompt = ours_in["input_ids"].shape[1]
    same = torch.equal(gen(ours, ours_in)[:, prompt:], gen(native, native_in)[:, prompt:])
    stats = alternate({"ours": lambda: gen(ours, ours_in), "native": lambda: gen(native, native_in)}, repeats)
    rate = {name: Stat([spec.new_tokens / t for t in s.values]) for name, s in stats.items()}
    case = f"{spec.layers}x{spec.hidden} Qwen2 + {spec.vision_layers}-layer vision, prompt {prompt}, {spec.new_tokens} new, B=1"
    return [
        Row("4 greedy generation", case, "tok/s", rate["ours"], rate["native"], "native VideoLlama3ForConditionalGeneration",
            ">= 1.0", higher_is_better=True, note=f"identical tokens: {same}"),
    ]
