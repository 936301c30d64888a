"""VideoLLaMA3 image processor: media loading, any-resolution resize, patchify and DiffFP.

Everything the model sees as pixels is made here, with Pillow, NumPy, torch and PyAV only (no
torchvision, torchcodec or ffmpeg binary):

* `load_image` / `load_video` turn paths, bytes, file objects, arrays and PIL images into RGB
  uint8 frames (videos sampled at `fps` with their true timestamps);
* `Videollama3ImageProcessor` resizes every image and frame of one call within one token budget
  (Any-resolution Vision Tokenization), normalises, patchifies in merge-block order and computes
  the Differential Frame Pruner keep-mask (paper section 3.3).

Vocabulary used in the shape comments:
    T frames of an item (1 for an image), H/W pixel height/width, C = 3 channels,
    P = 14 patch size, gh/gw = H/P and W/P (patch grid before merge), m merge size,
    K = (gh/m)*(gw/m) merged tokens per frame, N patches of a call, D = C*P*P.
"""

import bisect
import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import TypedDict

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import ImageProcessingMixin

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value official preprocessor_config.json stores


class MediaNotFoundError(FileNotFoundError, ValueError):
    """A media path that does not exist. Both a `FileNotFoundError` and a `ValueError`."""


def _resize_frames(frames, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """Pillow resize of uint8 frames `(T, H, W, 3)` -> `(T, height, width, 3)`, before any float work."""
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)  # (T, H', W', 3)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), resample=resample))
    return out


@dataclass
class VideoClip:
    """Frames of one video already in memory (given by the caller, or sampled from a file).

    Attributes:
        frames: uint8 array of shape `(T, H, W, 3)`, RGB.
        timestamps: seconds from the start of the stream, one per frame (true times, not rounded).
        source: a short description of where the frames came from, for error messages.
    """

    frames: np.ndarray
    timestamps: list
    source: str = "<frames>"

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(T, H, W)`."""
        return tuple(self.frames.shape[:3])

    def frames_at(self, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
        return _resize_frames(self.frames, height, width, resample)  # (T, height, width, 3)


# --------------------------------------------------------------------------------------------
# Images


def pil_height_width(image: Image.Image) -> tuple[int, int]:
    """The one place that turns PIL's `(width, height)` into `(height, width)`."""
    width, height = image.size
    return height, width


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if hasattr(source, "read"):
        return f"<file object {getattr(source, 'name', type(source).__name__)}>"
    return f"<{type(source).__name__}>"


def _local_path(source, kind: str) -> str:
    path = str(source)
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not os.path.exists(path):
        raise MediaNotFoundError(2, f"{kind} file not found", path)
    if os.path.isdir(path):
        raise ValueError(f"{kind} path {path!r} is a directory, not a file")
    return path


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any PIL mode to 8-bit RGB.

    Transparent pixels are composited on white (what a viewer shows); 16/32-bit and float
    greyscale are scaled to 8 bits instead of being clipped by Pillow's plain conversion.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # 16-bit sources (I;16*, and PNG's 16-bit greyscale opened as "I") span 0..65535.
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        if mode == "La":
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """An image array as (H, W, 3) uint8; accepts HW, HWC or CHW, uint8 or floats in [0, 1]."""
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W, 1)
    if array.ndim != 3:
        raise ValueError(f"image {name} must have 2 or 3 dimensions (H, W[, C]), got shape {tuple(array.shape)}")
    if array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image {name} must have 1, 3 or 4 channels, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        if array.dtype == np.bool_:
            array = array.astype(np.uint8) * 255
        elif np.issubdtype(array.dtype, np.floating):
            if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
                raise ValueError(f"float image {name} must hold values in [0, 1]; pass uint8 for 0..255 pixels")
            array = np.rint(np.nan_to_num(array) * 255).astype(np.uint8)
        elif np.issubdtype(array.dtype, np.integer):
            if array.size and (array.min() < 0 or array.max() > 255):
                raise ValueError(f"integer image {name} must hold values in 0..255, got dtype {array.dtype}")
            array = array.astype(np.uint8)
        else:
            raise TypeError(f"image {name} has unsupported dtype {array.dtype}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)  # (H, W, 3)
    elif array.shape[-1] == 4:
        array = pil_to_rgb_array(Image.fromarray(np.ascontiguousarray(array), mode="RGBA"))
    return np.ascontiguousarray(array)


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(pil_to_rgb(image))  # (H, W, 3)


def _open_image_file(source, name: str) -> Image.Image:
    """Open with Pillow's decompression-bomb guard turned into a clear error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(
            f"image {name} is larger than Pillow's decompression-bomb limit "
            f"(Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels): {error}"
        ) from None
    except UnidentifiedImageError:
        raise ValueError(f"image {name} is not a readable image file") from None
    except OSError as error:
        raise ValueError(f"image {name} could not be decoded (truncated or corrupt?): {error}") from None
    return image


def load_image(source) -> np.ndarray:
    """Load one image as an RGB uint8 array of shape `(H, W, 3)`.

    `source` is a path (or `file://` path), an http(s) URL, bytes, a binary file object, a PIL
    image, a NumPy array (HW, HWC or CHW) or a torch tensor. EXIF orientation is applied.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        return pil_to_rgb_array(source)
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name)
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            from transformers.image_utils import load_image as load_remote_image

            return pil_to_rgb_array(load_remote_image(text))
        return pil_to_rgb_array(_open_image_file(_local_path(source, "image"), name))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return pil_to_rgb_array(_open_image_file(io.BytesIO(bytes(source)), name))
    if hasattr(source, "read"):
        return pil_to_rgb_array(_open_image_file(source, name))
    raise TypeError(
        f"unsupported image input of type {type(source).__name__}; expected a path, URL, bytes, "
        "file object, PIL image, NumPy array or torch tensor"
    )


# --------------------------------------------------------------------------------------------
# Videos


def _check_sampling(fps, max_frames, start_time, end_time, name):
    if fps is None or not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0:
        raise ValueError(f"video {name}: fps must be a number > 0, got {fps!r}")
    if max_frames is None or isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames <= 0:
        raise ValueError(f"video {name}: max_frames must be an integer > 0, got {max_frames!r}")
    if start_time is not None and start_time < 0:
        raise ValueError(f"video {name}: start_time must be >= 0, got {start_time!r}")
    if start_time is not None and end_time is not None and start_time >= end_time:
        raise ValueError(f"video {name}: start_time ({start_time}) must be smaller than end_time ({end_time})")
    if end_time is not None and end_time <= 0:
        raise ValueError(f"video {name}: end_time must be > 0, got {end_time!r}")


def _linspace_picks(count: int, max_frames: int) -> list[int]:
    if count <= max_frames:
        return list(range(count))
    # Evenly spread over the whole clip, first and last kept; the frames keep their true times.
    return np.linspace(0, count - 1, max_frames).astype(np.int64).tolist()


def _sample_grid(times: list[float], fps: float, start: float, end: float | None) -> list[int]:
    """Indices into sorted `times` of the frames on screen at start, start + 1/fps, start + 2/fps, ...

    The frame on screen at t is the last one presented at or before t (what a player shows, and
    exact for constant frame rates); the first target takes the first frame at or after `start`.
    """
    tolerance = 1e-6  # float slack only
    last = times[-1] if end is None else min(times[-1], end)
    first = bisect.bisect_left(times, start - tolerance)
    picks, k = [], 0
    while True:
        target = start + k / fps
        if target > last + tolerance:
            break
        index = max(first, bisect.bisect_right(times, target + tolerance) - 1)
        if not picks or picks[-1] != index:
            picks.append(index)
        k += 1
    return picks


class _Opener:
    """Re-openable PyAV input: a path or URL, or in-memory bytes / a seekable file object."""

    def __init__(self, source, name):
        self.name = name
        if isinstance(source, (str, os.PathLike)):
            text = str(source)
            self.target = text if "://" in text and not text.startswith("file://") else _local_path(source, "video")
        elif isinstance(source, (bytes, bytearray, memoryview)):
            self.target = bytes(source)
        elif hasattr(source, "read"):
            self.target = source
        else:
            raise TypeError(f"unsupported video input of type {type(source).__name__}")

    def open(self):
        target = self.target
        if isinstance(target, bytes):
            target = io.BytesIO(target)
        elif hasattr(target, "seek"):
            target.seek(0)
        try:
            return av.open(target, mode="r")
        except av.error.FFmpegError as error:
            raise ValueError(f"video {self.name} could not be opened (corrupt, truncated or not a video): {error}") from None


def _nonreference_test(stream):
    """For H.264 in MP4/MKV (length-prefixed NAL units), a test telling whether a packet holds only
    non-reference slices (nal_ref_idc == 0), so skipping it changes no other decoded picture.
    None for other codecs and layouts, which are always decoded in full."""
    context = stream.codec_context
    extradata = context.extradata
    if context.name != "h264" or not extradata or extradata[0] != 1 or len(extradata) < 5:
        return None
    length_size = (extradata[4] & 3) + 1  # avcC lengthSizeMinusOne

    def only_nonreference(packet) -> bool:
        data = bytes(packet)
        position, slices = 0, 0
        while position + length_size <= len(data):
            size = int.from_bytes(data[position : position + length_size], "big")
            position += length_size
            if size <= 0 or position + size > len(data):
                return False  # malformed: decode it and let the decoder judge
            header = data[position]
            if header & 0x1F in (1, 5):  # coded slice (non-IDR, IDR)
                if header & 0x60:  # nal_ref_idc != 0: other pictures predict from it
                    return False
                slices += 1
            position += size
        return slices > 0

    return only_nonreference


# Below this many pixels a picture decodes faster on one thread: starting and feeding the
# decoder's threads costs more than they save (60 frames at 112x112: 13 ms on one thread, 35 ms
# with frame and slice threads, on 2 cores); larger pictures take PyAV's frame + slice threads.
# H.264 decodes bit-identically either way.
SINGLE_THREAD_PIXELS = 320 * 240


def _set_decoder_threads(stream) -> None:
    context = stream.codec_context
    if context.width * context.height < SINGLE_THREAD_PIXELS:
        stream.thread_type, stream.thread_count = "NONE", 1
    else:
        stream.thread_type = "AUTO"


def _decode_first(opener, pts, seek: bool):
    """The first decodable frame (from `pts` when seeking): its size and rotation describe the video."""
    with opener.open() as container:
        stream = container.streams.video[0]
        _set_decoder_threads(stream)
        if seek:
            container.seek(int(pts), stream=stream, backward=True)
        try:
            for frame in container.decode(stream):
                return frame
        except av.error.FFmpegError as error:
            raise ValueError(f"video {opener.name} is corrupt or truncated (decoding failed: {error})") from None
    raise ValueError(f"video {opener.name} has no decodable video frames")


class VideoFile:
    """A video file (path, URL, bytes or file object) whose frames to sample are chosen, not decoded.

    `VideoFile.probe` demuxes the file once without decoding (milliseconds) to learn every frame's
    presentation time, and decodes one frame for its size and rotation. `frames_at(height, width)`
    then decodes (threaded for large pictures) and converts only the chosen frames, scaling them
    straight to the model's size in the same swscale pass, so full-resolution RGB frames are never
    held in memory. Scaling is swscale's (area when shrinking, bicubic when enlarging), not
    Pillow's bicubic, which images and in-memory frames use.

    Attributes:
        timestamps: seconds from the start of the stream of the chosen frames (true times).
        shape: `(T, H, W)` as displayed (rotation metadata applied).
    """

    def __init__(self, opener, pts, origin, time_base, seek, rotation, height, width):
        self._opener, self._pts, self._origin, self._time_base = opener, pts, origin, time_base
        self._seek, self._rotation = seek, rotation
        self.source = opener.name
        self.timestamps = [round((p - origin) * time_base, 6) for p in pts]
        self.shape = (len(pts), height, width)
        self._raw_height, self._raw_width = (width, height) if rotation % 2 else (height, width)

    @classmethod
    def probe(cls, source, fps=1.0, max_frames=128, start_time=None, end_time=None) -> "VideoFile":
        """Open `source`, list its frames' times and choose the frames to sample (no full decode)."""
        opener = _Opener(source, _describe(source))
        name = opener.name
        _check_sampling(fps, max_frames, start_time, end_time, name)
        with opener.open() as container:
            if not container.streams:
                raise ValueError(f"video {name} contains no streams: an empty, zero-frame file")
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams})
                raise ValueError(f"video {name} has no video stream, only {kinds} (audio-only or not a video file)")
            stream = container.streams.video[0]
            time_base = float(stream.time_base)
            pts = []
            try:
                for packet in container.demux(stream):
                    if packet.pts is not None and packet.size > 0:
                        pts.append(packet.pts)
            except av.error.FFmpegError as error:
                raise ValueError(f"video {name} is corrupt or truncated (demuxing failed: {error})") from None
            origin = stream.start_time if stream.start_time is not None else (min(pts) if pts else 0)
        pts = sorted(p for p in pts if p >= origin)  # frames before the stream start are not shown
        if not pts:
            raise ValueError(f"video {name} contains no video frames (zero-frame file)")
        times = [(p - origin) * time_base for p in pts]
        start = float(start_time or 0.0)
        if start > times[-1]:
            raise ValueError(f"video {name}: start_time {start} s is past the last frame at {times[-1]:.3f} s")
        candidates = _sample_grid(times, fps, start, end_time)
        chosen = [pts[candidates[i]] for i in _linspace_picks(len(candidates), max_frames)]
        first = _decode_first(opener, chosen[0], seek=start > 0)
        rotation = round((first.rotation or 0) / 90) % 4
        height, width = (first.width, first.height) if rotation % 2 else (first.height, first.width)
        return cls(opener, chosen, origin, time_base, start > 0, rotation, height, width)

    @property
    def frames(self) -> np.ndarray:
        """The chosen frames at their own size, `(T, H, W, 3)` uint8."""
        return self.frames_at(*self.shape[1:])

    def frames_at(self, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
        """Decode the chosen frames scaled to `(height, width)` as displayed: `(T, height, width, 3)` uint8."""
        # swscale scales the stored (unrotated) picture; a quarter turn swaps its sides.
        scaled_h, scaled_w = (width, height) if self._rotation % 2 else (height, width)
        # Area averaging when shrinking (antialiased, and a third of bicubic's cost in swscale; both
        # stay within ~1 grey level of Pillow's bicubic on average), bicubic when enlarging.
        shrinking = scaled_h <= self._raw_height and scaled_w <= self._raw_width
        interpolation = "AREA" if shrinking else "BICUBIC"
        out = np.empty((len(self._pts), height, width, 3), dtype=np.uint8)  # (T, H', W', 3)
        filled, next_pick = 0, 0
        wanted = set(self._pts)
        # One swscale context for the whole clip: `frame.to_ndarray(width=..., height=...)` builds a
        # new one per frame, 0.84 ms for a 112 px frame against 0.06 ms reused (same pixels).
        reformatter = VideoReformatter()
        with self._opener.open() as container:
            stream = container.streams.video[0]
            _set_decoder_threads(stream)
            disposable = _nonreference_test(stream)
            if self._seek:
                container.seek(int(self._pts[0]), stream=stream, backward=True)
            try:
                for packet in container.demux(stream):
                    # A picture no other picture predicts from is only decoded when it is picked;
                    # the others decode bit-identically without it (what skip_frame=NONREF does,
                    # but per packet, so picked non-reference frames are still decoded).
                    if disposable and packet.size and packet.pts not in wanted and disposable(packet):
                        continue
                    for frame in packet.decode():
                        if frame.pts is None or frame.pts < self._pts[next_pick]:
                            continue  # decoded only as a reference for later frames
                        rgb = reformatter.reformat(
                            frame, format="rgb24", width=scaled_w, height=scaled_h, interpolation=interpolation
                        ).to_ndarray()  # (h, w, 3)
                        if self._rotation:
                            # Display-matrix rotation is counter-clockwise, as is np.rot90.
                            rgb = np.rot90(rgb, self._rotation)  # (H', W', 3)
                        out[filled] = rgb
                        filled += 1
                        while next_pick < len(self._pts) and self._pts[next_pick] <= frame.pts:
                            next_pick += 1
                        if next_pick == len(self._pts):
                            break
                    if next_pick == len(self._pts):
                        break
            except av.error.FFmpegError as error:
                raise ValueError(
                    f"video {self.source} is corrupt or truncated (decoding failed after {filled} frames: {error})"
                ) from None
        if filled != len(self._pts):
            raise ValueError(
                f"video {self.source}: {len(self._pts)} frames were listed by the container but only {filled} "
                "could be decoded (corrupt or truncated file)"
            )
        return out


def _frames_to_clip(frames, timestamps, fps, max_frames, start_time, end_time, name) -> VideoClip:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"video {name} array must have shape (T, H, W, 3), got {tuple(frames.shape)}")
        if frames.shape[-1] not in (1, 3, 4) and frames.shape[1] in (1, 3, 4):
            frames = np.moveaxis(frames, 1, -1)  # (T, C, H, W) -> (T, H, W, C)
    if len(frames) == 0:
        raise ValueError(f"video {name} contains no frames")
    if timestamps is None:
        # In-memory frames are taken as already sampled at `fps` frames per second.
        timestamps = [i / fps for i in range(len(frames))]
    timestamps = [float(t) for t in timestamps]
    if len(timestamps) != len(frames):
        raise ValueError(f"video {name} has {len(frames)} frames but {len(timestamps)} timestamps")
    keep = [i for i, t in enumerate(timestamps) if (start_time is None or t >= start_time) and (end_time is None or t <= end_time)]
    if not keep:
        raise ValueError(f"video {name} has no frame between start_time={start_time} and end_time={end_time}")
    keep = [keep[i] for i in _linspace_picks(len(keep), max_frames)]
    stamps = [timestamps[i] for i in keep]
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.shape[-1] == 3:
        return VideoClip(frames=np.ascontiguousarray(frames[keep]), timestamps=stamps, source=name)  # (T, H, W, 3)
    rgb = []
    for i in keep:
        try:
            rgb.append(load_image(frames[i]))  # (H, W, 3)
        except (ValueError, TypeError) as error:
            raise type(error)(f"video {name} frame {i}: {error}") from None
    shapes = {f.shape for f in rgb}
    if len(shapes) > 1:
        raise ValueError(f"video {name} frames differ in size: {sorted(shapes)}")
    return VideoClip(frames=np.stack(rgb), timestamps=stamps, source=name)  # (T, H, W, 3)


def load_video(source, fps=1.0, max_frames=128, start_time=None, end_time=None, timestamps=None):
    """Sample a video at `fps` frames per second with PyAV, or take frames already in memory.

    Args:
        source: a path / URL, bytes, a binary file object, a `(T, H, W, 3)` uint8 array or tensor,
            a list of frames (arrays, PIL images or image paths), or a `VideoClip`.
        fps: frames per second to sample; frames are those shown at t = 0, 1/fps, 2/fps, ... from
            the start of the stream (or from `start_time`). In-memory frames are taken as already
            sampled at this rate unless `timestamps` is given.
        max_frames: if more frames than this are sampled, `linspace` picks this many, first and
            last included, and each keeps its true timestamp.
        start_time, end_time: optional trim in seconds.
        timestamps: seconds of in-memory frames (ignored for files).

    Returns:
        `VideoFile` (files: frames chosen, decoded on demand at the model's size) or `VideoClip`
        (in-memory frames). Both have `timestamps` (seconds), `shape` `(T, H, W)`, `frames`
        `(T, H, W, 3)` uint8 RGB and `frames_at(height, width)`. A clip shorter than one sampling
        interval still gives its first frame.
    """
    name = _describe(source)
    _check_sampling(fps, max_frames, start_time, end_time, name)
    if isinstance(source, VideoFile):
        return source
    if isinstance(source, VideoClip):
        return _frames_to_clip(source.frames, source.timestamps, fps, max_frames, start_time, end_time, source.source)
    if isinstance(source, (np.ndarray, torch.Tensor, list, tuple)):
        return _frames_to_clip(source, timestamps, fps, max_frames, start_time, end_time, name)
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(source, "read"):
        return VideoFile.probe(source, fps, max_frames, start_time, end_time)
    raise TypeError(
        f"unsupported video input of type {type(source).__name__}; expected a path, URL, bytes, file "
        "object, (T, H, W, 3) array, list of frames or VideoClip"
    )


# --------------------------------------------------------------------------------------------
# Resize, patchify, DiffFP


def differential_frame_pruning(patches: torch.Tensor, grid, merge_size: int, threshold: float, min_tokens: int) -> torch.Tensor:
    """DiffFP keep-mask of one video item (paper section 3.3).

    Args:
        patches: normalised patches of the item, shape `(T*gh*gw, D)` in merge-block order.
        grid: `(T, gh, gw)`.
    Returns:
        bool tensor of shape `(T*K,)`, one entry per merged token, True = keep. Frame 0 is kept whole;
        a later token is kept when its mean absolute change from the previous frame, in 0..255
        pixel units, exceeds `threshold`; a frame keeping fewer than `min_tokens` also keeps its
        first `min_tokens` tokens (token order, not the most-changed ones).
    """
    t, gh, gw = (int(v) for v in grid)
    tokens_per_frame = (gh // merge_size) * (gw // merge_size)
    if t == 1:
        return torch.ones(tokens_per_frame, dtype=torch.bool)
    # Merge-block order makes the m*m patches of one merged token contiguous rows.
    tokens = patches.view(t, tokens_per_frame, -1)  # (T, K, m*m*D)
    change = torch.sub(tokens[1:], tokens[:-1]).abs_().mean(dim=-1) * 255  # (T-1, K)
    keep = torch.ones(t, tokens_per_frame, dtype=torch.bool)  # (T, K)
    keep[1:] = change > threshold
    starved = keep.sum(dim=1) < min_tokens
    keep[starved, :min_tokens] = True
    return keep.flatten()  # (T*K,)


def _round_to(value: float, factor: int) -> int:
    return round(value / factor) * factor


class Videollama3ImageProcessorKwargs(TypedDict, total=False):
    """Settings `from_pretrained(..., **kwargs)` may override (read by transformers' loader)."""

    patch_size: int
    min_tokens: int
    max_tokens: int
    resample: int
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: list
    image_std: list
    do_convert_rgb: bool


class Videollama3ImageProcessor(ImageProcessingMixin):
    r"""Any-resolution image and video-frame processor of VideoLLaMA3.

    Reads the official `preprocessor_config.json` unchanged. One call shares a budget of
    `max_tokens` merged tokens among all its images and frames (the processor calls it once per
    sample, so a sample's tokens never depend on the rest of its batch).

    Args:
        patch_size: pixel side of a vision-encoder patch (14).
        min_tokens: smallest number of merged tokens of one image or frame; smaller inputs are
            resized up (only when all items of a call share one merge size, as in the official code).
        max_tokens: merged-token budget of one call.
        resample: PIL resampling filter (3 = bicubic).
        rescale_factor, image_mean, image_std: pixels become `(x * rescale_factor - mean) / std`.
        do_resize, do_rescale, do_normalize, do_convert_rgb: official switches; RGB conversion
            always happens because the encoder needs 3 channels.

    Call outputs (`BatchFeature`):
        pixel_values `(N, 3*14*14)` float32, grid_sizes `(k, 3)` long `[t, gh, gw]`,
        merge_sizes `(k,)` long, compression_mask `(M,)` bool over merged tokens.
    """

    _auto_class = "AutoImageProcessor"
    valid_kwargs = Videollama3ImageProcessorKwargs
    model_input_names = ["pixel_values", "grid_sizes", "merge_sizes", "compression_mask"]

    def __init__(
        self,
        patch_size: int = 14,
        min_tokens: int = 16,
        max_tokens: int = 16384,
        resample: int = BICUBIC,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
        if not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"min_tokens must be an integer >= 1, got {min_tokens!r}")
        if not isinstance(max_tokens, int) or max_tokens < min_tokens:
            raise ValueError(f"max_tokens must be an integer >= min_tokens ({min_tokens}), got {max_tokens!r}")
        self.patch_size = patch_size
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self.resample = int(resample)
        self.do_resize = do_resize
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_convert_rgb = do_convert_rgb

    # ---- sizes -------------------------------------------------------------------------------

    def target_sizes(self, shapes, merge_sizes, min_tokens=None, max_tokens=None) -> list[tuple[int, int]]:
        """Resized `(H', W')` of each item, facts section 4 ("smart resize").

        Args:
            shapes: `(T, H, W)` of each item of the call (T = 1 for an image).
            merge_sizes: merge size of each item.
        Raises:
            ValueError: an item so elongated (e.g. 1x5000 under a small budget) that one patch
                row or column already exceeds its share of `max_tokens`; the message names its
                index, size and aspect ratio.
        """
        min_tokens = self.min_tokens if min_tokens is None else min_tokens
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        if not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"min_tokens must be an integer >= 1, got {min_tokens!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        for index, (t, h, w) in enumerate(shapes):
            if t < 1 or h < 1 or w < 1:
                raise ValueError(f"visual item {index} has an empty shape (T, H, W) = {(t, h, w)}")
        if not self.do_resize:
            sizes = [(h, w) for _, h, w in shapes]
            for index, ((_, h, w), m) in enumerate(zip(shapes, merge_sizes)):
                if h % (self.patch_size * m) or w % (self.patch_size * m):
                    raise ValueError(
                        f"do_resize=False but item {index} of size {h}x{w} (HxW) is not a multiple of "
                        f"patch_size*merge_size={self.patch_size * m}"
                    )
            return sizes
        if len(set(merge_sizes)) <= 1:
            return self._single_merge_sizes(shapes, merge_sizes[0] if merge_sizes else 1, min_tokens, max_tokens)
        return self._mixed_merge_sizes(shapes, merge_sizes, max_tokens)

    def _single_merge_sizes(self, shapes, merge_size, min_tokens, max_tokens):
        factor = self.patch_size * merge_size
        count = sum(t for t, _, _ in shapes)  # frames + images share the budget
        budget = max_tokens * factor * factor // count
        minimum = min_tokens * factor * factor
        sizes = []
        for index, (_, h, w) in enumerate(shapes):
            new_h, new_w = _round_to(h, factor), _round_to(w, factor)
            scale = 1.0  # the scale applied last, only to judge elongation below
            if new_h * new_w > budget:
                beta = math.sqrt(h * w / budget)
                new_h = math.floor(h / beta / factor) * factor
                new_w = math.floor(w / beta / factor) * factor
                scale = 1 / beta
            if new_h * new_w < minimum:
                beta = math.sqrt(minimum / (h * w))
                new_h = math.ceil(h * beta / factor) * factor
                new_w = math.ceil(w * beta / factor) * factor
                scale = beta
            new_h, new_w = max(new_h, factor), max(new_w, factor)
            # Rounding up to whole patches may exceed the share a little (the official rule, kept);
            # but when the short side needed far less than one patch row, the long side alone
            # overruns the budget: that elongation cannot be tokenized, so say so.
            if new_h * new_w > max(budget, minimum) and min(h, w) * scale < factor / 2:
                self._raise_aspect(index, h, w, new_h, new_w, factor, max_tokens, count)
            sizes.append((new_h, new_w))
        return sizes

    def _mixed_merge_sizes(self, shapes, merge_sizes, max_tokens):
        # Official path for a call mixing merge sizes (image + video): one global scale, no minimum.
        total = sum(t * math.ceil(h / (self.patch_size * m)) * math.ceil(w / (self.patch_size * m)) for (t, h, w), m in zip(shapes, merge_sizes))
        sizes = []
        for (_, h, w), m in zip(shapes, merge_sizes):
            factor = self.patch_size * m
            if total > max_tokens:
                beta = math.sqrt(total / max_tokens)
                new_h, new_w = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
            else:
                new_h, new_w = _round_to(h, factor), _round_to(w, factor)
            sizes.append((max(new_h, factor), max(new_w, factor)))
        tokens = sum(t * (h // (self.patch_size * m)) * (w // (self.patch_size * m)) for (t, _, _), (h, w), m in zip(shapes, sizes, merge_sizes))
        if tokens > max_tokens and total > max_tokens:
            worst = max(range(len(shapes)), key=lambda i: max(shapes[i][1:]) / min(shapes[i][1:]))
            t, h, w = shapes[worst]
            self._raise_aspect(worst, h, w, *sizes[worst], self.patch_size * merge_sizes[worst], max_tokens, len(shapes))
        return sizes

    @staticmethod
    def _raise_aspect(index, h, w, new_h, new_w, factor, max_tokens, count):
        ratio = max(h, w) / min(h, w)
        raise ValueError(
            f"visual item {index} of {w}x{h} pixels (WxH) has aspect ratio {ratio:.0f}:1, too elongated to "
            f"tokenize within max_tokens={max_tokens} shared by {count} images/frames: even one {factor}-pixel "
            f"row/column needs {new_h * new_w // factor // factor} merged tokens. Crop it or raise max_tokens."
        )

    def num_tokens(self, shapes, merge_sizes, min_tokens=None, max_tokens=None) -> list[int]:
        """Merged tokens of each item before pruning: `T * (H'/P/m) * (W'/P/m)` (cheap, no pixels)."""
        sizes = self.target_sizes(shapes, merge_sizes, min_tokens, max_tokens)
        factors = [self.patch_size * m for m in merge_sizes]
        return [t * (h // f) * (w // f) for (t, _, _), (h, w), f in zip(shapes, sizes, factors)]

    # ---- pixels ------------------------------------------------------------------------------

    def to_patches(self, frames: np.ndarray, merge_size: int) -> torch.Tensor:
        """uint8 frames `(T, H, W, C)` -> normalised float32 patches `(T*gh*gw, C*P*P)` in merge-block order.

        The permutation runs on uint8 (a quarter of the bytes); the float conversion, rescale and
        normalisation then run once, in place, on the final layout.
        """
        t, h, w, c = frames.shape
        p, m = self.patch_size, merge_size
        gh, gw = h // p, w // p
        blocks = frames.reshape(t, gh // m, m, p, gw // m, m, p, c)  # (T, gh/m, m, P, gw/m, m, P, C)
        blocks = blocks.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # (T, gh/m, gw/m, m, m, C, P, P)
        blocks = np.ascontiguousarray(blocks).reshape(t * gh * gw, c, p * p)  # (N, C, P*P)
        # (x * rescale - mean) / std as one multiply-add per channel.
        scale = torch.full((c,), self.rescale_factor if self.do_rescale else 1.0, dtype=torch.float64)
        shift = torch.zeros(c, dtype=torch.float64)
        if self.do_normalize:
            std = torch.tensor(self.image_std, dtype=torch.float64)
            scale, shift = scale / std, -torch.tensor(self.image_mean, dtype=torch.float64) / std
        patches = torch.from_numpy(blocks).to(torch.float32)  # (N, C, P*P)
        patches.mul_(scale.float().view(1, c, 1)).add_(shift.float().view(1, c, 1))
        return patches.view(t * gh * gw, c * p * p)  # (N, D)

    def _as_visual(self, item, index):
        """An item as an object with `shape` `(T, H, W)` and `frames_at(h, w)`; an image is one frame."""
        if isinstance(item, (VideoClip, VideoFile)):
            return item
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        if isinstance(item, np.ndarray) and item.ndim == 4 or isinstance(item, (list, tuple)):
            frames = list(item)
            return _frames_to_clip(frames, None, 1.0, max(len(frames), 1), None, None, f"item {index}")
        return VideoClip(frames=load_image(item)[None], timestamps=[0.0], source=_describe(item))  # (1, H, W, 3)

    def __call__(self, images, merge_size=1, **kwargs) -> BatchFeature:
        return self.preprocess(images, merge_size=merge_size, **kwargs)

    def preprocess(
        self,
        images,
        merge_size=1,
        min_tokens=None,
        max_tokens=None,
        use_token_compression=False,
        compression_threshold=0.1,
        compression_min_tokens=1,
        return_tensors="pt",
        **unused,
    ) -> BatchFeature:
        """Turn the visual items of one call into model inputs.

        Args:
            images: one image, or a list of items; an item is an image (path, PIL, array HWC/CHW,
                tensor, bytes) or a video (`VideoClip`, `(T, H, W, 3)` array, list of frames).
            merge_size: int for all items, or one per item (official: 1 images, 2 videos).
            use_token_compression: apply DiffFP to items with more than one frame.
        Returns:
            `BatchFeature` with `pixel_values (N, 3*P*P)`, `grid_sizes (k, 3)`, `merge_sizes (k,)`,
            `compression_mask (M,)`.
        """
        if unused:
            raise TypeError(f"unexpected image processor argument(s): {sorted(unused)}")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("images is empty: pass at least one image or video")
        merges = list(merge_size) if isinstance(merge_size, (list, tuple)) else [merge_size] * len(items)
        if len(merges) != len(items):
            raise ValueError(f"got {len(merges)} merge sizes for {len(items)} items")
        visuals = [self._as_visual(item, i) for i, item in enumerate(items)]
        shapes = [v.shape for v in visuals]
        sizes = self.target_sizes(shapes, merges, min_tokens, max_tokens)

        patches, grids, masks = [], [], []
        for visual, (h, w), m in zip(visuals, sizes, merges):
            item_patches = self.to_patches(visual.frames_at(h, w, self.resample), m)  # (T*gh*gw, D)
            grid = (visual.shape[0], h // self.patch_size, w // self.patch_size)
            if use_token_compression:
                masks.append(differential_frame_pruning(item_patches, grid, m, compression_threshold, compression_min_tokens))
            else:
                masks.append(torch.ones(grid[0] * (grid[1] // m) * (grid[2] // m), dtype=torch.bool))
            patches.append(item_patches)
            grids.append(grid)
        data = {
            "pixel_values": patches[0] if len(patches) == 1 else torch.cat(patches),  # (N, D)
            "grid_sizes": torch.tensor(grids, dtype=torch.long),  # (k, 3)
            "merge_sizes": torch.tensor(merges, dtype=torch.long),  # (k,)
            "compression_mask": torch.cat(masks),  # (M,)
        }
        if return_tensors in (None, "np"):
            data = {key: value.numpy() for key, value in data.items()}
            return BatchFeature(data, tensor_type=return_tensors)
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def frame_token_counts(grid_sizes, merge_sizes, compression_mask) -> list[list[int]]:
        """Kept merged tokens of every frame of every item (placeholders per `<image>`)."""
        counts, offset = [], 0
        mask = torch.as_tensor(compression_mask)
        for (t, gh, gw), m in zip(torch.as_tensor(grid_sizes).tolist(), torch.as_tensor(merge_sizes).tolist()):
            per_frame = (gh // m) * (gw // m)
            item = mask[offset : offset + t * per_frame].view(t, per_frame).sum(dim=1)  # (T,)
            counts.append(item.tolist())
            offset += t * per_frame
        return counts


__all__ = [
    "Videollama3ImageProcessor",
    "VideoClip",
    "VideoFile",
    "MediaNotFoundError",
    "load_image",
    "load_video",
    "differential_frame_pruning",
    "pil_height_width",
    "pil_to_rgb",
]
