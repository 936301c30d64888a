"""VideoLLaMA3 video processor: PyAV sampling at `fps`, frame resize and patchify, and the Differential Frame
Pruner (DiffFP, paper section 3.3), with PyAV, Pillow, NumPy and torch only. A file is demuxed once without
decoding to learn every frame's time; only the chosen frames are decoded, scaled straight to the model's size.
"""

import bisect
import io
import os
from dataclasses import dataclass
from typing import Callable, TypedDict

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.video_processing_utils import VideoProcessorMixin

from .image_processing_videollama3 import (BICUBIC, URL_TIMEOUT, PixelProcessing, Videollama3ImageProcessorKwargs,
                                          describe, load_image, local_path, num_merged_tokens, resize_frames)

# Below this many pixels a picture decodes faster on one thread (starting the decoder's threads
# costs more than they save); larger pictures take PyAV's frame + slice threads. Same pixels either way.
SINGLE_THREAD_PIXELS = 320 * 240


@dataclass
class SampledVideo:
    """The frames chosen from one video: their true times (s), `shape` `(T, Hp, Wp)` as displayed, and
    `frames_at(height, width)`, their pixels at any size on demand as `(T, height, width, 3)` uint8 RGB."""

    timestamps: list
    shape: tuple
    frames_at: Callable[[int, int], np.ndarray]

    @property
    def frames(self) -> np.ndarray:
        return self.frames_at(*self.shape[1:])  # (T, Hp, Wp, 3)


def check_sampling(fps, max_frames, start_time=None, end_time=None, name="video"):
    """A ValueError naming the video and the setting when a sampling setting is out of range."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"video {name}: fps must be a number > 0, got {fps!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames <= 0:
        raise ValueError(f"video {name}: max_frames must be an integer > 0, got {max_frames!r}")
    if start_time is not None and start_time < 0:
        raise ValueError(f"video {name}: start_time must be >= 0, got {start_time!r}")
    if end_time is not None and end_time <= 0:
        raise ValueError(f"video {name}: end_time must be > 0, got {end_time!r}")
    if start_time is not None and end_time is not None and start_time >= end_time:
        raise ValueError(f"video {name}: start_time ({start_time}) must be smaller than end_time ({end_time})")


def linspace_picks(count: int, max_frames: int) -> list[int]:
    """All of `count` frames, or `max_frames` spread evenly over them, first and last kept."""
    return list(range(count)) if count <= max_frames else np.linspace(0, count - 1, max_frames).astype(np.int64).tolist()


def sample_grid(times: list, fps: float, start: float, end: float | None) -> list[int]:
    """Indices into sorted `times` of the frames on screen (the last presented at or before t, as a player shows)
    at t = start, start + 1/fps, ...; the first target takes the first frame at or after `start`."""
    tolerance = 1e-6  # float slack only
    last = times[-1] if end is None else min(times[-1], end)
    first = bisect.bisect_left(times, start - tolerance)
    picks, k = [], 0
    while start + k / fps <= last + tolerance:
        index = max(first, bisect.bisect_right(times, start + k / fps + tolerance) - 1)
        if not picks or picks[-1] != index:
            picks.append(index)
        k += 1
    return picks


def _open(source, name):
    """A PyAV container; `source` is a path/URL string, bytes or a seekable file object."""
    source = io.BytesIO(source) if isinstance(source, bytes) else source
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        return av.open(source, mode="r", timeout=URL_TIMEOUT)
    except av.error.FFmpegError as error:
        raise ValueError(f"video {name} could not be opened (corrupt, truncated or not a video): {error}") from None


def _nonreference_test(stream):
    """For H.264 in MP4/MKV (length-prefixed NAL units), a test of whether a packet holds only non-reference slices
    (nal_ref_idc 0), so skipping it changes no other picture; None for other codecs (decoded in full)."""
    context, extradata = stream.codec_context, stream.codec_context.extradata
    if context.name != "h264" or not extradata or extradata[0] != 1 or len(extradata) < 5:
        return None
    length_size = (extradata[4] & 3) + 1  # avcC lengthSizeMinusOne

    def only_nonreference(packet) -> bool:
        data, position, slices = bytes(packet), 0, 0
        while position + length_size <= len(data):
            size = int.from_bytes(data[position : position + length_size], "big")
            position += length_size
            if size <= 0 or position + size > len(data):
                return False  # malformed: decode it and let the decoder judge
            if data[position] & 0x1F in (1, 5):  # coded slice (non-IDR, IDR)
                if data[position] & 0x60:  # nal_ref_idc != 0: other pictures predict from it
                    return False
                slices += 1
            position += size
        return slices > 0

    return only_nonreference


def _video_stream(container, name):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        if not kinds:
            raise ValueError(f"video {name} contains no streams: an empty, zero-frame file")
        raise ValueError(f"video {name} has no video stream, only {kinds} (audio-only or not a video file)")
    stream = container.streams.video[0]
    if stream.codec_context.width * stream.codec_context.height < SINGLE_THREAD_PIXELS:
        stream.thread_type, stream.thread_count = "NONE", 1
    else:
        stream.thread_type = "AUTO"
    return stream


def _decode(source, name, pts: list, seek: bool, rotation: int, height: int, width: int) -> np.ndarray:
    """The frames presented at `pts` as displayed, scaled by swscale to `(height, width)` (area when
    shrinking, bicubic when enlarging), `(T, Hp', Wp', 3)`."""
    wanted, out, filled, next_pick = set(pts), None, 0, 0
    reformatter = VideoReformatter()  # one swscale context for the clip, not one per frame
    with _open(source, name) as container:
        stream = _video_stream(container, name)
        disposable = _nonreference_test(stream)
        if seek:
            container.seek(int(pts[0]), stream=stream, backward=True)
        try:
            for packet in container.demux(stream):
                # A picture no other picture predicts from is decoded only when picked.
                if disposable and packet.size and packet.pts not in wanted and disposable(packet):
                    continue
                for frame in packet.decode():
                    if frame.pts is None or frame.pts < pts[next_pick]:
                        continue  # decoded only as a reference for later frames
                    if out is None:
                        out = np.empty((len(pts), height, width, 3), dtype=np.uint8)  # (T, Hp', Wp', 3)
                        # swscale scales the stored picture; a quarter turn swaps its sides.
                        scaled_h, scaled_w = (width, height) if rotation % 2 else (height, width)
                        shrink = scaled_h <= frame.height and scaled_w <= frame.width
                    rgb = reformatter.reformat(frame, format="rgb24", width=scaled_w, height=scaled_h,
                                               interpolation="AREA" if shrink else "BICUBIC").to_ndarray()  # (h, w, 3)
                    out[filled] = np.rot90(rgb, rotation) if rotation else rgb  # counter-clockwise, as the display matrix
                    filled += 1
                    while next_pick < len(pts) and pts[next_pick] <= frame.pts:
                        next_pick += 1
                    if next_pick == len(pts):
                        return out
        except av.error.FFmpegError as error:
            raise ValueError(f"video {name} is corrupt or truncated ({filled} frames decoded, then: {error})") from None
    raise ValueError(f"video {name}: {len(pts)} frames were listed by the container but only {filled} could be "
                     "decoded (corrupt or truncated file)")


def probe_video(source, fps=1.0, max_frames=180, start_time=None, end_time=None) -> SampledVideo:
    """Demux a video file, decoding only its first frame for size and rotation, and choose the frames shown at
    `fps` (at most `max_frames`, spread by linspace, each keeping its true time)."""
    name = describe(source)
    if isinstance(source, (str, os.PathLike)) and ("://" not in str(source) or str(source).startswith("file://")):
        source = local_path(source, "video")  # URLs go to FFmpeg as they are
    source = bytes(source) if isinstance(source, (bytearray, memoryview)) else source
    with _open(source, name) as container:
        stream = _video_stream(container, name)
        time_base, pts, first = float(stream.time_base), [], None
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.size > 0:
                    pts.append(packet.pts)
                if first is None:  # a threaded decoder may hold its first frame back a few packets
                    first = next(iter(packet.decode()), None)
        except av.error.FFmpegError as error:
            raise ValueError(f"video {name} is corrupt or truncated (demuxing or decoding failed: {error})") from None
        origin = stream.start_time if stream.start_time is not None else (min(pts) if pts else 0)
    pts = sorted(p for p in pts if p >= origin)  # frames before the stream start are not shown
    if not pts:
        raise ValueError(f"video {name} contains no video frames (zero-frame file)")
    times = [(p - origin) * time_base for p in pts]
    start = float(start_time or 0.0)
    if start > times[-1]:
        raise ValueError(f"video {name}: start_time {start} s is past the last frame at {times[-1]:.3f} s")
    candidates = sample_grid(times, fps, start, end_time)
    chosen, seek = [pts[candidates[i]] for i in linspace_picks(len(candidates), max_frames)], start > 0
    if first is None:
        raise ValueError(f"video {name} has no decodable video frames")
    rotation = round((first.rotation or 0) / 90) % 4
    height, width = (first.width, first.height) if rotation % 2 else (first.height, first.width)
    return SampledVideo([round((p - origin) * time_base, 6) for p in chosen], (len(chosen), height, width),
                        lambda h, w: _decode(source, name, chosen, seek, rotation, h, w))


def load_video(source, fps=1.0, max_frames=180, start_time=None, end_time=None, timestamps=None,
               resample=BICUBIC) -> SampledVideo:
    """A video sampled at `fps` with PyAV (a path or URL, bytes, a file object), or frames already in memory (a
    `(T, Hp, Wp, C)` or `(T, C, Hp, Wp)` array or tensor, a list of frames) taken as sampled at `fps` unless `timestamps`
    gives their seconds, resized with Pillow's `resample`. Frames are those shown at start, start + 1/fps, ...; over
    `max_frames`, linspace picks that many. A clip shorter than one sampling interval still gives one frame."""
    name = describe(source)
    check_sampling(fps, max_frames, start_time, end_time, name)
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(source, "read"):
        return probe_video(source, fps, max_frames, start_time, end_time)
    if not isinstance(source, (np.ndarray, torch.Tensor, list, tuple)):
        raise TypeError(f"unsupported video input of type {type(source).__name__}; expected a path, URL, bytes, "
                        "file object, (T, Hp, Wp, 3) array or list of frames")
    frames = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"video {name} array must have shape (T, Hp, Wp, 3), got {tuple(frames.shape)}")
        if frames.shape[-1] not in (1, 3, 4) and frames.shape[1] in (1, 3, 4):
            frames = np.moveaxis(frames, 1, -1)  # (T, C, Hp, Wp) -> (T, Hp, Wp, C)
    if len(frames) == 0:
        raise ValueError(f"video {name} contains no frames")
    timestamps = [i / fps for i in range(len(frames))] if timestamps is None else [float(t) for t in timestamps]
    if len(timestamps) != len(frames):
        raise ValueError(f"video {name} has {len(frames)} frames but {len(timestamps)} timestamps")
    keep = [i for i, t in enumerate(timestamps)
            if (start_time is None or t >= start_time) and (end_time is None or t <= end_time)]
    if not keep:
        raise ValueError(f"video {name} has no frame between start_time={start_time} and end_time={end_time}")
    keep = [keep[i] for i in linspace_picks(len(keep), max_frames)]
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.shape[-1] == 3:
        rgb = np.ascontiguousarray(frames[keep])  # (T, Hp, Wp, 3)
    else:
        try:
            rgb = [load_image(frames[i]) for i in keep]  # (Hp, Wp, 3) each
        except (ValueError, TypeError) as error:
            raise type(error)(f"video {name}: {error}") from None
        if len({f.shape for f in rgb}) > 1:
            raise ValueError(f"video {name} frames differ in size: {sorted({f.shape for f in rgb})}")
        rgb = np.stack(rgb)  # (T, Hp, Wp, 3)
    return SampledVideo([timestamps[i] for i in keep], rgb.shape[:3], lambda h, w: resize_frames(rgb, h, w, resample))


def _is_frame(value) -> bool:
    return isinstance(value, Image.Image) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim in (2, 3))


def as_video_list(videos) -> list:
    """`videos` as a list of videos; one video may be a path, an array or a list of frames."""
    if not isinstance(videos, (list, tuple)):
        return [] if videos is None else [videos]
    one = videos and all(_is_frame(v) for v in videos)  # one video given as its frames
    return [list(videos)] if one else list(videos)


def differential_frame_pruning(patches: torch.Tensor, grid, merge_size: int, threshold: float, min_tokens) -> torch.Tensor:
    """DiffFP keep-mask `(T*H/m*W/m,)` of one video's normalised patches `(T*H*W, C*p*p)` in merge-block order: frame
    0 whole; a later merged token where its mean absolute change from the previous frame (0..255 units) exceeds
    `threshold`; a frame keeping fewer than `min_tokens` keeps its first ones (in order)."""
    t, gh, gw = (int(v) for v in grid)
    per_frame = num_merged_tokens(1, gh, gw, merge_size)
    if t == 1:
        return torch.ones(t * per_frame, dtype=torch.bool)
    tokens = patches.view(t, per_frame, -1)  # (T, H/m*W/m, m*m*C*p*p): a merged token's patches are contiguous
    change = torch.sub(tokens[1:], tokens[:-1]).abs_().mean(dim=-1) * 255  # (T-1, H/m*W/m)
    keep = torch.ones(t, per_frame, dtype=torch.bool)  # (T, H/m*W/m)
    keep[1:] = change > threshold
    keep[keep.sum(dim=1) < min_tokens, :min_tokens] = True
    return keep.flatten()  # (T*H/m*W/m,)


Videollama3VideoProcessorKwargs = TypedDict("Videollama3VideoProcessorKwargs", {  # pixel settings, sampling, DiffFP
    **Videollama3ImageProcessorKwargs.__annotations__, "fps": float, "max_frames": int, "use_token_compression": bool,
    "compression_threshold": float, "compression_min_tokens": int}, total=False)


class Videollama3VideoProcessor(PixelProcessing, VideoProcessorMixin):
    r"""Video processor of VideoLLaMA3: samples at `fps` (at most `max_frames`), resizes a video's frames alike within
    the token budget, patchifies and prunes with DiffFP; outputs as the image processor's (`grid_sizes` `[T, H, W]`).
    Not an `AutoVideoProcessor` (which requires torchvision): the processor builds and saves this one itself."""

    valid_kwargs = Videollama3VideoProcessorKwargs
    model_input_names = ["pixel_values", "grid_sizes", "merge_sizes", "compression_mask"]

    def __init__(self, fps=1, max_frames=180, use_token_compression=True, compression_threshold=0.1,
                 compression_min_tokens=1, **kwargs):
        super().__init__(**kwargs)
        check_sampling(fps, max_frames)
        self.fps, self.max_frames, self.use_token_compression = fps, max_frames, use_token_compression
        self.compression_threshold, self.compression_min_tokens = compression_threshold, compression_min_tokens

    def fetch_videos(self, video, fps=None, max_frames=None, start_time=None, end_time=None, timestamps=None):
        """One video (any form `load_video` takes) sampled at this processor's `fps` / `max_frames` unless given."""
        return load_video(video, *self.settings(fps=fps, max_frames=max_frames), start_time, end_time, timestamps,
                          self.resample)

    def preprocess(self, videos, merge_size=2, sizes=None, min_tokens=None, max_tokens=None, use_token_compression=None,
                   compression_threshold=None, compression_min_tokens=None, return_tensors="pt") -> BatchFeature:
        """Videos (a `SampledVideo`, anything `fetch_videos` takes, or a list of them) -> model inputs;
        `merge_size` an int or one per video, `sizes` `(Hp', Wp')` per video when the caller shares the budget."""
        items = [v if hasattr(v, "frames_at") else self.fetch_videos(v) for v in as_video_list(videos)]  # duck-typed
        prune, threshold, least = self.settings(use_token_compression=use_token_compression,
                                                compression_threshold=compression_threshold,
                                                compression_min_tokens=compression_min_tokens)
        keep = ((lambda patches, grid, m: differential_frame_pruning(patches, grid, m, threshold, least)) if prune
                else lambda patches, grid, m: torch.ones(num_merged_tokens(*grid, m), dtype=torch.bool))
        return self.encode(items, [video.shape for video in items], lambda video, h, w: video.frames_at(h, w), keep,
                           merge_size, sizes, min_tokens, max_tokens, return_tensors)


__all__ = ["Videollama3VideoProcessor", "SampledVideo", "load_video", "differential_frame_pruning"]
