"""The synthetic curriculum is deterministic, in the official data format, and its media decode."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from recipes.tiny import curriculum
from tools.local import remote_module
from tools.spans import parse_span

VP = remote_module("video_processing_videollama3")
SIZES = dict(images=6, videos=4, texts=5)


def digest(folder):
    """Hash of every file's relative path and bytes under `folder`."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    first = tmp_path_factory.mktemp("a")
    curriculum.generate(first, seed=3, **SIZES)
    return first


def test_same_seed_gives_identical_bytes(written, tmp_path):
    curriculum.generate(tmp_path, seed=3, **SIZES)
    assert digest(tmp_path) == digest(written)


def test_media_written_by_worker_processes_are_the_same_bytes(tmp_path):
    every = dict(SIZES, video_frames=True, appear_videos=3, more_videos=2, wide_images=2)
    curriculum.generate(tmp_path / "one", seed=3, **every)
    curriculum.generate(tmp_path / "two", seed=3, workers=2, **every)
    assert len(list((tmp_path / "two" / "videos").iterdir())) == 4 + 3 + 2 + 4  # clips and the stills
    assert digest(tmp_path / "two") == digest(tmp_path / "one")


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="workers=0: at least one process"):
        curriculum.generate(tmp_path, workers=0, **SIZES)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_media_write_names_its_file(tmp_path, workers):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "00001.mp4").mkdir()  # a folder where the second clip should go
    with pytest.raises(RuntimeError, match=r"could not write .*videos/00001\.mp4: IsADirectoryError"):
        curriculum.generate(tmp_path, seed=3, workers=workers, **SIZES)


def test_other_seed_differs(written, tmp_path):
    curriculum.generate(tmp_path, seed=4, **SIZES)
    assert digest(tmp_path) != digest(written)


def test_official_format_and_media(written):
    rows = {name: [json.loads(line) for line in open(written / f"{name}.jsonl")] for name in ("image", "video", "text")}
    assert [len(rows[n]) for n in ("image", "video", "text")] == [6, 4, 5]
    for name, tag in (("image", "<image>\n"), ("video", "<video>\n")):
        for row in rows[name]:
            assert (written / row[name][0]).is_file()
            conv = row["conversations"]
            assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith(tag)
            assert sum(m["value"].count("<") for m in conv) == 1  # one media tag, first turn only
    for row in rows["text"]:
        assert set(row) == {"conversations"}


def test_videos_decode_at_one_fps_and_spans_parse(written):
    rows = [json.loads(line) for line in open(written / "eval.jsonl")]
    videos = [r for r in rows if r["modality"] == "video"]
    assert videos
    for row in videos:
        clip = VP.load_video(str(written / row["video"][0]), fps=1, max_frames=180)
        assert clip.frames.shape[1:] == (curriculum.VIDEO_SIZE, curriculum.VIDEO_SIZE, 3)
        assert clip.timestamps == [float(t) for t in range(len(clip.timestamps))]
        if row["kind"] == "when":
            start, end = parse_span(row["conversations"][1]["value"])
            assert 0 <= start < end <= len(clip.timestamps)


def test_static_background_is_pruned(written):
    processor = VP.Videollama3VideoProcessor()
    kept = total = 0
    for path in sorted((written / "videos").glob("*.mp4")):
        clip = VP.load_video(str(path), fps=1, max_frames=180)
        mask = processor([clip], merge_size=2, use_token_compression=True)["compression_mask"]
        kept, total = kept + int(mask.sum()), total + mask.numel()
    assert 1 - kept / total >= 0.5


@pytest.mark.parametrize("answers", curriculum.ANSWER_STYLES)
def test_image_answers_match_the_drawn_objects(tmp_path, answers):
    curriculum.generate(tmp_path, seed=3, images=12, videos=0, texts=0, answers=answers)
    objects = {json.loads(line)["image"]: json.loads(line)["objects"] for line in open(tmp_path / "vision.jsonl")}
    images = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    restated = answers == "restated"
    assert {r["kind"] for r in images} == {"colour", "shape", "position", "count", "caption"} | ({"colours"} if restated else set())
    for row in images:
        scene = objects[row["image"][0]]
        question, answer = (m["value"] for m in row["conversations"])
        question = question.removeprefix("<image>\n")
        ordered = sorted(scene, key=lambda o: curriculum.QUADRANTS.index(o["quadrant"]))
        if row["kind"] == "count":
            assert answer == str(len(scene))
        elif row["kind"] == "caption":
            glue = " " if restated else " at the "
            names = [f"a {o['colour']} {o['shape']}{glue}{o['quadrant']}" for o in ordered]
            opening = ", ".join(names) + ", on a " if restated else curriculum.join_names(names) + " on a "
            assert answer.lower().startswith(opening)
        elif row["kind"] == "colours":
            assert answer == ", ".join(f"{o['shape']} {o['colour']}" for o in ordered) + "."
        else:
            # Exactly one drawn object is the one the question names (or the only one).
            named = [o for o in scene if f" {o['shape']}?" in question or f" {o['colour']} " in question] or scene
            assert len(named) == 1, (question, scene)
            o = named[0]
            subject = "shape" if question.endswith("the shape?") else o["shape"]
            expected = {
                "colour": (f"The {subject} is {o['colour']}.", o["colour"]),
                "shape": (f"It is a {o['colour']} {o['shape']}.", o["shape"]),
                "position": (f"The {o['colour']} {o['shape']} is {o['quadrant']}.", o["quadrant"]),
            }[row["kind"]]
            assert answer == expected[0 if restated else 1], question


def test_unknown_answer_style_is_refused(tmp_path):
    with pytest.raises(ValueError, match="answers='long'"):
        curriculum.generate(tmp_path, images=1, videos=0, texts=0, answers="long")


def shape_centres_x(path, objects):
    """The x centre (bounding box) of each object's pixels in one written image."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    centres = []
    for o in objects:
        xs = np.nonzero((pixels == curriculum.COLOURS[o["colour"]]).all(-1).any(0))[0]
        centres.append((xs.min() + xs.max() + 1) / 2)
    return centres


def test_wide_images_are_vision_rows_at_every_patch_phase(written, tmp_path):
    curriculum.generate(tmp_path, seed=3, wide_images=8, **SIZES)
    for name in ("image", "caption", "video", "text", "eval"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (written / f"{name}.jsonl").read_bytes()
    base = [json.loads(line) for line in open(written / "vision.jsonl")]
    rows = [json.loads(line) for line in open(tmp_path / "vision.jsonl")]
    assert rows[: len(base)] == base and len(rows) == len(base) + 8
    patch = 14
    phases = {"image": [], "wide": []}
    for kind, group in (("image", base), ("wide", rows[len(base):])):
        for row in group:
            size = Image.open(tmp_path / row["image"]).size
            assert size == ((curriculum.IMAGE_SIZE,) * 2 if kind == "image" else (curriculum.VIDEO_SIZE,) * 2)
            for o, x in zip(row["objects"], shape_centres_x(tmp_path / row["image"], row["objects"])):
                assert o["quadrant"].endswith("left") == (x < size[0] / 2)
                phases[kind].append(x % patch)
    # 84 px images: every shape centred within 4.5 px of a patch's middle; wide ones anywhere in it.
    assert all(abs(p - patch / 2) <= 4.5 for p in phases["image"])
    assert max(phases["wide"]) - min(phases["wide"]) > patch / 2


def test_more_videos_are_training_rows_of_their_own_file(written, tmp_path):
    paths = curriculum.generate(tmp_path, seed=3, more_videos=3, **SIZES)
    for name in ("image", "caption", "vision", "video", "text", "eval"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (written / f"{name}.jsonl").read_bytes()
    # So the recipe's tokenizer, trained on image, caption, video and text rows, is the same too.
    rows = [json.loads(line) for line in open(paths["video_more"])]
    assert len(rows) == 3
    base = {json.loads(line)["video"][0] for line in open(written / "video.jsonl")}
    for row in rows:
        (rel,) = row["video"]
        assert rel not in base and (tmp_path / rel).is_file()
        clip = VP.load_video(str(tmp_path / rel))
        assert clip.frames.shape[1:] == (curriculum.VIDEO_SIZE, curriculum.VIDEO_SIZE, 3)
        asked = [m["value"] for m in row["conversations"][0::2]]
        assert asked[0].startswith("<video>\n") and len(asked) == 2


def test_video_frames_are_stills_of_each_clip_with_their_shapes(written, tmp_path):
    paths = curriculum.generate(tmp_path, seed=3, video_frames=True, **SIZES)
    for name in ("image", "caption", "vision", "video", "text", "eval"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (written / f"{name}.jsonl").read_bytes()
    assert digest(tmp_path / "images") == digest(written / "images")
    videos = [json.loads(line)["video"][0] for line in open(written / "video.jsonl")]
    rows = [json.loads(line) for line in open(paths["frames"])]
    assert [row["image"] for row in rows] == [rel.replace(".mp4", ".png") for rel in videos]
    for row in rows:
        pixels = np.asarray(Image.open(tmp_path / row["image"]).convert("RGB"))
        assert pixels.shape == (curriculum.VIDEO_SIZE, curriculum.VIDEO_SIZE, 3)
        assert row["background"] in curriculum.BACKGROUNDS and 1 <= len(row["objects"]) <= 2
        for o in row["objects"]:
            ys, xs = np.nonzero((pixels == curriculum.COLOURS[o["colour"]]).all(-1))
            assert len(ys) > 100  # the actor is shown in its still, the distractor always
            half = curriculum.VIDEO_SIZE / 2
            centre = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
            assert o["quadrant"] == curriculum.QUADRANTS[2 * (centre[1] >= half) + (centre[0] >= half)]


def test_appear_videos_are_appearances_in_their_own_file_from_their_own_generator(written, tmp_path):
    paths = curriculum.generate(tmp_path / "a", seed=3, appear_videos=4, **SIZES)
    for name in ("image", "caption", "vision", "video", "text", "eval"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (written / f"{name}.jsonl").read_bytes()
    rows = [json.loads(line) for line in open(paths["video_appear"])]
    assert len(rows) == 4
    for row in rows:
        (rel,) = row["video"]
        assert rel.startswith("videos/appear")
        turns = dict(zip((m["value"].removeprefix("<video>\n") for m in row["conversations"][0::2]),
                         (m["value"] for m in row["conversations"][1::2])))
        when = f"When does the {turns['What appears in the video?'].removeprefix('a ')} appear?"
        assert set(turns) == {"What appears in the video?", when}
        clip = VP.load_video(str(tmp_path / "a" / rel), fps=1, max_frames=180)
        start, end = parse_span(turns[when])
        assert 0 <= start < end <= len(clip.timestamps)
    # Their own generator: the same clips whatever else is drawn before them.
    other = curriculum.generate(tmp_path / "b", seed=3, appear_videos=4, more_videos=2, images=1, videos=1, texts=0)
    assert other["video_appear"].read_bytes() == paths["video_appear"].read_bytes()
    for row in rows:
        assert (tmp_path / "b" / row["video"][0]).read_bytes() == (tmp_path / "a" / row["video"][0]).read_bytes()


def test_video_events_of_a_kind_follow_that_kinds_draws():
    rng = np.random.default_rng(0)
    events = [curriculum.video_event(rng, 8, "move") for _ in range(20)]
    assert {e["kind"] for e in events} == {"move"} and len({e["direction"] for e in events}) > 1
    # The first event of that kind among unrestricted draws from the same generator state.
    for kind in curriculum.EVENT_KINDS:
        drawn, unrestricted = np.random.default_rng(11), np.random.default_rng(11)
        first = next(e for e in iter(lambda: curriculum.video_event(unrestricted, 7), None) if e["kind"] == kind)
        assert curriculum.video_event(drawn, 7, kind) == first
    mixed = [curriculum.video_event(np.random.default_rng(s), 8) for s in range(40)]
    assert {e["kind"] for e in mixed} == {"appear", "move"}
    with pytest.raises(ValueError, match=r"kind 'vanish': not one of the video events \('appear', 'move'\)"):
        curriculum.video_event(rng, 8, "vanish")
