"""Real media files for the processor tests, made on the fly with PyAV and Pillow (no downloads).

Videos are real encodes (H.264 in mp4, VP9 in webm, MJPEG in avi) of a small synthetic scene:
a static stretch (the same picture every frame) followed by a moving stretch (a bright square
sliding across), so sampling times and DiffFP keep-counts are predictable.
"""

from fractions import Fraction

import av
import numpy as np
from PIL import Image

CODECS = {
    "mp4": ("libx264", "yuv420p"),
    "webm": ("libvpx-vp9", "yuv420p"),
    "avi": ("mjpeg", "yuvj420p"),
    "mkv": ("libx264", "yuv420p"),
}


def scene_frame(index: int, *, height: int = 56, width: int = 84, static_frames: int = 60) -> np.ndarray:
    """Frame `index` of the scene: grey gradient background; after `static_frames`, a moving square."""
    y = np.linspace(40, 200, height, dtype=np.float32)[:, None]
    x = np.linspace(40, 200, width, dtype=np.float32)[None, :]
    background = ((y + x) / 2).astype(np.uint8)
    frame = np.stack([background, background // 2 + 60, 255 - background], axis=-1)  # (H, W, 3)
    if index >= static_frames:
        side = max(8, height // 3)
        step = index - static_frames
        left = (step * 3) % max(1, width - side)
        top = (height - side) // 2
        frame[top : top + side, left : left + side] = (250, 250, 30)
    return frame


def write_video(
    path,
    *,
    seconds: float = 4.0,
    fps: int = 30,
    height: int = 56,
    width: int = 84,
    static_seconds: float = 2.0,
    container: str | None = None,
    frame_fn=None,
    rotation: int | None = None,
    frame_times=None,
    options: dict | None = None,
) -> str:
    """Encode the scene (or `frame_fn(i)`) to `path`; the container follows the file suffix.

    `frame_times` (seconds) gives a variable frame rate; `rotation` stores a display matrix;
    `options` replace the encoder options (e.g. an x264 preset with B-frames).
    """
    path = str(path)
    kind = container or path.rsplit(".", 1)[-1]
    codec, pix_fmt = CODECS[kind]
    count = len(frame_times) if frame_times is not None else int(round(seconds * fps))
    frame_fn = frame_fn or (lambda i: scene_frame(i, height=height, width=width, static_frames=int(static_seconds * fps)))
    with av.open(path, mode="w") as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "qp": "0"}
        if codec == "mjpeg":
            # Fixed quantiser: identical pictures then encode to identical JPEGs.
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = 2 * 118  # qscale 2 in lambda units (FF_QP2LAMBDA)
        if codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "lossless": "1"}
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if options is not None:
            stream.options = options
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_fn(i)), format="rgb24")
            if frame_times is not None:
                frame.pts = int(round(frame_times[i] * 1000))
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return path


def write_zero_frame_video(path) -> str:
    """An mp4 with a video stream and no frames."""
    with av.open(str(path), mode="w") as output:
        stream = output.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        output.start_encoding()  # write the header although no frame follows
        for packet in stream.encode():
            output.mux(packet)
    return str(path)


def write_audio_only(path, seconds: float = 1.0) -> str:
    """A .m4a file with one AAC stream and no video."""
    rate = 16000
    with av.open(str(path), mode="w", format="mp4") as output:
        stream = output.add_stream("aac", rate=rate)
        samples = (np.sin(np.arange(int(rate * seconds)) / 10) * 0.3).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return str(path)


def truncate(path, out_path, keep_fraction: float = 0.5) -> str:
    data = open(path, "rb").read()
    with open(out_path, "wb") as handle:
        handle.write(data[: int(len(data) * keep_fraction)])
    return str(out_path)


def write_garbage(path, size: int = 4096) -> str:
    rng = np.random.default_rng(0)
    with open(path, "wb") as handle:
        handle.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return str(path)


def photo(height: int = 64, width: int = 96) -> Image.Image:
    """A real photograph (scikit-image's astronaut), resized to a small size."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC)


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
