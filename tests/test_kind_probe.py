"""`recipes.tiny.studies.kind_probe`: stills of the video world, the tokens a shape covers, and the linear read-out."""

import numpy as np
import pytest
import torch

from recipes.tiny import curriculum
from recipes.tiny.studies import kind_probe
from tools.local import REPO_ROOT


def test_covered_tokens_are_the_merged_blocks_holding_the_shape():
    canvas = np.full((curriculum.VIDEO_SIZE, curriculum.VIDEO_SIZE, 3), 128, dtype=np.uint8)
    pixels = curriculum.draw_shape(canvas, curriculum.Shape("green", "square"), 70.0, 72.0, 16.0)
    ys, xs = (pixels == curriculum.COLOURS["green"]).all(-1).nonzero()
    side = curriculum.VIDEO_SIZE // 28
    expected = sorted({(y // 28) * side + x // 28 for y, x in zip(ys, xs)})
    covered = kind_probe.covered_tokens(pixels, "green")
    assert covered.shape == (side * side,)
    assert covered.nonzero()[0].tolist() == expected == [10, 14]  # rows 58-85 reach into the last row of tokens


def test_stills_show_their_actor_at_its_centre_and_repeat_with_the_seed():
    first = kind_probe.draw_still(np.random.default_rng(3))
    again = kind_probe.draw_still(np.random.default_rng(3))
    assert np.array_equal(first[0], again[0]) and first[1:] == again[1:]
    rng = np.random.default_rng(4)
    for _ in range(20):
        pixels, shape, (x, y) = kind_probe.draw_still(rng)
        assert pixels.shape == (curriculum.VIDEO_SIZE, curriculum.VIDEO_SIZE, 3)
        assert (pixels[int(y), int(x)] == curriculum.COLOURS[shape.colour]).all()  # drawn last, over the distractor
        assert kind_probe.covered_tokens(pixels, shape.colour).any()


def test_linear_probe_reads_kinds_that_are_there_and_not_ones_that_are_not():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=generator)
    centres = 3 * torch.randn(3, 8, generator=generator)
    separable = centres[labels] + torch.randn(400, 8, generator=generator)  # (400, 8)
    assert kind_probe.linear_probe(separable, labels, 280, 3).float().mean() > 0.95
    unrelated = torch.randn(400, 8, generator=generator)
    assert kind_probe.linear_probe(unrelated, labels, 280, 3).float().mean() < 0.55


@pytest.mark.parametrize("train", [0, 400])
def test_linear_probe_needs_rows_to_fit_and_to_score(train):
    with pytest.raises(ValueError, match=f"train={train}: must leave rows both to fit and to score among 400"):
        kind_probe.linear_probe(torch.zeros(400, 2), torch.zeros(400, dtype=torch.long), train, 3)


def test_too_few_stills_is_an_error():
    with pytest.raises(ValueError, match="stills=9: at least 10"):
        kind_probe.probe(str(REPO_ROOT / "tiny_model"), stills=9)


def test_the_embedded_models_tokens_keep_kinds_above_chance():
    report = kind_probe.probe(str(REPO_ROOT / "tiny_model"), stills=300)
    assert set(report) == {"encoder", "projector"}
    for scores in report.values():
        assert scores["all"] > 0.5  # chance: 1 in 3
        assert len(scores) == 1 + kind_probe.BANDS
