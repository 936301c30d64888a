"""Video input with PyAV: real encoded files, sampling times, DiffFP counts and bad files."""

import io

import numpy as np
import pytest
import torch

from tests import media
from tests.tiny_processor import frame_token_counts, tiny_processor
from tools.local import remote_module

IP = remote_module("image_processing_videollama3")
VP = remote_module("video_processing_videollama3")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """4 s at 30 fps, 84x56: static for 2 s, then a square moves. One file per codec/container."""
    root = tmp_path_factory.mktemp("videos")
    return {kind: media.write_video(root / f"scene.{kind}", seconds=4, static_seconds=2) for kind in ("mp4", "webm", "avi")}


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(max_tokens=512)


@pytest.mark.parametrize("kind", ["mp4", "webm", "avi"])
def test_real_files_sample_one_frame_per_second(videos, processor, kind):
    clip = VP.load_video(videos[kind], fps=1, max_frames=180)
    assert clip.timestamps == [0.0, 1.0, 2.0, 3.0]
    assert clip.shape == (4, 56, 84) and clip.frames.shape == (4, 56, 84, 3)
    out = processor.video_processor([clip], merge_size=2, use_token_compression=True)
    t, gh, gw = out["grid_sizes"][0].tolist()
    assert t == 4
    per_frame = (gh // 2) * (gw // 2)
    counts = frame_token_counts(out["grid_sizes"], out["merge_sizes"], out["compression_mask"])[0]
    # frame 0 whole; 1 s is still static (lossless/intra codecs decode it identically): min_tokens;
    # at 2 s and 3 s the square has appeared / moved: some but not all tokens.
    assert counts[0] == per_frame and counts[1] == 1
    assert 1 < counts[2] < per_frame and 1 < counts[3] < per_frame


def test_decoded_pixels_match_the_encoded_scene(videos):
    clip = VP.load_video(videos["webm"])  # VP9 lossless: only the YUV 4:2:0 round trip differs
    expected = media.scene_frame(90, static_frames=60)  # 3.0 s
    error = np.abs(clip.frames[3].astype(int) - expected.astype(int)).mean()
    assert error < 6


@pytest.mark.parametrize("kind", ["bytes", "file", "pathlib"])
def test_bytes_and_file_objects_equal_the_path(videos, kind):
    from pathlib import Path

    path = videos["mp4"]
    source = {"bytes": open(path, "rb").read(), "file": io.BytesIO(open(path, "rb").read()), "pathlib": Path(path)}[kind]
    clip = VP.load_video(source)
    assert clip.timestamps == [0.0, 1.0, 2.0, 3.0]
    assert np.array_equal(clip.frames, VP.load_video(path).frames)


def full_decode(path, timestamps, height, width, interpolation, thread_type=None):
    """Reference: decode every frame (with PyAV's default threads, or `thread_type`), convert the
    ones at `timestamps`."""
    import av

    picked = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if thread_type:
            stream.thread_type = thread_type
        for frame in container.decode(stream):
            if round(frame.time, 6) in timestamps:
                picked.append(frame.to_ndarray(format="rgb24", width=width, height=height, interpolation=interpolation))
    return np.stack(picked)


def test_skipping_non_reference_frames_is_exact(tmp_path):
    # veryfast x264 uses B-frames, many of them non-reference: those are skipped unless picked.
    path = media.write_video(tmp_path / "bframes.mp4", seconds=6, fps=30, static_seconds=1, options={"preset": "veryfast", "crf": "30"})
    clip = VP.load_video(path, fps=4)
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        disposable = VP._nonreference_test(stream)
        skipped = [round(float(p.pts * stream.time_base), 6) for p in container.demux(stream) if p.size and disposable(p)]
    assert skipped, "the clip should contain non-reference B-frames"
    assert set(skipped) & set(clip.timestamps), "some picked frames should be non-reference ones"
    for height, width, interpolation in [(56, 84, "BICUBIC"), (28, 42, "AREA")]:
        assert np.array_equal(clip.frames_at(height, width), full_decode(path, clip.timestamps, height, width, interpolation))


@pytest.mark.parametrize("height, width", [(56, 84), (252, 336)])
def test_one_or_many_decoder_threads_give_the_same_frames(tmp_path, height, width):
    # Pictures under SINGLE_THREAD_PIXELS decode on one thread, larger ones threaded: one case each.
    assert (height * width < VP.SINGLE_THREAD_PIXELS) == (width == 84)
    path = media.write_video(tmp_path / "clip.mp4", seconds=2, fps=30, height=height, width=width, static_seconds=1,
                             options={"preset": "veryfast", "crf": "30"})
    clip = VP.load_video(path, fps=4)
    for thread_type in ("NONE", "FRAME"):
        reference = full_decode(path, clip.timestamps, height, width, "BICUBIC", thread_type)
        assert np.array_equal(clip.frames_at(height, width), reference)


def test_fps_four_keeps_fractional_timestamps(tmp_path):
    path = media.write_video(tmp_path / "f20.mp4", seconds=2, fps=20)
    clip = VP.load_video(path, fps=4)
    assert clip.timestamps == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def test_fps_override_at_thirty_fps_uses_true_times(videos):
    clip = VP.load_video(videos["mp4"], fps=4, max_frames=5)
    # 16 frames at 4 fps, spread to 5; each keeps the time of the frame on screen.
    assert clip.timestamps == [0.0, 0.733333, 1.733333, 2.733333, 3.733333]


def test_ten_minute_clip_spreads_max_frames_over_the_whole_video(tmp_path):
    path = media.write_video(tmp_path / "long.avi", seconds=600, fps=5, height=16, width=16, static_seconds=0)
    clip = VP.load_video(path, fps=1, max_frames=180)
    stamps = clip.timestamps
    assert len(stamps) == 180 and stamps[0] == 0.0 and stamps[-1] == 599.0
    gaps = np.diff(stamps)
    assert gaps.min() >= 3.0 and gaps.max() <= 4.0  # evenly spread, true integer-second times


def test_short_clip_gives_one_frame(tmp_path, processor):
    path = media.write_video(tmp_path / "short.mp4", seconds=0.4)
    clip = VP.load_video(path)
    assert clip.timestamps == [0.0]
    conversation = [{"role": "user", "content": [{"type": "video", "video": path}, {"type": "text", "text": "?"}]}]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["grid_sizes"][0, 0].item() == 1 and bool(out["compression_mask"].all())


def test_start_and_end_time(tmp_path):
    path = media.write_video(tmp_path / "six.mp4", seconds=6)
    assert VP.load_video(path, start_time=1.5, end_time=4.2).timestamps == [1.5, 2.5, 3.5]
    assert VP.load_video(path, start_time=4).timestamps == [4.0, 5.0]
    assert VP.load_video(path, end_time=2).timestamps == [0.0, 1.0, 2.0]


def test_variable_frame_rate(tmp_path):
    path = media.write_video(tmp_path / "vfr.mkv", frame_times=[0, 0.5, 0.9, 1.7, 3.05, 3.1])
    # The frame on screen at t = 0, 1, 2, 3 s: 0.0, 0.9, 1.7 (still shown at 2 and 3 s).
    assert VP.load_video(path).timestamps == [0.0, 0.9, 1.7]


def test_rotation_metadata_is_applied(tmp_path):
    def marked(i):
        frame = np.zeros((48, 96, 3), np.uint8)
        frame[:16, :16] = 255  # top-left marker
        return frame

    path = media.write_video(tmp_path / "rot.mp4", seconds=1, frame_fn=marked, height=48, width=96, rotation=90)
    frames = VP.load_video(path).frames
    assert frames.shape == (1, 96, 48, 3)
    # A 90-degree counter-clockwise display rotation moves the top-left corner to the bottom-left.
    assert frames[0, -8:, :8].mean() > 200 and frames[0, :8, :8].mean() < 50


def test_in_memory_frames_take_given_or_default_times():
    frames = np.zeros((5, 28, 28, 3), np.uint8)
    assert VP.load_video(frames).timestamps == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert VP.load_video(frames, fps=2).timestamps == [0.0, 0.5, 1.0, 1.5, 2.0]
    clip = VP.load_video(list(frames), timestamps=[0, 2, 4, 6, 8], max_frames=3)
    assert clip.timestamps == [0.0, 4.0, 8.0]
    assert VP.load_video(torch.zeros(3, 3, 28, 28, dtype=torch.uint8)).shape == (3, 28, 28)


def test_frames_of_different_sizes_name_the_problem(processor):
    frames = [np.zeros((28, 28, 3), np.uint8), np.zeros((56, 28, 3), np.uint8)]
    for videos in (frames, [frames]):  # one video as its frames, or a list of such videos
        with pytest.raises(ValueError, match="frames differ in size"):
            processor.video_processor(videos)


def test_two_videos_of_different_lengths_in_one_conversation(tmp_path, processor):
    short = media.write_video(tmp_path / "three.mp4", seconds=3)
    long = media.write_video(tmp_path / "five.webm", seconds=5)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": short},
                {"type": "video", "video": long},
                {"type": "text", "text": "Compare."},
            ],
        }
    ]
    prompt = processor.apply_chat_template(conversation)
    assert "Time 0.0s:<image>,Time 1.0s:<image>,Time 2.0s:<image>\nTime 0.0s:<image>" in prompt
    assert "Time 4.0s:<image>\nCompare." in prompt
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["grid_sizes"][:, 0].tolist() == [3, 5]
    counts = frame_token_counts(out["grid_sizes"], out["merge_sizes"], out["compression_mask"])
    assert [len(c) for c in counts] == [3, 5]
    assert (out["input_ids"] == processor.image_token_id).sum().item() == sum(map(sum, counts))


def test_token_counts_before_decoding(videos, processor):
    clip = VP.load_video(videos["mp4"])  # demuxed, one frame decoded for its size
    conversation = [{"role": "user", "content": [{"type": "video", "video": videos["mp4"]}]}]
    pruned = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    unpruned = processor._get_num_multimodal_tokens(video_sizes=[clip.shape])["num_video_tokens"][0]
    assert int(pruned["compression_mask"].sum()) < unpruned == pruned["compression_mask"].numel()
    assert processor._get_num_multimodal_tokens(video_sizes=[(2, *clip.shape[1:])])["num_video_tokens"][0] < unpruned


# ---- bad video input: each a clear ValueError naming the input and the problem ------------------


def test_missing_video_file(tmp_path):
    path = str(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="not found") as error:
        VP.load_video(path)
    assert path in str(error.value)


def test_corrupt_video_file(tmp_path):
    path = media.write_garbage(tmp_path / "garbage.mp4")
    with pytest.raises(ValueError, match="could not be opened") as error:
        VP.load_video(path)
    assert "garbage.mp4" in str(error.value)


def test_truncated_video_file(videos, tmp_path):
    path = media.truncate(videos["mp4"], tmp_path / "truncated.mp4", keep_fraction=0.5)
    with pytest.raises(ValueError, match="corrupt|truncated") as error:
        VP.load_video(path).frames
    assert "truncated.mp4" in str(error.value)


def test_zero_frame_video(tmp_path):
    path = media.write_zero_frame_video(tmp_path / "empty.mp4")
    with pytest.raises(ValueError, match="zero-frame") as error:
        VP.load_video(path)
    assert "empty.mp4" in str(error.value)


def test_audio_only_file(tmp_path):
    path = media.write_audio_only(tmp_path / "sound.m4a")
    with pytest.raises(ValueError, match="no video stream") as error:
        VP.load_video(path)
    assert "sound.m4a" in str(error.value)


@pytest.mark.parametrize("fps", [0, -1, float("nan")])
def test_fps_must_be_positive(videos, fps):
    with pytest.raises(ValueError, match="fps must be a number > 0"):
        VP.load_video(videos["mp4"], fps=fps)


@pytest.mark.parametrize("max_frames", [0, -3])
def test_max_frames_must_be_positive(videos, max_frames):
    with pytest.raises(ValueError, match="max_frames must be an integer > 0"):
        VP.load_video(videos["mp4"], max_frames=max_frames)


def test_start_time_must_precede_end_time(videos):
    with pytest.raises(ValueError, match=r"start_time \(3\) must be smaller than end_time \(2\)"):
        VP.load_video(videos["mp4"], start_time=3, end_time=2)
    with pytest.raises(ValueError, match="past the last frame"):
        VP.load_video(videos["mp4"], start_time=30)


def test_bad_video_in_a_conversation_names_the_message(tmp_path, processor):
    conversation = [{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "none.mp4")}]}]
    with pytest.raises(ValueError, match="^message 0 content 0: .*not found"):
        processor.apply_chat_template(conversation, tokenize=True)
    with pytest.raises(ValueError, match="fps must be a number > 0"):
        processor.apply_chat_template(conversation, tokenize=True, fps=0)
