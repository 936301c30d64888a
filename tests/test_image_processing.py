"""Image processor: any-resolution resize, patch order, pixel parity with transformers' native port,
DiffFP, media loading and bad images."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests import media
from tests.official_files import OFFICIAL_PREPROCESSOR_CONFIG
from tests.tiny_processor import frame_token_counts
from tools.local import remote_module

IP = remote_module("image_processing_videollama3")
VP = remote_module("video_processing_videollama3")


@pytest.fixture(scope="module")
def processor():
    return IP.Videollama3ImageProcessor()


# ---- worked values of the official smart resize ---------------------------------------------------


def test_1080p_image_worked_values(processor):
    image = media.photo(1080, 1920)
    out = processor(image)
    assert processor.target_sizes([(1, 1080, 1920)], [1]) == [(1078, 1918)]
    assert out["grid_sizes"].tolist() == [[1, 77, 137]]
    assert out["pixel_values"].shape == (10549, 3 * 14 * 14)
    assert out["pixel_values"].dtype == torch.float32
    assert out["merge_sizes"].tolist() == [1]
    assert out["compression_mask"].shape == (10549,) and bool(out["compression_mask"].all())


@pytest.mark.parametrize("height, width", [(720, 1280), (1080, 1920)])
def test_180_frames_share_the_budget(processor, height, width):
    assert processor.target_sizes([(180, height, width)], [2]) == [(196, 336)]
    assert processor.num_tokens([(180, height, width)], [2]) == [180 * 84]


def test_small_video_upscaled_alone_but_not_next_to_an_image(processor):
    shapes = [(1, 98, 98), (6, 112, 84)]  # an image and an 84x112 (WxH) video
    assert processor.target_sizes(shapes[1:], [2]) == [(140, 112)]  # grid (6, 10, 8)
    assert processor.target_sizes(shapes, [1, 2]) == [(98, 98), (112, 84)]  # grids (1, 7, 7), (6, 8, 6)
    video = VP.Videollama3VideoProcessor(**processor.pixel_settings())(np.zeros((6, 112, 84, 3), dtype=np.uint8))
    assert video["grid_sizes"].tolist() == [[6, 10, 8]] and video["pixel_values"].shape[0] == 6 * 10 * 8


def test_mixed_merge_sizes_over_budget_scale_all_items():
    processor = IP.Videollama3ImageProcessor(max_tokens=100)
    shapes, merges = [(1, 280, 280), (4, 280, 280)], [1, 2]
    sizes = processor.target_sizes(shapes, merges)
    tokens = processor.num_tokens(shapes, merges)
    assert sum(tokens) <= 100
    assert all(h % (14 * m) == 0 and w % (14 * m) == 0 for (h, w), m in zip(sizes, merges))


def test_budget_is_shared_by_images_and_frames(processor):
    one = processor.num_tokens([(1, 1080, 1920)], [1])[0]
    two = processor.num_tokens([(1, 1080, 1920), (1, 1080, 1920)], [1, 1])
    assert one == 10549 and sum(two) <= 16384 and two[0] == two[1] < one


# ---- parity with transformers' native PIL image processor (no torchvision needed) --------------


@pytest.mark.parametrize("height, width, merge", [(64, 96, 1), (30, 20, 1), (333, 517, 1), (200, 150, 2), (512, 512, 1)])
def test_pixels_equal_native_pil_processor(height, width, merge):
    from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import VideoLlama3ImageProcessorPil

    min_tokens, max_tokens = 16, 256
    factor = 14 * merge
    ours = IP.Videollama3ImageProcessor(min_tokens=min_tokens, max_tokens=max_tokens)
    # The native size dict counts pixels: shortest_edge = min pixels, longest_edge = max pixels.
    native = VideoLlama3ImageProcessorPil(
        size={"shortest_edge": min_tokens * factor**2, "longest_edge": max_tokens * factor**2}, merge_size=merge
    )
    image = media.photo(height, width)
    mine = ours(image, merge_size=merge)
    theirs = native(image, return_tensors="pt")
    assert mine["grid_sizes"].tolist() == theirs["image_grid_thw"].tolist()
    assert mine["pixel_values"].shape == theirs["pixel_values"].shape
    torch.testing.assert_close(mine["pixel_values"], theirs["pixel_values"], atol=1e-6, rtol=0)


# ---- patch order ---------------------------------------------------------------------------------


def test_patchify_uses_merge_block_order():
    processor = IP.Videollama3ImageProcessor(do_rescale=False, do_normalize=False)
    t, gh, gw, m, p = 2, 4, 6, 2, 14
    # Every pixel holds its patch row, patch column and frame, so each flat row can be located.
    rows = np.repeat(np.arange(gh), p)[:, None].repeat(gw * p, 1)
    cols = np.repeat(np.arange(gw), p)[None, :].repeat(gh * p, 0)
    frames = np.stack([np.stack([rows, cols, np.full_like(rows, f)], -1) for f in range(t)]).astype(np.uint8)
    patches = processor.to_patches(frames, m).view(t * gh * gw, 3, p * p)
    assert bool((patches == patches[:, :, :1]).all())  # each row is one whole patch
    located = patches[:, :, 0].long().tolist()
    expected = [
        [r, c, f]
        for f in range(t)
        for br in range(gh // m)
        for bc in range(gw // m)
        for r in range(br * m, br * m + m)
        for c in range(bc * m, bc * m + m)
    ]
    assert located == expected


# ---- DiffFP ----------------------------------------------------------------------------------------


def reference_compression_mask(pixel_values, grids, merges, threshold=0.1, min_tokens=1):
    """Independent, loop-by-loop restatement of the native `_get_compression_mask` rule.

    transformers' native `video_processing_video_llama_3` imports torchvision at module level, so
    it cannot be imported here; this spells out its rule (DiffFP, paper section 3.3) token by token instead.
    """
    mask, offset = [], 0
    values = pixel_values.double().numpy()
    for (t, gh, gw), m in zip(grids, merges):
        per_frame = (gh // m) * (gw // m)
        item = values[offset : offset + t * gh * gw].reshape(t, per_frame, -1)
        offset += t * gh * gw
        for frame in range(t):
            keep = []
            for token in range(per_frame):
                if t == 1 or frame == 0:
                    keep.append(True)
                else:
                    change = np.abs(item[frame, token] - item[frame - 1, token]).mean() * 255
                    keep.append(bool(change > threshold))
            if sum(keep) < min_tokens:
                for token in range(min(min_tokens, per_frame)):
                    keep[token] = True
            mask.extend(keep)
    return mask


def crafted_frames():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    frames = np.stack([base] * 5)  # (5, 56, 84, 3)
    frames[2, 0:28, 28:56] ^= 0xFF  # one 28x28 block (= one merged token) changes in frame 2
    frames[3] = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)  # everything changes
    frames[4] = frames[3]
    frames[4, 28:56, 56:84] = frames[3, 28:56, 56:84] // 2 + 1  # the last block changes
    return frames


def test_difffp_on_crafted_frames():
    processor = VP.Videollama3VideoProcessor(min_tokens=1)
    out = processor([crafted_frames()], merge_size=2, use_token_compression=True)
    assert out["grid_sizes"].tolist() == [[5, 4, 6]]
    counts = frame_token_counts(out["grid_sizes"], out["merge_sizes"], out["compression_mask"])
    assert counts == [[6, 1, 1, 6, 1]]
    mask = out["compression_mask"].view(5, 6)
    assert bool(mask[0].all())  # frame 0 whole
    assert mask[1].tolist() == [True, False, False, False, False, False]  # static: first token only
    assert mask[2].tolist() == [False, True, False, False, False, False]  # the changed block
    assert mask[4].tolist() == [False, False, False, False, False, True]


@pytest.mark.parametrize("threshold, min_tokens", [(0.1, 1), (0.1, 2), (5.0, 3), (0.0, 1)])
def test_difffp_matches_native_rule(threshold, min_tokens):
    processor = VP.Videollama3VideoProcessor(min_tokens=1)
    rng = np.random.default_rng(1)
    frames = crafted_frames()
    frames[1, :10, :10] = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)  # a small change, part of one token
    items = [frames, frames[:1]]
    out = processor(
        items,
        merge_size=2,
        use_token_compression=True,
        compression_threshold=threshold,
        compression_min_tokens=min_tokens,
    )
    expected = reference_compression_mask(
        out["pixel_values"], out["grid_sizes"].tolist(), out["merge_sizes"].tolist(), threshold, min_tokens
    )
    assert out["compression_mask"].tolist() == expected


def test_images_and_single_frames_never_pruned():
    image = IP.Videollama3ImageProcessor(min_tokens=1)([media.photo(56, 56)])
    frame = VP.Videollama3VideoProcessor(min_tokens=1)(np.zeros((1, 56, 56, 3), np.uint8), use_token_compression=True)
    assert bool(image["compression_mask"].all()) and bool(frame["compression_mask"].all())


# ---- images: loading, modes, EXIF ----------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    image = media.photo(40, 80)  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert IP.load_image(str(path)).shape == (80, 40, 3)
    assert IP.load_image(Image.open(path)).shape == (80, 40, 3)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "LA", "PA", "CMYK", "YCbCr", "I;16", "I", "F", "HSV", "LAB", "RGBX", "La"])
def test_every_pil_mode_becomes_rgb(mode):
    image = media.photo(20, 30).convert("RGBA").convert(mode) if mode not in ("I;16", "I", "F", "La", "PA") else None
    if image is None:
        if mode in ("I;16", "I"):
            image = Image.fromarray(np.full((20, 30), 65535 if mode == "I;16" else 40000, np.uint16 if mode == "I;16" else np.int32))
            assert image.mode == mode
        elif mode == "F":
            image = Image.fromarray(np.full((20, 30), 300.0, np.float32))
        else:
            image = Image.new(mode, (30, 20))
    array = IP.load_image(image)
    assert array.shape == (20, 30, 3) and array.dtype == np.uint8
    if mode == "I;16":
        assert array.max() == 255  # scaled from 16 bits, not clipped at 255 of 65535


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert IP.load_image(image).tolist()[0][0] == [255, 255, 255]


@pytest.mark.parametrize("kind", ["path", "bytes", "file", "array_hwc", "array_chw", "tensor", "float"])
def test_image_sources(tmp_path, kind):
    image = media.photo(28, 42)
    path = tmp_path / "a.png"
    image.save(path)
    array = np.asarray(image)
    source = {
        "path": str(path),
        "bytes": path.read_bytes(),
        "file": io.BytesIO(path.read_bytes()),
        "array_hwc": array,
        "array_chw": array.transpose(2, 0, 1),
        "tensor": torch.from_numpy(array.copy()),
        "float": array / 255.0,
    }[kind]
    assert np.array_equal(IP.load_image(source), array)


def test_image_smaller_than_a_patch_is_resized_up():
    processor = IP.Videollama3ImageProcessor(min_tokens=16)
    out = processor(Image.new("RGB", (5, 3), (200, 10, 10)))
    t, gh, gw = out["grid_sizes"][0].tolist()
    assert t == 1 and gh * gw >= 16 and out["pixel_values"].shape == (gh * gw, 588)


def test_extreme_aspect_is_resized_when_it_fits(processor):
    # 1x5000: the minimum-token rule stretches the single row to one 14-pixel patch row.
    out = processor(Image.new("RGB", (5000, 1), (1, 2, 3)))
    assert out["grid_sizes"].tolist() == [[1, 1, 283]]


def test_extreme_aspect_that_cannot_fit_names_the_aspect():
    processor = IP.Videollama3ImageProcessor(min_tokens=4, max_tokens=64)
    with pytest.raises(ValueError, match=r"aspect ratio 5000:1"):
        processor(Image.new("RGB", (5000, 1)))


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="decompression-bomb") as error:
        IP.load_image(str(path))
    assert str(path) in str(error.value)
    # One limit quoted, the one in force (Pillow's own message names twice it for errors).
    assert "MAX_IMAGE_PIXELS = 1000)" in str(error.value) and "2000" not in str(error.value)


@pytest.fixture
def http_server():
    """A loopback HTTP server: /ok.png answers a PNG, anything else 404."""
    import http.server
    import threading

    png = io.BytesIO()
    media.photo(28, 42).save(png, format="PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, status = (png.getvalue(), 200) if self.path == "/ok.png" else (b"missing", 404)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_image_urls_load_or_name_the_url_and_the_failure(http_server):
    assert IP.load_image(f"{http_server}/ok.png").shape == (28, 42, 3)
    with pytest.raises(ValueError, match=rf"image URL {http_server}/gone.png answered HTTP 404"):
        IP.load_image(f"{http_server}/gone.png")
    closed = http_server.rsplit(":", 1)[0] + ":9"  # the discard port: nothing listens on loopback
    with pytest.raises(ValueError, match=rf"image URL {closed}/a.png could not be fetched: .*refused"):
        IP.load_image(f"{closed}/a.png")


def test_missing_image_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ValueError, match="not found") as error:
        IP.load_image(str(path))
    assert str(path) in str(error.value) and isinstance(error.value, FileNotFoundError)


def test_corrupt_image_file(tmp_path):
    path = media.write_garbage(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="not a readable image"):
        IP.load_image(path)


def test_unsupported_image_type():
    with pytest.raises(TypeError, match="unsupported image input of type dict"):
        IP.load_image({"x": 1})


def test_bad_array_shape_names_the_shape():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5, 6\)"):
        IP.load_image(np.zeros((2, 3, 4, 5, 6), np.uint8))


# ---- config ---------------------------------------------------------------------------------------


def test_loads_official_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(OFFICIAL_PREPROCESSOR_CONFIG))
    processor = IP.Videollama3ImageProcessor.from_pretrained(str(tmp_path))
    assert (processor.min_tokens, processor.max_tokens, processor.patch_size, processor.resample) == (16, 16384, 14, 3)
    assert processor.image_mean == [0.5] * 3 and processor.image_std == [0.5] * 3


def test_save_load_round_trip(tmp_path):
    processor = IP.Videollama3ImageProcessor(min_tokens=8, max_tokens=300)
    processor.save_pretrained(str(tmp_path))
    again = IP.Videollama3ImageProcessor.from_pretrained(str(tmp_path))
    assert (again.min_tokens, again.max_tokens) == (8, 300)
    image = media.photo(50, 70)
    torch.testing.assert_close(processor(image)["pixel_values"], again(image)["pixel_values"])


def test_bad_config_values():
    with pytest.raises(ValueError, match="max_tokens"):
        IP.Videollama3ImageProcessor(min_tokens=16, max_tokens=4)
    with pytest.raises(ValueError, match="min_tokens"):
        IP.Videollama3ImageProcessor(min_tokens=0)
