"""Synthetic curriculum for the embedded tiny VideoLLaMA3: coloured shapes in images and videos.

Everything is drawn from one seed with NumPy and Pillow and encoded with PyAV, so the same seed
gives byte-identical files on any machine (no downloads, no clock, no thread-dependent encoder
settings). Samples are written in the official VideoLLaMA3 data format, one JSON object a line:

    {"image": ["images/00012.png"], "conversations": [{"from": "human", "value": "<image>\\nWhat ..."},
                                                     {"from": "gpt", "value": "red"}]}
    {"video": ["videos/00003.mp4"], "conversations": [{"from": "human", "value": "<video>\\nWhen ..."},
                                                     {"from": "gpt", "value": "3.0-5.0 seconds"}]}
    {"conversations": [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5"}]}

Media paths are relative to the folder holding the JSONL files (the trainer's data root).

The world:
* images (84x84 px): one to three shapes, each of a different shape and colour, each in its own
  quadrant, on a plain, striped, checkered or noisy background. Questions ask for a colour, a
  shape, the count, a position ("top left") or a caption; with `answers="restated"` the answers
  restate the subject ("The square is red.", see `image_questions`).
* videos (112x112 px, 6-8 s at 10 fps, H.264 lossless so a static background decodes to identical
  pixels and the Differential Frame Pruner drops it): a static background, sometimes a static
  distractor shape, and one event: a shape that is visible from second `s` to second `e`
  ("When does the red circle appear?" -> "2.0-5.0 seconds"), or a shape that moves left, right,
  up or down for the whole clip. Events start and end on whole seconds, which is what a model
  sampling one frame a second can resolve.
* text-only: small arithmetic, facts about the shapes, and a self-introduction.
"""

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (150, 40, 170),
}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = ("plain", "striped", "checkered", "noisy")
DIRECTIONS = ("left", "right", "up", "down")
EVENT_KINDS = ("appear", "move")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

IMAGE_SIZE = 84
VIDEO_SIZE = 112
# A video's static distractor: centred this far from the top and from the left or right edge.
DISTRACTOR_INSET = 18.0
DISTRACTOR_RADIUS = 11.0
VIDEO_FPS = 10
# `generate`'s appearance clips draw from `default_rng(seed + APPEAR_SEED)`, apart from the rest.
APPEAR_SEED = 4242
ANSWER_STYLES = ("short", "restated")
SYSTEM_NAME = "I am VideoLLaMA3, a tiny model that describes shapes in images and videos."


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def background(rng: np.random.Generator, size: int, style: str) -> np.ndarray:
    """A muted `(size, size, 3)` uint8 background; shape colours never come close to it."""
    base = int(rng.integers(90, 200))
    tint = rng.integers(-12, 13, size=3)
    a = np.clip(base + tint, 0, 255).astype(np.uint8)
    b = np.clip(base + tint + int(rng.choice([-45, 45])), 0, 255).astype(np.uint8)
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = a
    if style == "striped":
        period = int(rng.integers(6, 13))
        stripes = (np.arange(size) // (period // 2)) % 2 == 1
        if rng.random() < 0.5:
            canvas[stripes, :] = b
        else:
            canvas[:, stripes] = b
    elif style == "checkered":
        cell = int(rng.integers(5, 11))
        idx = np.arange(size) // cell
        canvas[(idx[:, None] + idx[None, :]) % 2 == 1] = b
    elif style == "noisy":
        noise = rng.integers(-25, 26, size=(size, size, 1))
        canvas = np.clip(canvas.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return canvas


def draw_shape(canvas: np.ndarray, shape: Shape, cx: float, cy: float, radius: float) -> np.ndarray:
    """Draw `shape` centred at pixel `(cx, cy)` (x right, y down); returns a new array."""
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    colour = COLOURS[shape.colour]
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape.kind == "circle":
        draw.ellipse(box, fill=colour)
    elif shape.kind == "square":
        r = radius * 0.85  # same visual weight as the circle
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius * 0.8), (cx - radius, cy + radius * 0.8)], fill=colour)
    return np.asarray(image)


def distinct_shapes(rng: np.random.Generator, count: int) -> list[Shape]:
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    kinds = rng.choice(SHAPES, size=count, replace=False)
    return [Shape(str(c), str(k)) for c, k in zip(colours, kinds)]


# ---- images ------------------------------------------------------------------------------------


def make_image(rng: np.random.Generator, size: int = IMAGE_SIZE):
    """Returns `(pixels, shapes, quadrants, background style)` of one random `size`-pixel scene."""
    count = int(rng.integers(1, 4))
    shapes = distinct_shapes(rng, count)
    quadrants = [int(q) for q in rng.choice(4, size=count, replace=False)]
    style = str(rng.choice(BACKGROUNDS))
    canvas = background(rng, size, style)
    half = size / 2
    for shape, quadrant in zip(shapes, quadrants):
        # Shapes nearly fill their quadrant (about 3x3 patches of 14 px): at 2x2 patches a circle,
        # a square and a triangle differ by a few pixels, which a tiny encoder does not resolve.
        radius = float(rng.uniform(16, 19))
        jitter = half / 2 - radius - 1
        cx = (quadrant % 2) * half + half / 2 + float(rng.uniform(-jitter, jitter))
        cy = (quadrant // 2) * half + half / 2 + float(rng.uniform(-jitter, jitter))
        canvas = draw_shape(canvas, shape, cx, cy, radius)
    return canvas, shapes, quadrants, style


def check_answer_style(answers: str) -> None:
    if answers not in ANSWER_STYLES:
        raise ValueError(f"answers={answers!r}: expected one of {ANSWER_STYLES}")


def join_names(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def quadrant_order(quadrants: list[int]) -> list[int]:
    """Indices of the shapes from the top-left quadrant to the bottom-right one: the order answers list them in."""
    return sorted(range(len(quadrants)), key=lambda i: quadrants[i])


def image_caption(shapes, quadrants, style, answers: str = "short") -> str:
    """Shapes in quadrant order, then the background.

    short:    "A red circle at the top left and a blue square at the bottom right on a striped background."
    restated: "A red circle top left, a blue square bottom right, on a striped background." (each
              quadrant right after the name it is looked up from)
    """
    order = quadrant_order(quadrants)
    if answers == "restated":
        sentence = ", ".join([f"a {shapes[i].name} {QUADRANTS[quadrants[i]]}" for i in order] + [f"on a {style} background."])
        return sentence[0].upper() + sentence[1:]
    sentence = join_names([f"a {shapes[i].name} at the {QUADRANTS[quadrants[i]]}" for i in order])
    return sentence[0].upper() + sentence[1:] + f" on a {style} background."


def image_questions(rng: np.random.Generator, shapes, quadrants, style, answers: str = "short") -> list[tuple[str, str, str]]:
    """All `(kind, question, answer)` pairs the scene supports, in a fixed order.

    `answers` (`ANSWER_STYLES`): "short" answers with the bare word ("What shape is the red
    object?" -> "square"). "restated" answers restate what the question names right before what it
    asks ("It is a red square.", "The square is red.", "The red circle is top left.") and adds
    "What colour is each shape?" ("square blue, circle red."). A bare "square" has to be found from
    the answer's first token by finding "red" in the question and then the red patches, two
    dependent attention steps; restated, it is looked up from the word just written, one step,
    which the tiny LLM learns within 200 steps on symbolic scenes (`studies.binding_study`).
    """
    check_answer_style(answers)
    restated = answers == "restated"
    qa = []
    for shape, quadrant in zip(shapes, quadrants):
        where = QUADRANTS[quadrant]
        qa.append(("colour", f"What colour is the {shape.kind}?", f"The {shape.kind} is {shape.colour}." if restated else shape.colour))
        qa.append(("shape", f"What shape is the {shape.colour} object?", f"It is a {shape.name}." if restated else shape.kind))
        qa.append(("position", f"Where is the {shape.name}?", f"The {shape.name} is {where}." if restated else where))
    if len(shapes) == 1:
        only = shapes[0]
        qa.append(("colour", "What colour is the shape?", f"The shape is {only.colour}." if restated else only.colour))
        qa.append(("shape", "What shape is in the image?", f"It is a {only.name}." if restated else only.kind))
    qa.append(("count", "How many shapes are there?", str(len(shapes))))
    if restated:
        order = quadrant_order(quadrants)
        qa.append(("colours", "What colour is each shape?", ", ".join(f"{shapes[i].kind} {shapes[i].colour}" for i in order) + "."))
    qa.append(("caption", "Describe the image.", image_caption(shapes, quadrants, style, answers)))
    return qa


# ---- videos ------------------------------------------------------------------------------------


def video_event(rng: np.random.Generator, seconds: int, kind: str | None = None) -> dict:
    """The random content of a `seconds`-long clip (its background aside): the actor shape, an
    optional static distractor and one event, "appear" (visible from second `start` to `end`) or
    "move" (`direction`, at `across` pixels on the other axis). `scene_pretrain` draws the
    same events for its symbolic videos.

    `kind` ("appear" or "move"): events are drawn until one is of that kind, so it follows the
    distribution of all events of that kind; None (default) takes the first, of either kind."""
    if kind not in (None, *EVENT_KINDS):
        raise ValueError(f"kind {kind!r}: not one of the video events {EVENT_KINDS}")
    while True:
        event = any_video_event(rng, seconds)
        if kind is None or event["kind"] == kind:
            return event


def any_video_event(rng: np.random.Generator, seconds: int) -> dict:
    """One `video_event`, of either kind (an appearance or a motion, one in two each)."""
    count = 2 if rng.random() < 0.5 else 1
    shapes = distinct_shapes(rng, count)
    event = {"shape": shapes[0], "radius": float(rng.uniform(15, 18)), "distractor": None}
    if count == 2:
        # A static distractor in a top corner the actor's path avoids (centre y 18, x 18 or 94, radius 11).
        event["distractor"] = (shapes[1], float(rng.choice([DISTRACTOR_INSET, VIDEO_SIZE - DISTRACTOR_INSET])))
    if rng.random() < 0.5:
        start = int(rng.integers(0, seconds - 1))
        end = int(rng.integers(start + 1, seconds + 1))
        if start == 0 and end == seconds:
            end = seconds - 1 if rng.random() < 0.5 else end
            start = 1 if end == seconds else start
        centre = (float(rng.uniform(30, VIDEO_SIZE - 30)), float(rng.uniform(45, VIDEO_SIZE - 30)))
        event.update(kind="appear", start=start, end=end, centre=centre)
    else:
        direction = str(rng.choice(DIRECTIONS))
        # Off the distractor's corners (y 7-29, x 7-29 or 83-105).
        across = float(rng.uniform(45, VIDEO_SIZE - 25) if direction in ("left", "right") else rng.uniform(44, VIDEO_SIZE - 44))
        event.update(kind="move", direction=direction, across=across)
    return event


def actor_centre(event: dict, i: int, frames: int) -> tuple[float, float] | None:
    """Pixel centre `(x, y)` of the event's actor in frame `i` of `frames` (at `VIDEO_FPS`), None
    while it is not shown."""
    if event["kind"] == "appear":
        return event["centre"] if event["start"] <= i / VIDEO_FPS < event["end"] else None
    lo, hi = 20.0, VIDEO_SIZE - 20.0
    progress = lo + (hi - lo) * i / (frames - 1)
    along = progress if event["direction"] in ("right", "down") else lo + hi - progress
    return (along, event["across"]) if event["direction"] in ("left", "right") else (event["across"], along)


def draw_clip_plan(rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, dict, int]:
    """What one random clip shows, before its frames are drawn: `(background (H, W, 3) uint8, event
    dict with its background "style", seconds)`; `kind`: the event's (`video_event`)."""
    seconds = int(rng.integers(6, 9))
    style = str(rng.choice(BACKGROUNDS))
    canvas = background(rng, VIDEO_SIZE, style)
    event = video_event(rng, seconds, kind)
    event["style"] = style  # for frame rows (`frame_row`); questions never ask it
    return canvas, event, seconds


def make_video(rng: np.random.Generator):
    """Returns `(frames (T, H, W, 3) uint8, event dict)` of one clip at `VIDEO_FPS`."""
    canvas, event, seconds = draw_clip_plan(rng)
    return render_clip(canvas, event, seconds), event


def shown_frames(event: dict, frames: int) -> list[int]:
    """Indices of the frames, of `frames`, where the event's actor is shown."""
    return [i for i in range(frames) if actor_centre(event, i, frames) is not None]


def with_distractor(canvas: np.ndarray, event: dict) -> np.ndarray:
    """`canvas` with the event's static distractor drawn on it (a new array), if it has one."""
    if event["distractor"] is None:
        return canvas
    shape, x = event["distractor"]
    return draw_shape(canvas, shape, x, DISTRACTOR_INSET, DISTRACTOR_RADIUS)


def render_clip(canvas: np.ndarray, event: dict, seconds: int) -> np.ndarray:
    """`(T, H, W, 3)` uint8 frames at `VIDEO_FPS` of `event` (`video_event`) on a `canvas` background."""
    canvas = with_distractor(canvas, event)
    frames = np.empty((seconds * VIDEO_FPS, VIDEO_SIZE, VIDEO_SIZE, 3), dtype=np.uint8)
    for i in range(len(frames)):
        centre = actor_centre(event, i, len(frames))
        frames[i] = canvas if centre is None else draw_shape(canvas, event["shape"], *centre, event["radius"])
    return frames


def video_questions(event) -> list[tuple[str, str, str]]:
    shape = event["shape"]
    if event["kind"] == "appear":
        return [
            ("appear", "What appears in the video?", f"a {shape.name}"),
            ("when", f"When does the {shape.name} appear?", f"{event['start']:.1f}-{event['end']:.1f} seconds"),
        ]
    return [
        ("direction", f"Which way does the {shape.name} move?", event["direction"]),
        ("moving", "What moves in the video?", f"a {shape.name}"),
    ]


def write_video(path: Path, frames: np.ndarray) -> None:
    """Lossless single-threaded H.264 in mp4, so bytes depend only on the pixels."""
    with av.open(str(path), mode="w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast", "qp": "0", "threads": "1"}
        stream.codec_context.time_base = Fraction(1, VIDEO_FPS)
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)


# ---- text --------------------------------------------------------------------------------------

TEXT_FACTS = [
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("How many corners does a circle have?", "0"),
    ("Which shape is round?", "circle"),
    ("Which shape has three corners?", "triangle"),
    ("Which shape has four equal sides?", "square"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What colour is grass?", "green"),
    ("What colour is a banana?", "yellow"),
    ("What colour do red and blue make?", "purple"),
    ("What colour do blue and yellow make?", "green"),
    ("Hello! Who are you?", SYSTEM_NAME),
    ("Who are you?", SYSTEM_NAME),
    ("What can you do?", "I can answer questions about shapes, colours, positions and motion in images and videos."),
]


def text_sample(rng: np.random.Generator) -> list[tuple[str, str]]:
    if rng.random() < 0.6:
        a, b = (int(v) for v in rng.integers(0, 10, size=2))
        if rng.random() < 0.5:
            return [(f"What is {a} plus {b}?", str(a + b))]
        a, b = max(a, b), min(a, b)
        return [(f"What is {a} minus {b}?", str(a - b))]
    return [TEXT_FACTS[int(rng.integers(len(TEXT_FACTS)))]]


# ---- writing -----------------------------------------------------------------------------------


def conversation(tag: str | None, turns: list[tuple[str, str]]) -> list[dict]:
    messages = []
    for i, (question, answer) in enumerate(turns):
        value = f"{tag}\n{question}" if (tag and i == 0) else question
        messages += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return messages


def vision_row(rel: str, shapes, quadrants, style: str) -> dict:
    """One `vision.jsonl` line: the image's path, its objects and its background style."""
    objects = [{"colour": s.colour, "shape": s.kind, "quadrant": QUADRANTS[q]} for s, q in zip(shapes, quadrants)]
    return {"image": rel, "objects": objects, "background": style}


def generate(out_dir, *, seed: int = 0, images: int = 600, videos: int = 300, texts: int = 300, turns: int = 3,
             prefix: str = "", answers: str = "short", wide_images: int = 0, more_videos: int = 0,
             video_frames: bool = False, appear_videos: int = 0, workers: int = 1) -> dict[str, Path]:
    """Write media and the JSONL files below under `out_dir`; returns their paths by name.

    * `image.jsonl`: one line per image with up to `turns` question turns (caption included
      with probability 1/2); `caption.jsonl`: the same images with only their caption;
    * `vision.jsonl`: one line per image with its `objects` (colour, shape, quadrant) and its
      `background` style, for the vision pretraining and alignment that stand in for SigLIP
      (`vision_pretrain`);
    * `video.jsonl`: one line per video with all its questions as turns, in random order;
    * `text.jsonl`: single-turn text-only samples;
    * `eval.jsonl`: one line per (medium, question), single-turn, with `kind` and `modality` fields,
      for the held-out evaluation (use a different seed).

    `answers` is the style of the image answers, "short" or "restated" (`image_questions`).
    `wide_images`: that many more images at the video frames' size (`VIDEO_SIZE`), listed in
    `vision.jsonl` only. An 84 px image leaves a shape 1-4 px of play in its quadrant, so its centre
    always lies near the middle of a 14 px patch; video shapes lie anywhere, and an encoder that
    learnt kinds only at that phase misnames them when their centre is near a patch border. In a
    112 px image a shape moves 8-11 px in its quadrant: every phase. They are drawn after
    everything else, so the other files are the same with or without them.
    `more_videos`: that many more videos, drawn after everything else (wide images included) and
    listed in `video_more.jsonl` only, so every other file, and with them the recipe's tokenizer
    (`corpus_text`), is the same with or without them; more clips for the same training steps.
    `video_frames`: also write one still of each video (`frame_row`) and list them in `frames.jsonl`
    (for aligning the merged tokens of video frames, `vision_pretrain.align_projector`); no random
    number is drawn for them, so every other file is the same with or without them.
    `appear_videos`: that many more videos whose event is an appearance (questions: what appears,
    and when), listed in `video_appear.jsonl` only: the temporal grounding the recipe's model learns
    last. They are drawn from a generator of their own (seeded `seed + APPEAR_SEED`), so every other
    file is the same with or without them, whatever else is drawn.
    `workers`: processes that render and encode the media files (`MediaWriter`); every random
    number is still drawn here, in order, so the files are byte-identical for any number of workers.
    With more than one, a script calling this needs the `if __name__ == "__main__":` guard: the
    workers are spawned, and a spawned process imports the main module.
    """
    check_answer_style(answers)
    with MediaWriter(workers) as writer:
        return _generate(Path(out_dir), writer, seed=seed, images=images, videos=videos, texts=texts, turns=turns,
                         prefix=prefix, answers=answers, wide_images=wide_images, more_videos=more_videos,
                         video_frames=video_frames, appear_videos=appear_videos)


def _generate(out: Path, writer, *, seed, images, videos, texts, turns, prefix, answers, wide_images, more_videos,
              video_frames, appear_videos) -> dict[str, Path]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = {"image": [], "caption": [], "vision": [], "video": [], "text": [], "eval": []}
    if more_videos:
        rows["video_more"] = []
    if video_frames:
        rows["frames"] = []
    if appear_videos:
        rows["video_appear"] = []

    for i in range(images):
        pixels, shapes, quadrants, style = make_image(rng)
        rel = f"images/{prefix}{i:05d}.png"
        writer.submit(write_png, out / rel, pixels)
        qa = image_questions(rng, shapes, quadrants, style, answers)
        order = rng.permutation(len(qa))
        chosen = [qa[j] for j in order[:turns]]
        rows["image"].append({"image": [rel], "conversations": conversation("<image>", [(q, a) for _, q, a in chosen])})
        caption = qa[-1]
        rows["vision"].append(vision_row(rel, shapes, quadrants, style))
        rows["caption"].append({"image": [rel], "conversations": conversation("<image>", [caption[1:]])})
        for kind, q, a in qa:
            rows["eval"].append({"image": [rel], "modality": "image", "kind": kind,
                                 "conversations": conversation("<image>", [(q, a)])})

    for i in range(videos):
        rel, qa = video_row(rng, writer, out, f"videos/{prefix}{i:05d}.mp4", rows["video"], rows.get("frames"))
        for kind, q, a in qa:
            rows["eval"].append({"video": [rel], "modality": "video", "kind": kind,
                                 "conversations": conversation("<video>", [(q, a)])})

    for _ in range(texts):
        rows["text"].append({"conversations": conversation(None, text_sample(rng))})

    for i in range(wide_images):
        pixels, shapes, quadrants, style = make_image(rng, VIDEO_SIZE)
        rel = f"images/{prefix}wide{i:05d}.png"
        writer.submit(write_png, out / rel, pixels)
        rows["vision"].append(vision_row(rel, shapes, quadrants, style))

    for i in range(more_videos):
        video_row(rng, writer, out, f"videos/{prefix}more{i:05d}.mp4", rows["video_more"])

    appear_rng = np.random.default_rng(seed + APPEAR_SEED)
    for i in range(appear_videos):
        video_row(appear_rng, writer, out, f"videos/{prefix}appear{i:05d}.mp4", rows["video_appear"], kind="appear")

    paths = {}
    for name, items in rows.items():
        paths[name] = out / f"{name}.jsonl"
        with open(paths[name], "w") as handle:
            for item in items:
                handle.write(json.dumps(item, sort_keys=True) + "\n")
    return paths


def video_row(rng: np.random.Generator, writer, out: Path, rel: str, rows: list, frame_rows: list | None = None,
              kind: str | None = None) -> tuple[str, list]:
    """Draw a clip (its event of `kind`, `video_event`), have `writer` (`MediaWriter`) render it to
    `out / rel` and append its training row (all its questions as turns, in random order) to `rows`;
    returns `rel` and the questions. With `frame_rows`, one still of the clip is written beside it
    and its `frame_row` appended there (no random number is drawn for it)."""
    canvas, event, seconds = draw_clip_plan(rng, kind)
    still = None
    if frame_rows is not None:
        row, middle = frame_row(rel.replace(".mp4", ".png"), event, seconds)
        frame_rows.append(row)
        still = (out / row["image"], middle)
    writer.submit(write_clip, out / rel, canvas, event, seconds, still)
    qa = video_questions(event)
    order = rng.permutation(len(qa))
    rows.append({"video": [rel], "conversations": conversation("<video>", [qa[j][1:] for j in order])})
    return rel, qa


def write_clip(path: Path, canvas: np.ndarray, event: dict, seconds: int, still: tuple[Path, int] | None) -> None:
    """Render a drawn clip (`draw_clip_plan`) and encode it to `path`; `still`: `(path, frame index)`
    of one frame to save as PNG as well."""
    frames = render_clip(canvas, event, seconds)
    write_video(path, frames)
    if still is not None:
        write_png(still[0], frames[still[1]])


def write_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, optimize=False)


def frame_row(rel: str, event: dict, seconds: int) -> tuple[dict, int]:
    """The still of a clip, to be written to `rel`: the frame at the middle of the actor's shown frames.
    Returns its `vision.jsonl`-style row (the actor and the distractor with the quadrant of their
    centres, and the background style) and that frame's index."""
    frames = seconds * VIDEO_FPS
    shown = shown_frames(event, frames)
    middle = shown[len(shown) // 2]
    half = VIDEO_SIZE / 2
    placed = [(event["shape"], actor_centre(event, middle, frames))]
    if event["distractor"] is not None:
        shape, x = event["distractor"]
        placed.append((shape, (x, DISTRACTOR_INSET)))
    quadrants = [2 * (y >= half) + (x >= half) for _, (x, y) in placed]
    return vision_row(rel, [shape for shape, _ in placed], quadrants, event["style"]), middle


class MediaWriter:
    """Runs the media writes `generate` hands it: inline with one worker, else in that many
    processes. Rendering and encoding are most of a curriculum's time and draw no random number,
    so the random draws stay in order in the caller and the files do not depend on `workers`.
    A failed write raises a `RuntimeError` naming its file: at once inline, else when the `with`
    block is left, which waits for every file."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers={workers}: at least one process must write the media")
        # spawn: the caller may already run torch's or the tokenizers' threads, which fork would copy.
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
        self.pending = []

    def submit(self, write, path: Path, *args) -> None:
        """`write(path, *args)`, now or in a worker."""
        if self.pool is not None:
            self.pending.append((path, self.pool.submit(write, path, *args)))
            return
        try:
            write(path, *args)
        except Exception as error:
            raise write_failed(path, error) from error

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.pool is None:
            return False
        try:
            # After an error in the block, the files still queued are not waited for.
            for path, future in self.pending if exc_info[0] is None else ():
                error = future.exception()
                if error is not None:
                    raise write_failed(path, error) from error
        finally:
            self.pool.shutdown(cancel_futures=True)
        return False


def write_failed(path: Path, error: BaseException) -> RuntimeError:
    return RuntimeError(f"could not write {path}: {type(error).__name__}: {error}")


def corpus_text(paths: dict[str, Path]) -> list[str]:
    """Every question and answer of the written JSONL files, for tokenizer training and LM pretraining."""
    texts = []
    for name in ("image", "caption", "video", "text"):
        with open(paths[name]) as handle:
            for line in handle:
                for message in json.loads(line)["conversations"]:
                    texts.append(message["value"].replace("<image>\n", "").replace("<video>\n", ""))
    return texts


DEMO_SEED = 7
DEMO_CENTRE = (70.0, 72.0)


def demo_event(kind: str = "square", centre: tuple[float, float] = DEMO_CENTRE) -> dict:
    """The demo video's event (`video_event`): a green `kind` of radius 16 centred at `centre`
    (x, y), visible from 2.0 to 5.0 seconds, with a static purple circle in the top-left corner."""
    return {"shape": Shape("green", kind), "radius": 16.0, "distractor": (Shape("purple", "circle"), DISTRACTOR_INSET),
            "kind": "appear", "start": 2, "end": 5, "centre": centre}


def demo_frames(kind: str = "square", centre: tuple[float, float] = DEMO_CENTRE) -> np.ndarray:
    """`(T, H, W, 3)` frames of the demo video (8 s, `demo_event` on a checkered background). The
    defaults are the bundled clip; `studies.demo_sweep` moves the shape."""
    rng = np.random.default_rng(DEMO_SEED)
    background(rng, IMAGE_SIZE, "striped")  # the demo image's background is drawn first
    return render_clip(background(rng, VIDEO_SIZE, "checkered"), demo_event(kind, centre), seconds=8)


def write_examples(out_dir) -> dict[str, Path]:
    """The demo's bundled media: a fixed image and a fixed video, in the curriculum's style.

    image: a red circle (top left), a blue square (top right) and a yellow triangle (bottom right)
    on a striped background; video: `demo_frames()`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(DEMO_SEED)
    half = IMAGE_SIZE / 2
    canvas = background(rng, IMAGE_SIZE, "striped")
    for shape, quadrant in ((Shape("red", "circle"), 0), (Shape("blue", "square"), 1), (Shape("yellow", "triangle"), 3)):
        cx, cy = (quadrant % 2) * half + half / 2, (quadrant // 2) * half + half / 2
        canvas = draw_shape(canvas, shape, cx, cy, 17.0)
    image_path = out / "shapes.png"
    Image.fromarray(canvas).save(image_path, optimize=False)
    video_path = out / "shapes.mp4"
    write_video(video_path, demo_frames())
    return {"image": image_path, "video": video_path}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--wide-images", type=int, default=0, help="112 px images, in vision.jsonl only (vision pretraining, alignment)")
    parser.add_argument("--more-videos", type=int, default=0, help="more videos, in video_more.jsonl only")
    parser.add_argument("--video-frames", action="store_true", help="one still per video, in frames.jsonl")
    parser.add_argument("--appear-videos", type=int, default=0,
                        help="more videos of appearances (what appears, when), in video_appear.jsonl only")
    parser.add_argument("--answers", choices=ANSWER_STYLES, default="short", help="style of the image answers")
    parser.add_argument("--workers", type=int, default=1, help="processes writing media (same files for any number)")
    args = parser.parse_args(argv)
    paths = generate(args.out_dir, seed=args.seed, images=args.images, videos=args.videos, texts=args.texts,
                     answers=args.answers, wide_images=args.wide_images, more_videos=args.more_videos,
                     video_frames=args.video_frames, appear_videos=args.appear_videos, workers=args.workers)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
