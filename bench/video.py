"""Benchmark 1: a 60 s 1280x720 30 fps H.264 clip turned into model inputs at 1 fps.

Three ways through the same file:

* ours: `Videollama3VideoProcessor` (`fetch_videos(path, fps=1)`, then merge size 2 and DiffFP),
  i.e. the processor's video path (flat patches, grid, merge size, keep-mask);
* peer: transformers' `load_video(path, backend="pyav", fps=1)`, then the native steps. The native
  video processor imports torchvision, which this environment lacks, so its steps are reproduced
  with the native PIL image processor `VideoLlama3ImageProcessorPil` frame by frame (bicubic
  resize, rescale, normalise, merge-block patchify: the same patch order as the video processor's
  patchify) and a copy of `VideoLlama3VideoProcessor._get_compression_mask`. The peer is given the
  same token budget as ours, so both produce the same grid;
* floor: PyAV demux and decode of every frame, no colour conversion, nothing else. H.264 frames
  depend on each other, so any exact sampler pays at least this much.

The clip is encoded once by the benchmark (libx264 veryfast, CRF 23, B-frames, default GOP) and
cached in `bench/out/`: a panning textured scene with moving sprites, with static stretches.
"""

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw

from bench.common import OUT_DIR, Row, alternate

MAX_TOKENS = 16384  # the official per-sample merged-token budget, shared by all frames
MERGE_SIZE = 2  # videos are merged 2x2
SAMPLE_FPS = 1.0
# (start, end) fractions of the clip that move; the rest is static (DiffFP prunes those frames).
MOVING = [(10 / 60, 25 / 60), (35 / 60, 50 / 60)]


@dataclass(frozen=True)
class ClipSpec:
    seconds: int
    fps: int
    height: int
    width: int

    @property
    def frames(self) -> int:
        return self.seconds * self.fps

    @property
    def name(self) -> str:
        return f"clip_{self.width}x{self.height}_{self.fps}fps_{self.seconds}s.mp4"


FULL = ClipSpec(seconds=60, fps=30, height=720, width=1280)
TOY = ClipSpec(seconds=4, fps=10, height=90, width=160)


def scene(spec: ClipSpec):
    """Frame function of the synthetic scene: `index -> (H, W, 3)` uint8."""
    rng = np.random.default_rng(0)
    H, W = spec.height, spec.width
    pad_h, pad_w = H // 4, W // 2  # the background is larger than the frame: the camera pans over it
    y = np.linspace(0, 1, H + pad_h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, W + pad_w, dtype=np.float32)[None, :]
    background = np.stack([60 + 120 * x + 0 * y, 40 + 100 * y + 0 * x, 160 - 80 * x * y], axis=-1).astype(np.uint8)
    canvas = Image.fromarray(background)
    draw = ImageDraw.Draw(canvas)
    for _ in range(150):
        x0, y0, side = rng.integers(0, W + pad_w), rng.integers(0, H + pad_h), rng.integers(H // 70 + 2, H // 6 + 3)
        draw.rectangle([x0, y0, x0 + side, y0 + side // 2 + 1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    for i in range(40):
        draw.text((int(rng.integers(0, W + pad_w)), int(rng.integers(0, H + pad_h))), f"bench {i}", fill=(255, 255, 255))
    background = np.asarray(canvas)
    sprite = max(4, H // 12)

    def frame(index: int) -> np.ndarray:
        t = index / spec.frames
        # Motion time only advances inside moving stretches, so a static stretch repeats one frame.
        moved = sum(min(max(t - a, 0.0), b - a) for a, b in MOVING) * spec.frames
        offset = int(moved * pad_w / (spec.frames * 0.5)) % pad_w
        out = background[pad_h // 2 : pad_h // 2 + H, offset : offset + W].copy()  # (H, W, 3)
        for k in range(3):
            cx = int((moved * (3 + k) * W / spec.frames * 4 + k * W / 3) % (W - sprite))
            cy = int((0.5 + 0.35 * np.sin(moved / spec.fps + k)) * (H - sprite))
            out[cy : cy + sprite, cx : cx + sprite] = (250, 220 - 60 * k, 30 + 90 * k)
        return out

    return frame


def make_clip(spec: ClipSpec, directory: Path = OUT_DIR) -> Path:
    """Encode the scene to H.264 mp4 once; later calls reuse the file."""
    path = Path(directory) / spec.name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    frame = scene(spec)
    with av.open(str(partial), mode="w") as output:
        stream = output.add_stream("libx264", rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(spec.frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(i), format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    partial.rename(path)
    return path


def decode_floor(path) -> int:
    """Demux and decode every frame with the decoder settings ours uses; no conversion."""
    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _ in container.decode(stream):
            count += 1
    return count


def ours_fn(max_tokens: int = MAX_TOKENS):
    """Our path: the video processor's `fetch_videos` (PyAV sampling) then its resize, patchify and DiffFP."""
    from tools.local import remote_module

    processor = remote_module("video_processing_videollama3").Videollama3VideoProcessor(max_tokens=max_tokens)

    def run(path):
        clip = processor.fetch_videos(str(path), fps=SAMPLE_FPS, max_frames=180)
        out = processor([clip], merge_size=MERGE_SIZE, use_token_compression=True)
        return out["pixel_values"], out["grid_sizes"][0].tolist(), out["compression_mask"]

    return run


def native_compression_mask(pixel_values, grid, merge_size, threshold=0.1, min_tokens=1) -> torch.Tensor:
    """`VideoLlama3VideoProcessor._get_compression_mask` for one video, copied verbatim in substance
    (its module imports torchvision, unavailable here)."""
    t, h, w = grid
    if t == 1:
        return torch.ones(pixel_values.size(0) // merge_size**2, dtype=torch.bool)
    images = pixel_values.view(t, (h // merge_size) * (w // merge_size), -1)
    pixel_diff = images[1:] - images[:-1]
    pixel_diff = torch.abs(pixel_diff).mean(dim=-1) * 255
    pixel_diff = torch.cat([torch.full_like(pixel_diff[0:1], threshold + 1), pixel_diff], dim=0)
    mask = pixel_diff > threshold
    padding_ids = torch.nonzero(mask.sum(dim=1) < min_tokens)[:, 0]
    mask[padding_ids, :min_tokens] = 1
    return mask.flatten()


def peer_fn(max_tokens: int = MAX_TOKENS):
    """transformers' `load_video` (pyav) then the native resize/rescale/normalise/patchify/mask steps."""
    from transformers import VideoLlama3ImageProcessorPil
    from transformers.video_utils import load_video

    patch = 14

    def run(path):
        frames, _ = load_video(str(path), backend="pyav", fps=SAMPLE_FPS)  # (T, H, W, 3) uint8
        t = len(frames)
        # The native video processor divides `longest_edge` by the frame count (its "diff from Qwen").
        processor = VideoLlama3ImageProcessorPil(
            size={"shortest_edge": 16 * (patch * MERGE_SIZE) ** 2, "longest_edge": max_tokens * (patch * MERGE_SIZE) ** 2 // t},
            merge_size=MERGE_SIZE,
        )
        out = processor(list(frames), return_tensors="pt")
        pixel_values = out["pixel_values"]  # (T*gh*gw, 588)
        _, gh, gw = out["image_grid_thw"][0].tolist()
        grid = (t, gh, gw)
        return pixel_values, list(grid), native_compression_mask(pixel_values, grid, MERGE_SIZE)

    return run


def check_same_inputs(ours, peer) -> str:
    """Both paths must describe the same frames: same grid; pixels and masks nearly equal."""
    (pv_o, grid_o, mask_o), (pv_p, grid_p, mask_p) = ours, peer
    if grid_o != grid_p:
        raise RuntimeError(f"ours and peer disagree on the grid: {grid_o} vs {grid_p}")
    pixel_diff = (pv_o.float() - pv_p.float()).abs().mean().item()
    mask_agree = (mask_o == mask_p).float().mean().item()
    return f"grid {grid_o}, kept {int(mask_o.sum())}/{mask_o.numel()} tokens, mean|dpx| {pixel_diff:.1e}, masks agree {mask_agree:.1%}"


def run(spec: ClipSpec = FULL, repeats: int = 3) -> list[Row]:
    path = make_clip(spec)
    ours, peer = ours_fn(), peer_fn()
    note = check_same_inputs(ours(path), peer(path))
    stats = alternate({"ours": lambda: ours(path), "peer": lambda: peer(path), "floor": lambda: decode_floor(path)}, repeats, warmup=0)
    case = f"{spec.seconds}s {spec.width}x{spec.height} {spec.fps}fps -> 1 fps"
    return [
        Row("1 video->inputs", case, "s", stats["ours"], stats["peer"], "transformers load_video + native steps", "<= 0.5", note=note),
        Row("1 video->inputs", case, "s", stats["ours"], stats["floor"], "PyAV decode-all floor", "<= 1.3"),
    ]
