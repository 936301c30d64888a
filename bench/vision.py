"""Benchmark 2: vision encoder forward at SigLIP width, ours vs native with identical weights.

16 frames of 196x336 px (a 14x24 patch grid per frame, merge 2), fp32, sdpa, no grad. The layer
count is reduced from 27 to fit CPU time; every layer is the same, so time per layer is the same.
Achieved GFLOP/s (matmuls and attention counted, 2 FLOPs per multiply-add) is compared with
the rate of plain `torch.mm` on the encoder's own matmul shapes, measured in the same run.

Then a training step of the encoder (forward and backward, as stages 1-3 train it) on a batch of
images that each have their own size (`TRAIN_GRIDS`, merge 1): every image is its own attention
chunk, the case where per-chunk slicing would make the backward O(chunks x N).
"""

from dataclasses import dataclass
from dataclasses import replace as dataclass_replace

import torch

from bench.common import Row, Stat, alternate

PATCH_DIM = 3 * 14 * 14


@dataclass(frozen=True)
class VisionSpec:
    hidden: int = 1152
    heads: int = 16
    mlp: int = 4304
    layers: int = 2
    frames: int = 16
    grid_h: int = 14
    grid_w: int = 24
    merge: int = 2

    @property
    def patches(self) -> int:
        return self.frames * self.grid_h * self.grid_w

    def flops(self) -> float:
        """Forward FLOPs: patch embedding, per-layer projections, MLP and per-frame attention."""
        N, D, I, L = self.patches, self.hidden, self.mlp, self.grid_h * self.grid_w
        embed = 2 * N * PATCH_DIM * D
        linear = 2 * N * (4 * D * D + 2 * D * I)  # q, k, v, out; fc1, fc2
        attention = 2 * 2 * self.frames * L * L * D  # scores and weighted sum, every frame alone
        return embed + self.layers * (linear + attention)


FULL = VisionSpec()
TOY = VisionSpec(hidden=64, heads=4, mlp=128, layers=1, frames=2, grid_h=4, grid_w=6)
# 24 images of distinct patch grids (8-22 rows by 10-24 columns), 6,288 patches in all.
TRAIN_GRIDS = [(1, 8 + 2 * (i % 8), 10 + 2 * (i // 3)) for i in range(24)]
TOY_TRAIN_GRIDS = [(1, 2, 2), (1, 2, 4), (1, 4, 2)]


def build_pair(spec: VisionSpec, attn_implementation: str = "sdpa", dtype=torch.float32, device="cpu"):
    """Our `Videollama3VisionEncoderModel` and the native `VideoLlama3VisionModel`, same weights."""
    from transformers import VideoLlama3VisionConfig, VideoLlama3VisionModel

    from tools.local import remote_module

    M = remote_module("modeling_videollama3")
    C = remote_module("configuration_videollama3")
    shape = dict(
        hidden_size=spec.hidden,
        intermediate_size=spec.mlp,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        patch_size=14,
    )
    torch.manual_seed(0)
    ours = M.Videollama3VisionEncoderModel._from_config(C.Videollama3VisionEncoderConfig(**shape), attn_implementation=attn_implementation)
    native = VideoLlama3VisionModel._from_config(VideoLlama3VisionConfig(**shape), attn_implementation=attn_implementation)
    native.load_state_dict(ours.state_dict(), strict=True)  # the vision keys are the same in both
    return ours.to(device, dtype).eval(), native.to(device, dtype).eval()


def inputs(spec: VisionSpec, frames: int | None = None, dtype=torch.float32, device="cpu"):
    frames = frames or spec.frames
    torch.manual_seed(1)
    pixel_values = torch.randn(frames * spec.grid_h * spec.grid_w, PATCH_DIM, dtype=dtype, device=device)
    grid = torch.tensor([[frames, spec.grid_h, spec.grid_w]], device=device)
    merge = torch.tensor([spec.merge], device=device)
    return pixel_values, grid, merge


def forward_fns(ours, native, pixel_values, grid, merge):
    def run_ours():
        with torch.no_grad():
            return ours(pixel_values, grid, merge)

    def run_native():
        with torch.no_grad():
            return native(pixel_values, grid_thw=grid, merge_sizes=merge).last_hidden_state

    return run_ours, run_native


def matmul_layer(spec: VisionSpec):
    """`torch.mm` on one layer's matmul shapes (q, k, v, out, fc1, fc2) and their FLOPs."""
    N, D, I = spec.patches, spec.hidden, spec.mlp
    shapes = [(N, D, D)] * 4 + [(N, D, I), (N, I, D)]
    operands = {(m, k, n): (torch.randn(m, k), torch.randn(k, n)) for m, k, n in set(shapes)}

    def layer_of_matmuls():
        for shape in shapes:
            torch.mm(*operands[shape])

    return layer_of_matmuls, sum(2 * m * k * n for m, k, n in shapes)


def run(spec: VisionSpec = FULL, repeats: int = 3) -> list[Row]:
    ours, native = build_pair(spec)
    fn_ours, fn_native = forward_fns(ours, native, *inputs(spec))
    diff = (fn_ours() - fn_native()).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"ours and native vision outputs differ by {diff:.2e}; the comparison would be meaningless")
    mm, mm_flops = matmul_layer(spec)
    # The matmul rate is timed in the same rounds as the forwards, so load changes hit all three.
    stats = alternate({"ours": fn_ours, "native": fn_native, "mm": mm}, repeats)
    rate = Stat([mm_flops / t / 1e9 for t in stats["mm"].values])
    gflops = Stat([spec.flops() / t / 1e9 for t in stats["ours"].values])
    native_gflops = spec.flops() / stats["native"].min / 1e9
    case = f"{spec.frames}x{spec.grid_h}x{spec.grid_w} patches, D={spec.hidden}, {spec.layers} layers, fp32"
    return [
        Row("2 vision forward", case, "s", stats["ours"], stats["native"], "native VideoLlama3VisionModel", "<= 0.9",
            note=f"max|diff| {diff:.1e}; {spec.flops() / 1e9:.0f} GFLOP per forward"),
        Row("2 vision forward", case, "GFLOP/s", gflops, rate, "torch.mm rate, same shapes", ">= 0.6", higher_is_better=True,
            note=f"native reaches {native_gflops:.0f} GFLOP/s"),
    ]


def training_step_fns(ours, native, grids: list[tuple[int, int, int]]):
    """Forward and backward of each encoder on images of `grids` (merge 1); each function returns
    the encoder's output and the gradient of the pixels, for comparing the two."""
    torch.manual_seed(2)
    pixel_values = torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM)
    grid = torch.tensor(grids)
    merge = torch.ones(len(grids), dtype=torch.long)

    # A fixed random read-out as the loss: the encoder ends in a LayerNorm, so a plain sum of
    # squares would be nearly constant and its gradients mostly float noise.
    readout = torch.randn(pixel_values.shape[0], ours.config.hidden_size)

    def step(encode, model):
        model.train()
        model.zero_grad(set_to_none=True)
        x = pixel_values.clone().requires_grad_(True)
        out = encode(x)
        (out * readout).sum().backward()
        return out.detach(), x.grad

    def run_ours():
        return step(lambda x: ours(x, grid, merge), ours)

    def run_native():
        return step(lambda x: native(x, grid_thw=grid, merge_sizes=merge).last_hidden_state, native)

    return run_ours, run_native


def run_training(spec: VisionSpec = FULL, grids=None, repeats: int = 3) -> list[Row]:
    grids = TRAIN_GRIDS if grids is None else grids
    ours, native = build_pair(dataclass_replace(spec, layers=1))
    fn_ours, fn_native = training_step_fns(ours, native, grids)
    (out_ours, grad_ours), (out_native, grad_native) = fn_ours(), fn_native()
    diff = max((out_ours - out_native).abs().max().item(), (grad_ours - grad_native).abs().max().item() / grad_native.abs().max().item())
    if diff > 1e-3:
        raise RuntimeError(f"ours and native vision training steps differ by {diff:.2e}; the comparison would be meaningless")
    stats = alternate({"ours": fn_ours, "native": fn_native}, repeats)
    patches = sum(t * h * w for t, h, w in grids)
    case = f"{len(grids)} images of own sizes, {patches} patches, D={spec.hidden}, 1 layer, fp32, fwd+bwd"
    return [Row("2 vision training step", case, "s", stats["ours"], stats["native"], "native VideoLlama3VisionModel",
                "<= 0.9", note=f"max|diff| {diff:.1e} (outputs; pixel gradients relative to their largest)")]
