"""Benchmark 6, GPU only: bf16 vision encoder with flash-attn varlen vs sdpa, and a 2B training step's MFU.

    python -m bench.gpu            # needs CUDA; prints "skipped" and exits 0 without it
    python -m bench.gpu --dry-run  # toy sizes on CPU, fp32: checks that the code runs

1. Vision encoder at full size (27 layers, width 1152), bf16, no grad, 180 frames of 14x24
   patches (one long video at the official frame cap): ours with `flash_attention_2` (one varlen
   call over all frames) vs ours with `sdpa` (frames batched into bounded chunks) vs the native
   port with `sdpa` (one call per frame). flash-attn rows appear only where `flash_attn` is installed.
2. One training step (forward, backward, fused AdamW) of the 2B shape: Qwen2.5-1.5B text model
   (28 layers, width 1536, 12 heads, 2 KV heads, MLP 8960, vocab 151936) plus the full vision
   encoder, random bf16 weights, one packed row of 4 samples (an 8-frame video each, then text).
   MFU = model FLOPs per step / step time / the GPU's dense bf16 peak. Model FLOPs: 6 x parameters
   x tokens for every matmul (the vision tower on patches, the projector on merged tokens, the LLM
   and LM head on the packed tokens), plus attention: 12 x layers x width x L^2 per frame for the
   bidirectional vision attention and 6 x layers x width x S^2 per sample for causal text attention.

One prepared script: about 1-2 minutes on one H200 (most of it building the 2B model).
"""

import argparse
import json
import sys
import time

import torch

from bench.common import OUT_DIR, Row, Stat, print_rows
from bench.vision import VisionSpec, build_pair, inputs

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_peak(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def flash_available(device) -> bool:
    """flash-attn kernels run on CUDA only; an installed flash_attn must not be picked for the CPU dry run."""
    from transformers.utils import is_flash_attn_2_available

    return device.type == "cuda" and is_flash_attn_2_available()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device, repeats: int, warmup: int = 1) -> Stat:
    for _ in range(warmup):
        fn()
    sync(device)
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        values.append(time.perf_counter() - start)
    return Stat(values)


# ---- 1. vision encoder ------------------------------------------------------------------------


def vision_rows(spec: VisionSpec, device, dtype, repeats: int) -> tuple[list[Row], dict]:
    pixel_values, grid, merge = inputs(spec, dtype=dtype, device=device)
    stats, peaks = {}, {}
    implementations = ["sdpa"] + (["flash_attention_2"] if flash_available(device) else [])
    for impl in implementations:
        ours, native = build_pair(spec, attn_implementation=impl, dtype=dtype, device=device)
        runs = {f"ours {impl}": lambda: ours(pixel_values, grid, merge)}
        if impl == "sdpa":
            runs["native sdpa"] = lambda: native(pixel_values, grid_thw=grid, merge_sizes=merge).last_hidden_state
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                stats[name] = time_calls(fn, device, repeats)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
        del ours, native
        if device.type == "cuda":
            torch.cuda.empty_cache()
    case = f"{spec.frames}x{spec.grid_h}x{spec.grid_w} patches, {spec.layers} layers, D={spec.hidden}, {str(dtype)[6:]}"
    rows = [Row("6 GPU vision forward", case, "s", stats["ours sdpa"], stats["native sdpa"], "native sdpa", None)]
    if "ours flash_attention_2" in stats:
        rows.append(Row("6 GPU vision forward", case, "s", stats["ours flash_attention_2"], stats["ours sdpa"],
                        "ours sdpa (flash-attn varlen is 'ours')", None))
        rows.append(Row("6 GPU vision forward", case, "s", stats["ours flash_attention_2"], stats["native sdpa"],
                        "native sdpa (flash-attn varlen is 'ours')", None))
    tflops = {name: spec.flops() / s.min / 1e12 for name, s in stats.items()}
    return rows, {"vision_seconds": {k: s.values for k, s in stats.items()}, "vision_tflops": tflops,
                  "vision_peak_gib": peaks, "flash_attn_installed": "ours flash_attention_2" in stats}


# ---- 2. training step MFU ------------------------------------------------------------------


TEXT_2B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
VISION_FULL = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
TEXT_TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
VISION_TOY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14)


def build_training(text: dict, vision: dict, samples: int, frames: int, grid: tuple[int, int], text_tokens: int,
                   attn_implementation: str, dtype, device):
    from tools.local import remote_module

    C = remote_module("configuration_videollama3")
    M = remote_module("modeling_videollama3")
    config = C.Videollama3Qwen2Config(
        **text, max_position_embeddings=32768, rope_theta=1000000.0, image_token_index=text["vocab_size"] - 1,
        vision_encoder_config=vision, use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = M.Videollama3Qwen2ForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.train()

    gh, gw = grid
    merged = frames * (gh // 2) * (gw // 2)
    ids, positions, lengths = [], [], []
    for _ in range(samples):
        sample = [1] * 4 + [config.image_token_index] * merged + torch.randint(2, min(1000, text["vocab_size"] - 1), (text_tokens,)).tolist()
        ids += sample
        positions += list(range(len(sample)))
        lengths.append(len(sample))
    input_ids = torch.tensor([ids], device=device)
    labels = input_ids.masked_fill(input_ids == config.image_token_index, -100)
    batch = {
        "input_ids": input_ids,  # (1, S): one packed row
        "labels": labels,
        "position_ids": torch.tensor([positions], device=device),
        "pixel_values": torch.randn(samples * frames * gh * gw, 3 * 14 * 14, device=device, dtype=dtype),
        "grid_sizes": torch.tensor([[frames, gh, gw]] * samples, device=device),
        "merge_sizes": torch.tensor([2] * samples, device=device),
        "use_cache": False,
    }
    flops = training_flops(model, config, samples * frames * gh * gw, samples * merged, sum(lengths), lengths,
                           frames * samples, gh * gw)
    return model, batch, flops, sum(lengths)


def training_flops(model, config, patches, merged, tokens, lengths, frames, patches_per_frame) -> float:
    vision = model.model.vision_encoder
    projector = model.model.mm_projector
    v_params = sum(p.numel() for p in vision.parameters())
    p_params = sum(p.numel() for p in projector.parameters())
    embed = model.model.embed_tokens.weight.numel()
    text_params = sum(p.numel() for p in model.parameters()) - v_params - p_params - embed  # layers + norm
    lm_head = config.vocab_size * config.hidden_size  # tied: the LM head matmul still happens
    v = config.vision_encoder_config
    matmuls = 6 * (v_params * patches + p_params * merged + (text_params + lm_head) * tokens)
    attention = 12 * v.num_hidden_layers * v.hidden_size * patches_per_frame**2 * frames
    attention += 6 * config.num_hidden_layers * config.hidden_size * sum(s * s for s in lengths)
    return float(matmuls + attention)


def training_row(args, device, dtype) -> tuple[list[Row], dict]:
    impl = "flash_attention_2" if flash_available(device) else "sdpa"
    if args.dry_run:
        shape = dict(text=TEXT_TOY, vision=VISION_TOY, samples=2, frames=2, grid=(4, 6), text_tokens=16)
    else:
        shape = dict(text=TEXT_2B, vision=VISION_FULL, samples=4, frames=8, grid=(14, 24), text_tokens=600)
    began = time.perf_counter()
    model, batch, flops, tokens = build_training(**shape, attn_implementation=impl, dtype=dtype, device=device)
    build_s = time.perf_counter() - began
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_calls(step, device, repeats=args.steps, warmup=1 if args.dry_run else 2)
    achieved = Stat([flops / t / 1e12 for t in seconds.values])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or device_peak(name) or (achieved.max if args.dry_run else None)
    params = sum(p.numel() for p in model.parameters())
    info = {"train_step_seconds": seconds.values, "train_tflops": achieved.values, "train_tokens": tokens,
            "train_model_tflop_per_step": flops / 1e12, "params_b": params / 1e9, "attn_implementation": impl,
            "device": name, "peak_tflops": peak, "build_seconds": build_s}
    if device.type == "cuda":
        info["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    rows = []
    if peak:
        case = f"{params / 1e9:.2f}B params, 1 packed row of {tokens} tokens, {impl}, bf16 AdamW"
        rows.append(Row("6 GPU training MFU", case, "TFLOP/s", achieved, Stat([peak]), f"{name} dense bf16 peak",
                        None, higher_is_better=True))
        info["mfu"] = achieved.max / peak
    return rows, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU in fp32")
    parser.add_argument("--frames", type=int, default=180)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak if the GPU is not known")
    parser.add_argument("--skip", nargs="*", default=[], choices=["vision", "train"])
    args = parser.parse_args(argv)

    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        spec = VisionSpec(hidden=64, heads=4, mlp=128, layers=2, frames=4, grid_h=4, grid_w=6)
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        spec = VisionSpec(layers=27, frames=args.frames)
    else:
        print("gpu benchmarks: skipped (no CUDA device)")
        return 0

    rows, info = [], {}
    if "vision" not in args.skip:
        new, extra = vision_rows(spec, device, dtype, args.repeats)
        rows += new
        info.update(extra)
        print_rows(new)
    if "train" not in args.skip:
        new, extra = training_row(args, device, dtype)
        rows += new
        info.update(extra)
        print_rows(new)
    print("== gpu summary")
    print_rows(rows)
    print(json.dumps(info, indent=1, default=float))
    if not args.dry_run:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        (OUT_DIR / "gpu.json").write_text(json.dumps(info, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
