"""VideoLLaMA3 image processor: image loading, any-resolution resize (AVT) and patchify (Pillow, NumPy, torch).

Shape letters are those of modeling_videollama3.py (T frames, H/W patch rows/columns, m merge size, N patches,
M merged tokens, K kept tokens, C channels, p patch size), plus Hp/Wp for an image's or frame's pixel height/width.
"""

import io
import math
import os
import urllib.error
import urllib.request
import warnings
from typing import TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import ImageProcessingMixin

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value official preprocessor_config.json stores
URL_TIMEOUT = 30  # seconds to wait for a media URL


class MediaNotFoundError(FileNotFoundError, ValueError):
    """A media path that does not exist."""


def concat(tensors: list) -> torch.Tensor:
    """`torch.cat` that does not copy a single tensor (a long video's patches are hundreds of MB)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def num_merged_tokens(t: int, gh: int, gw: int, m: int) -> int:
    """Merged tokens of an item of `t` frames of `H x W` patches merged by `m`."""
    return t * (gh // m) * (gw // m)


def describe(source) -> str:
    """A short name of a media source for error messages."""
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        return str(source) if isinstance(source, (str, os.PathLike)) else f"<{len(source)} bytes>"
    return f"<file object {getattr(source, 'name', '')}>" if hasattr(source, "read") else f"<{type(source).__name__}>"


def check_int(key: str, value, low: int) -> None:
    """A ValueError naming `key` unless `value` is an integer (not a bool) >= `low`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


def local_path(source, kind: str) -> str:
    """An existing file path (a `file://` prefix removed), or a clear error."""
    path = str(source).removeprefix("file://")
    if not os.path.exists(path):
        raise MediaNotFoundError(2, f"{kind} file not found", path)
    if os.path.isdir(path):
        raise ValueError(f"{kind} path {path!r} is a directory, not a file")
    return path


def fetch_url(url: str, kind: str) -> bytes:
    """The bytes at an http(s) URL; a ValueError naming the URL and the HTTP status or the cause."""
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        raise ValueError(f"{kind} URL {url} answered HTTP {error.code} ({error.reason})") from None
    except OSError as error:  # URLError, timeouts and refused connections
        raise ValueError(f"{kind} URL {url} could not be fetched: {getattr(error, 'reason', error)}") from None


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image as `(Hp, Wp, 3)` uint8 RGB, EXIF orientation applied: transparency on white (what a
    viewer shows), 16/32-bit and float greyscale scaled to 8 bits rather than clipped."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode  # before any conversion below
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):  # 16-bit: 0..65535
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # (Hp, Wp, 3)


def array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """An image array (HW, HWC or CHW; uint8, bool, integers 0..255 or floats in [0, 1]) as `(Hp, Wp, 3)` uint8."""
    array = array[:, :, None] if array.ndim == 2 else array  # (H, W, 1)
    if array.ndim != 3:
        raise ValueError(f"image {name} must have 2 or 3 dimensions (Hp, Wp[, C]), got shape {tuple(array.shape)}")
    if array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image {name} must have 1, 3 or 4 channels, got shape {tuple(array.shape)}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
            raise ValueError(f"float image {name} must hold values in [0, 1]; pass uint8 for 0..255 pixels")
        array = np.rint(np.nan_to_num(array) * 255).astype(np.uint8)
    elif not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"image {name} has unsupported dtype {array.dtype}")
    elif array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"integer image {name} must hold values in 0..255, got dtype {array.dtype}")
    array = array.astype(np.uint8, copy=False)
    if array.shape[-1] == 4:
        return pil_to_rgb(Image.fromarray(np.ascontiguousarray(array), mode="RGBA"))  # (Hp, Wp, 3)
    return np.ascontiguousarray(np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array)  # (Hp, Wp, 3)


def open_image(source, name: str) -> np.ndarray:
    """Decode an image file; Pillow's decompression-bomb guard and decode errors become ValueErrors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"image {name} has more pixels than Pillow's decompression-bomb limit "
                         f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}); raise that limit to open it") from None
    except UnidentifiedImageError:
        raise ValueError(f"image {name} is not a readable image file") from None
    except OSError as error:
        raise ValueError(f"image {name} could not be decoded (truncated or corrupt?): {error}") from None
    return pil_to_rgb(image)


def load_image(source) -> np.ndarray:
    """One image as RGB uint8 `(Hp, Wp, 3)`, EXIF orientation applied, from a path (or `file://` path),
    an http(s) URL, bytes, a binary file object, a PIL image, an array (HW, HWC or CHW) or a tensor."""
    name = describe(source)
    if isinstance(source, Image.Image):
        return pil_to_rgb(source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return array_to_rgb(source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source, name)
    if isinstance(source, (str, os.PathLike)):
        url = str(source).startswith(("http://", "https://"))
        return open_image(io.BytesIO(fetch_url(str(source), "image")) if url else local_path(source, "image"), name)
    if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
        return open_image(source if hasattr(source, "read") else io.BytesIO(bytes(source)), name)
    raise TypeError(f"unsupported image input of type {type(source).__name__}; expected a path, URL, bytes, "
                    "file object, PIL image, NumPy array or torch tensor")


def resize_frames(frames: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """Pillow resize of uint8 frames `(T, Hp, Wp, 3)` -> `(T, height, width, 3)`, before any float work."""
    if frames.shape[1:3] == (height, width):
        return frames
    size = (width, height)  # PIL sizes are (width, height)
    return np.stack([np.asarray(Image.fromarray(f).resize(size, resample=resample)) for f in frames])  # (T, Hp', Wp', 3)


def _too_elongated(index, h, w, new_h, new_w, factor, max_tokens, count) -> ValueError:
    return ValueError(
        f"visual item {index} of {w}x{h} pixels (WxH) has aspect ratio {max(h, w) / min(h, w):.0f}:1, too elongated "
        f"to tokenize within max_tokens={max_tokens} shared by {count} images/frames: even one {factor}-pixel "
        f"row/column needs {new_h * new_w // factor // factor} merged tokens. Crop it or raise max_tokens.")


def smart_sizes(shapes, merge_sizes, patch_size: int, min_tokens: int, max_tokens: int) -> list[tuple[int, int]]:
    """Resized `(Hp', Wp')` of each item `(T, Hp, Wp)` of one call sharing `max_tokens` merged tokens (the official rule).

    One merge size: each frame or image gets `max_tokens / (frames + images)`, rounded to whole merged
    patches, and at least `min_tokens`. Mixed merge sizes: one global scale, no minimum.
    """
    for index, (t, h, w) in enumerate(shapes):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"visual item {index} has an empty shape (T, Hp, Wp) = {(t, h, w)}")
    factors = [patch_size * m for m in merge_sizes]
    if len(set(merge_sizes)) > 1:
        total = sum(t * math.ceil(h / f) * math.ceil(w / f) for (t, h, w), f in zip(shapes, factors))
        beta = math.sqrt(total / max_tokens) if total > max_tokens else None
        sizes = [(max(math.floor(h / beta / f) * f, f), max(math.floor(w / beta / f) * f, f)) if beta
                 else (max(round(h / f) * f, f), max(round(w / f) * f, f)) for (_, h, w), f in zip(shapes, factors)]
        if beta and sum(num_merged_tokens(t, h, w, f) for (t, _, _), (h, w), f in zip(shapes, sizes, factors)) > max_tokens:
            worst = max(range(len(shapes)), key=lambda i: max(shapes[i][1:]) / min(shapes[i][1:]))
            raise _too_elongated(worst, *shapes[worst][1:], *sizes[worst], factors[worst], max_tokens, len(shapes))
        return sizes
    count, sizes = sum(t for t, _, _ in shapes), []  # frames and images share the budget
    for index, ((_, h, w), f) in enumerate(zip(shapes, factors)):
        budget, minimum = max_tokens * f * f // count, min_tokens * f * f
        new_h, new_w, scale = round(h / f) * f, round(w / f) * f, 1.0
        if new_h * new_w > budget:
            beta = math.sqrt(h * w / budget)
            new_h, new_w, scale = math.floor(h / beta / f) * f, math.floor(w / beta / f) * f, 1 / beta
        if new_h * new_w < minimum:
            beta = math.sqrt(minimum / (h * w))
            new_h, new_w, scale = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f, beta
        new_h, new_w = max(new_h, f), max(new_w, f)
        # Rounding up to whole patches may pass the share a little (the official rule); a short side far
        # under one patch row cannot be tokenized within the share at all.
        if new_h * new_w > max(budget, minimum) and min(h, w) * scale < f / 2:
            raise _too_elongated(index, h, w, new_h, new_w, f, max_tokens, count)
        sizes.append((new_h, new_w))
    return sizes


Videollama3ImageProcessorKwargs = TypedDict("Videollama3ImageProcessorKwargs", {  # official preprocessor_config keys
    "patch_size": int, "min_tokens": int, "max_tokens": int, "resample": int, "do_resize": bool, "do_rescale": bool,
    "rescale_factor": float, "do_normalize": bool, "image_mean": list, "image_std": list, "do_convert_rgb": bool,
}, total=False)


class PixelProcessing:
    """What images and video frames share: the token budget, resize, rescale, normalise and patchify."""

    def __init__(self, patch_size=14, min_tokens=16, max_tokens=16384, resample=BICUBIC, do_resize=True, do_rescale=True,
                 rescale_factor=1 / 255, do_normalize=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                 do_convert_rgb=True, **kwargs):
        super().__init__(**kwargs)
        for key, value, low in (("patch_size", patch_size, 1), ("min_tokens", min_tokens, 1),
                                ("max_tokens", max_tokens, min_tokens)):
            check_int(key, value, low)
        self.patch_size, self.min_tokens, self.max_tokens, self.resample = patch_size, min_tokens, max_tokens, int(resample)
        self.do_resize, self.do_rescale, self.rescale_factor = do_resize, do_rescale, rescale_factor
        self.do_normalize, self.image_mean, self.image_std = do_normalize, list(image_mean), list(image_std)
        self.do_convert_rgb = do_convert_rgb  # always converted: the encoder needs 3 channels

    def settings(self, **given) -> list:
        """Each given setting, or this processor's own where it is None (per-call overrides)."""
        return [getattr(self, key) if value is None else value for key, value in given.items()]

    def pixel_settings(self) -> dict:
        """The settings above, to build a processor that pixelises alike."""
        return {key: getattr(self, key) for key in Videollama3ImageProcessorKwargs.__annotations__}

    def target_sizes(self, shapes, merge_sizes, min_tokens=None, max_tokens=None) -> list[tuple[int, int]]:
        """Resized `(Hp', Wp')` of each item `(T, Hp, Wp)` of one call (see `smart_sizes`)."""
        min_tokens, max_tokens = self.settings(min_tokens=min_tokens, max_tokens=max_tokens)
        check_int("min_tokens", min_tokens, 1)
        check_int("max_tokens", max_tokens, 1)
        if self.do_resize:
            return smart_sizes(shapes, merge_sizes, self.patch_size, min_tokens, max_tokens)
        for index, ((_, h, w), m) in enumerate(zip(shapes, merge_sizes)):
            if h % (self.patch_size * m) or w % (self.patch_size * m):
                raise ValueError(f"do_resize=False but item {index} of size {h}x{w} (HxW) is not a multiple of "
                                 f"patch_size*merge_size={self.patch_size * m}")
        return [(h, w) for _, h, w in shapes]

    def num_tokens(self, shapes, merge_sizes, min_tokens=None, max_tokens=None) -> list[int]:
        """Merged tokens of each item `(T, Hp, Wp)` before pruning (no pixels needed)."""
        sizes, p = self.target_sizes(shapes, merge_sizes, min_tokens, max_tokens), self.patch_size
        return [num_merged_tokens(t, h // p, w // p, m) for (t, _, _), (h, w), m in zip(shapes, sizes, merge_sizes)]

    def to_patches(self, frames: np.ndarray, merge_size: int) -> torch.Tensor:
        """uint8 frames `(T, Hp, Wp, C)` -> normalised float32 patches `(T*H*W, C*p*p)` in merge-block order. The
        permutation runs on uint8 (a quarter of the bytes), then one in-place multiply-add per channel."""
        (t, h, w, c), p, m = frames.shape, self.patch_size, merge_size
        gh, gw = h // p, w // p
        blocks = frames.reshape(t, gh // m, m, p, gw // m, m, p, c)  # (T, H/m, m, p, W/m, m, p, C)
        blocks = blocks.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # (T, H/m, W/m, m, m, C, p, p)
        blocks = np.ascontiguousarray(blocks).reshape(t * gh * gw, c, p * p)  # (N, C, p*p)
        scale = torch.full((c,), self.rescale_factor if self.do_rescale else 1.0, dtype=torch.float64)
        shift = torch.zeros(c, dtype=torch.float64)
        if self.do_normalize:
            std = torch.tensor(self.image_std, dtype=torch.float64)
            scale, shift = scale / std, -torch.tensor(self.image_mean, dtype=torch.float64) / std
        patches = torch.from_numpy(blocks).to(torch.float32)  # (N, C, p*p)
        patches.mul_(scale.float().view(1, c, 1)).add_(shift.float().view(1, c, 1))
        return patches.view(t * gh * gw, c * p * p)  # (N, C*p*p)

    def encode(self, items, shapes, read, keep, merge_size, sizes, min_tokens, max_tokens, return_tensors) -> BatchFeature:
        """`pixel_values (N, C*p*p)`, `grid_sizes (k, 3)`, `merge_sizes (k,)`, `compression_mask (M,)` of `items` of
        `shapes` `(T, Hp, Wp)`: `read(item, h, w)` gives uint8 `(T, h, w, 3)`, `keep(patches, grid, m)` the mask;
        `sizes` (`(Hp', Wp')` each) when the caller shares the budget with other items."""
        merges = list(merge_size) if isinstance(merge_size, (list, tuple)) else [merge_size] * len(items)
        sizes = self.target_sizes(shapes, merges, min_tokens, max_tokens) if sizes is None else sizes
        if not len(items) == len(merges) == len(sizes):
            raise ValueError(f"got {len(items)} items, {len(merges)} merge sizes and {len(sizes)} sizes")
        patches, grids, masks = [], [], []
        for item, (t, _, _), (h, w), m in zip(items, shapes, sizes, merges):
            patches.append(self.to_patches(read(item, int(h), int(w)), m))  # (T*H*W, C*p*p)
            grids.append((t, h // self.patch_size, w // self.patch_size))
            masks.append(keep(patches[-1], grids[-1], m))  # (T*H/m*W/m,)
        data = {"pixel_values": concat(patches), "grid_sizes": torch.tensor(grids, dtype=torch.long),  # (N, C*p*p), (k, 3)
                "merge_sizes": torch.tensor(merges, dtype=torch.long), "compression_mask": concat(masks)}  # (k,), (M,)
        if return_tensors in (None, "np"):
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)


class Videollama3ImageProcessor(PixelProcessing, ImageProcessingMixin):
    r"""Any-resolution image processor of VideoLLaMA3; reads the official `preprocessor_config.json` unchanged.

    One call shares `max_tokens` merged tokens among its images. Output (`BatchFeature`): `pixel_values (N, C*p*p)`
    float32, `grid_sizes (k, 3)` `[1, H, W]`, `merge_sizes (k,)`, `compression_mask (M,)` (all True:
    images are never pruned).
    """

    _auto_class = "AutoImageProcessor"
    valid_kwargs = Videollama3ImageProcessorKwargs
    model_input_names = ["pixel_values", "grid_sizes", "merge_sizes", "compression_mask"]

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(self, images, merge_size=1, sizes=None, min_tokens=None, max_tokens=None, return_tensors="pt"):
        """Images (one or a list, any form `load_image` takes) -> model inputs; `merge_size` an int or one per image."""
        images = [load_image(item) for item in (images if isinstance(images, (list, tuple)) else [images])]
        if not images:
            raise ValueError("images is empty: pass at least one image")
        return self.encode(images, [(1, *image.shape[:2]) for image in images],
                           lambda image, h, w: resize_frames(image[None], h, w, self.resample),
                           lambda patches, grid, m: torch.ones(num_merged_tokens(*grid, m), dtype=torch.bool),
                           merge_size, sizes, min_tokens, max_tokens, return_tensors)


__all__ = ["Videollama3ImageProcessor", "MediaNotFoundError", "load_image", "num_merged_tokens", "pil_to_rgb"]
