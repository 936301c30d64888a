"""The benchmarks' code runs: every benchmark once at toy size. No timing is asserted."""

import math

import pytest
import torch

from bench import generate, gpu, memory, train, video, vision
from bench.common import Row


@pytest.fixture(autouse=True)
def one_thread():
    # Toy tensors are too small to split across threads; on a busy machine each parallel op can
    # wait a scheduler slice for its second thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check(rows):
    assert rows and all(isinstance(r, Row) for r in rows)
    for r in rows:
        assert all(math.isfinite(v) for v in r.ours.values + r.reference.values), r


def test_video_to_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "OUT_DIR", tmp_path)
    spec = video.ClipSpec(seconds=2, fps=5, height=56, width=84)
    path = video.make_clip(spec, tmp_path)
    assert video.decode_floor(path) == spec.frames
    ours, peer = video.ours_fn(max_tokens=256)(path), video.peer_fn(max_tokens=256)(path)
    assert ours[1] == peer[1]  # same grid
    video.check_same_inputs(ours, peer)


def test_vision_forward():
    check(vision.run(vision.TOY, repeats=1))


def test_vision_memory_in_process():
    rows = memory.run(memory.TOY, memory.TOY_FRAMES[:2], in_subprocess=False)
    assert len(rows) == 2 * 2 + 2


def test_generation():
    rows = generate.run(generate.TOY, repeats=1)
    check(rows)
    assert "identical tokens: True" in rows[0].note


def test_training_packed_vs_padded():
    pytest.importorskip("trl")
    check(train.run(train.TOY, repeats=1))  # raises if packed and padded losses differ


def test_gpu_script_dry_run():
    assert gpu.main(["--dry-run", "--repeats", "1", "--steps", "1"]) == 0
