"""`recipes.tiny.studies.demo_sweep` redraws the bundled demo clip with its shape elsewhere and grades the answers."""

import pytest

from tests.test_embedded_default import DEMO, model_and_processor  # noqa: F401
from recipes.tiny import curriculum
from recipes.tiny.studies import demo_sweep
from tools.local import REPO_ROOT


def test_default_frames_are_the_bundled_clip(tmp_path):
    curriculum.write_video(tmp_path / "clip.mp4", curriculum.demo_frames())
    assert (tmp_path / "clip.mp4").read_bytes() == (REPO_ROOT / "examples" / "media" / "shapes.mp4").read_bytes()


def test_moved_shape_is_drawn_at_its_centre():
    frames = curriculum.demo_frames("square", (40.0, 60.0))
    green = (frames[30] == curriculum.COLOURS["green"]).all(-1)  # (H, W) at 3.0 s, while it is shown
    ys, xs = green.nonzero()
    assert abs((xs.min() + xs.max() + 1) / 2 - 40) <= 1 and abs((ys.min() + ys.max() + 1) / 2 - 60) <= 1
    assert not (frames[10] == curriculum.COLOURS["green"]).all(-1).any()  # 1.0 s: not yet there


def test_sweep_at_the_bundled_centre_answers_as_the_demo(model_and_processor):  # noqa: F811
    x, y = (int(c) for c in curriculum.DEMO_CENTRE)
    results = demo_sweep.sweep(str(REPO_ROOT / "tiny_model"), "square", [x, y])
    assert set(results["appear"]) == {(x, x), (y, x), (x, y), (y, y)}
    model, processor = model_and_processor
    video = str(REPO_ROOT / "examples" / "media" / "shapes.mp4")
    bundled = next(entry for entry in DEMO.bundled_examples() if "video" in entry)
    asked = curriculum.video_questions(curriculum.demo_event())  # what the sweep asks
    assert [(k, q, a) for k, q, a in asked] == list(zip(bundled["kinds"], bundled["questions"], bundled["answers"]))
    for question, name, expected in zip(bundled["questions"], bundled["kinds"], bundled["answers"]):
        text, _, _ = DEMO.answer(model, processor, "video", video, question, 40)
        right, answer = results[name][(x, y)]
        assert answer == text
        assert right == DEMO.is_correct(name, text, expected)


@pytest.mark.parametrize("kind, centres, message", [
    ("hexagon", [50], "kind 'hexagon': not one of the curriculum's shapes"),
    ("square", [50, 10, 100], r"centres \[10, 100\]: outside 16-96 px"),
])
def test_sweep_refuses_bad_input(kind, centres, message):
    with pytest.raises(ValueError, match=message):
        demo_sweep.sweep("unused", kind, centres)
