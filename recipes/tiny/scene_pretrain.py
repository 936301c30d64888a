"""Scene pretraining of the tiny LLM: the stand-in for what Qwen2.5 brings to VideoLLaMA3.

Qwen2.5 arrives able to look things up in its context: asked "What colour is the square?" about a
list of objects, it finds the square and reads its colour. A tiny LLM trained from images alone
does not learn that within the recipe's minutes, so this step teaches it first, on symbolic scenes:
a 6x6 grid of tokens (an 84 px image in 14 px patches), each the sum of the LLM's own word
embeddings of what covers it ("red" + "square" + "top" + "left", or the background style
"striped"), plus Gaussian noise, followed by the curriculum's image questions, trained with the
LLM's own loss on the answers. The recipe then aligns the projector's tokens to the same word sums
(`vision_pretrain.align_projector`), so the lookups learnt here work on images.

From fresh weights the LLM answers at 1 in n among several shapes for a few hundred steps, then
learns the lookups; when depends on the seed. Position questions lag (the answer's second word
needs a second lookup), so the recipe follows with a short run on them alone (`kinds=("position",)`).

Videos (`videos`, a share of the scenes; off in the recipe): a served clip is `Time 0.0s:` and
frame 0's 16 merged tokens, then per second `,Time 1.0s:` and only the tokens the Differential
Frame Pruner keeps. Video scenes are such clips of the curriculum's events (`curriculum.video_event`),
keeping exactly the tokens DiffFP keeps of the rendered clip (`clip_tokens`), asked the video kinds
among `kinds`. Measurements: docs/experiments.md ("Studies").
"""

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from recipes.tiny import curriculum

logger = logging.getLogger("scene_pretrain")

GRID = 6  # tokens per side: an 84 px image in 14 px patches
HALF = GRID // 2  # a quadrant is HALF x HALF tokens; shapes nearly fill theirs
VIDEO_GRID = 4  # merged tokens per side of a 112 px video frame (14 px patches merged 2x2)
VIDEO_KINDS = ("appear", "when", "direction", "moving")


@dataclass
class SceneConfig:
    """What a scene pretraining run shows the LLM and for how long (the recipe's `scenes` plan sets
    steps, batch, lr, every and eval_scenes; `studies.binding_study`'s flags the rest)."""

    objects: int = 0  # shapes per scene; 0: one to three, as in the curriculum
    kinds: tuple[str, ...] = ("colour", "shape", "position", "count")
    answers: str = "short"  # style of the curriculum's answers (`curriculum.ANSWER_STYLES`)
    turns: int = 3
    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    beta2: float = 0.999  # AdamW's second-moment decay
    noise: float = 0.5  # in units of the embedding matrix's standard deviation
    seed: int = 1
    eval_scenes: int = 600
    every: int = 100
    # A first phase on the simplest binding question (two shapes, "What colour is the <kind>?").
    warmup_steps: int = 0
    # Share of scenes that are symbolic videos (asked the video kinds among `kinds`).
    videos: float = 0.0


@dataclass
class Scene:
    ids: list[int]  # prompt and answers, with placeholders where the grid goes
    labels: list[int]  # -100 except on answer tokens
    cells: list[list[int]]  # word ids summed into each grid token, in order
    slots: list[int]  # where in `ids` each grid token goes
    kind: str  # kind of the first question (what held-out scoring reports)
    shapes: int


class SceneWriter:
    """Symbolic scenes and their questions, tokenised with the recipe's tokenizer."""

    def __init__(self, tokenizer, config: SceneConfig):
        self.tokenizer, self.config = tokenizer, config
        self.pad = tokenizer.pad_token_id
        self._encoded: dict[str, list[int]] = {}  # a handful of distinct strings per run
        groups = (curriculum.COLOURS, curriculum.SHAPES, curriculum.QUADRANTS, curriculum.BACKGROUNDS)
        self.word_ids = {w: self.encode(" " + w) for group in groups for w in group}
        # A shape's cell holds a colour, a kind and a quadrant side by side, a background cell its
        # style; a tokenizer trained on little text may split any of them into several tokens.
        self.width = max(sum(max(len(self.word_ids[w]) for w in group) for group in groups[:3]),
                         max(len(self.word_ids[w]) for w in groups[3]))

    def encode(self, text: str) -> list[int]:
        if text not in self._encoded:
            self._encoded[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(self._encoded[text])

    def cell(self, words: list[str]) -> list[int]:
        ids = [i for w in words for i in self.word_ids[w]]
        return ids + [self.pad] * (self.width - len(ids))

    def __call__(self, rng: np.random.Generator, turns: int) -> Scene:
        # The share is only drawn when videos are asked for, so image-only runs keep their streams.
        if self.config.videos and rng.random() < self.config.videos:
            return self.video(rng, turns)
        return self.image(rng, turns)

    def image(self, rng: np.random.Generator, turns: int) -> Scene:
        count = self.config.objects or int(rng.integers(1, 4))
        shapes = curriculum.distinct_shapes(rng, count)
        quadrants = [int(q) for q in rng.choice(4, size=count, replace=False)]
        style = str(rng.choice(curriculum.BACKGROUNDS))
        questions = [qa for qa in curriculum.image_questions(rng, shapes, quadrants, style, self.config.answers)
                     if qa[0] in self.config.kinds]
        words = [[style] for _ in range(GRID * GRID)]
        for shape, quadrant in zip(shapes, quadrants):
            top, left = HALF * (quadrant // 2), HALF * (quadrant % 2)
            for r in range(top, top + HALF):
                for c in range(left, left + HALF):
                    words[r * GRID + c] = [shape.colour, shape.kind, curriculum.QUADRANTS[quadrant]]
        prompt = self.encode("<|im_start|>user\n")
        slots = list(range(len(prompt), len(prompt) + len(words)))
        return self.conversation(rng, prompt + [self.pad] * len(words), [self.cell(w) for w in words], slots,
                                 questions, turns, count)

    def video(self, rng: np.random.Generator, turns: int) -> Scene:
        """A clip drawn like the curriculum's (`curriculum.video_event`), laid out as the processor
        lays out a served video: `Time 0.0s:` and frame 0's tokens, `,Time 1.0s:` and the tokens
        DiffFP keeps of the next frame (`clip_tokens`), and so on."""
        questions = []
        while not questions:  # a clip of the other event when only one event's kinds are asked
            seconds = int(rng.integers(6, 9))
            style = str(rng.choice(curriculum.BACKGROUNDS))
            event = curriculum.video_event(rng, seconds)
            questions = [qa for qa in curriculum.video_questions(event) if qa[0] in self.config.kinds]
        ids, cells, slots = [], [], []
        for second, (kept, words) in enumerate(clip_tokens(event, style, seconds)):
            ids += self.encode(("<|im_start|>user\n" if second == 0 else ",") + f"Time {float(second):.1f}s:")
            slots += range(len(ids), len(ids) + len(kept))
            ids += [self.pad] * len(kept)
            cells += [self.cell(words[b]) for b in kept]
        return self.conversation(rng, ids, cells, slots, questions, turns, 2 if event["distractor"] else 1)

    def conversation(self, rng, ids, cells, slots, questions, turns, shapes) -> Scene:
        """The user turn so far (`ids`, grid included) followed by `turns` of the questions."""
        chosen = [questions[j] for j in rng.permutation(len(questions))[:turns]]
        labels = [-100] * len(ids)
        for i, (_, question, answer) in enumerate(chosen):
            prompt = self.encode(("\n" if i == 0 else "<|im_start|>user\n") + f"{question}<|im_end|>\n<|im_start|>assistant\n")
            reply = self.encode(answer + "<|im_end|>\n")
            ids = ids + prompt + reply
            labels += [-100] * len(prompt) + reply
        return Scene(ids, labels, cells, slots, chosen[0][0], shapes)


def clip_tokens(event: dict, style: str, seconds: int) -> list[tuple[list[int], list[list[str]]]]:
    """Per second of a clip, `(kept, words)`: the words of each of the frame's merged tokens (what
    covers it, as in image scenes) and the tokens DiffFP keeps: all of frame 0; later, those whose
    pixels changed (the actor came, went or moved there); a frame that kept none keeps its first
    (the processor's `compression_min_tokens` of 1)."""
    still = [[style] for _ in range(VIDEO_GRID * VIDEO_GRID)]
    if event["distractor"] is not None:
        shape, x = event["distractor"]
        for b in np.flatnonzero(block_cover(shape_mask(shape, x, curriculum.DISTRACTOR_INSET, curriculum.DISTRACTOR_RADIUS))):
            still[b] = [shape.colour, shape.kind, block_quadrant(b)]
    actor, frames = event["shape"], seconds * curriculum.VIDEO_FPS
    clip, before = [], None
    for second in range(seconds):
        centre = curriculum.actor_centre(event, second * curriculum.VIDEO_FPS, frames)
        mask = np.zeros((curriculum.VIDEO_SIZE,) * 2, bool) if centre is None else shape_mask(actor, *centre, event["radius"])
        covered = block_cover(mask)
        words = [[actor.colour, actor.kind, block_quadrant(b)] if covered[b] else still[b] for b in range(len(still))]
        kept = list(range(len(words))) if before is None else list(np.flatnonzero(block_cover(mask != before))) or [0]
        clip.append(([int(b) for b in kept], words))
        before = mask
    return clip


def shape_mask(shape: curriculum.Shape, x: float, y: float, radius: float) -> np.ndarray:
    """The pixels of a video frame that `curriculum.draw_shape` paints, `(H, W)` bool."""
    blank = np.zeros((curriculum.VIDEO_SIZE, curriculum.VIDEO_SIZE, 3), dtype=np.uint8)
    return curriculum.draw_shape(blank, shape, x, y, radius).any(-1)  # (H, W)


def block_cover(mask: np.ndarray) -> np.ndarray:
    """Which merged tokens of a frame hold any pixel of `mask`, `(VIDEO_GRID ** 2,)` bool in raster order."""
    side = curriculum.VIDEO_SIZE // VIDEO_GRID
    return mask.reshape(VIDEO_GRID, side, VIDEO_GRID, side).any(axis=(1, 3)).reshape(-1)  # (G*G,)


def block_quadrant(block: int) -> str:
    row, column = divmod(block, VIDEO_GRID)
    return curriculum.QUADRANTS[2 * (row >= VIDEO_GRID // 2) + (column >= VIDEO_GRID // 2)]


def embed_batch(scenes: list[Scene], embeddings: torch.nn.Embedding, pad: int, noise: float, generator: torch.Generator):
    """`(inputs_embeds, labels, attention_mask)` on the embeddings' device, each scene's grid tokens
    summed from word embeddings; the noise is drawn on the CPU from `generator`."""
    device = embeddings.weight.device
    length = max(len(s.ids) for s in scenes)
    ids = torch.tensor([s.ids + [pad] * (length - len(s.ids)) for s in scenes], device=device)  # (B, S)
    labels = torch.tensor([s.labels + [-100] * (length - len(s.labels)) for s in scenes], device=device)  # (B, S)
    mask = torch.tensor([[1] * len(s.ids) + [0] * (length - len(s.ids)) for s in scenes], device=device)  # (B, S)
    n, width = max(len(s.cells) for s in scenes), len(scenes[0].cells[0])
    cells = torch.tensor([s.cells + [[pad] * width] * (n - len(s.cells)) for s in scenes], device=device)  # (B, N, W)
    grid = (embeddings(cells) * (cells != pad)[..., None]).sum(2)  # (B, N, D)
    jitter = torch.randn(grid.shape, generator=generator).to(device)  # (B, N, D)
    grid = grid + noise * embeddings.weight.std().detach() * jitter
    rows = torch.tensor([b for b, s in enumerate(scenes) for _ in s.slots], device=device)
    slots = torch.tensor([i for s in scenes for i in s.slots], device=device)
    places = torch.tensor([j for s in scenes for j in range(len(s.slots))], device=device)
    tokens = embeddings(ids).index_put((rows, slots), grid[rows, places])  # (B, S, D)
    return tokens, labels, mask


@torch.no_grad()
def score(model, scenes: list[Scene], pad: int, noise: float) -> dict[str, float]:
    """Exact-answer accuracy per question kind and per kind and shape count (`colour2`, ...)."""
    model.eval()
    right, total = collections.Counter(), collections.Counter()
    generator = torch.Generator().manual_seed(1)
    for first in range(0, len(scenes), 100):
        chunk = scenes[first:first + 100]
        embeds, labels, mask = embed_batch(chunk, model.get_input_embeddings(), pad, noise, generator)
        predicted = model(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        exact = ((predicted == target) | (target < 0)).all(1)
        for scene, ok in zip(chunk, exact.tolist()):
            keys = [scene.kind] + ([f"{scene.kind}{scene.shapes}"] if scene.kind != "count" else [])
            for key in keys:
                right[key] += ok
                total[key] += 1
    model.train()
    return {key: right[key] / total[key] for key in sorted(total)}


def pretrain_llm(model, tokenizer, config: SceneConfig, device: str = "cpu") -> list[tuple[int, dict[str, float]]]:
    """Train `model`'s LLM (its vision encoder and projector stay frozen) in place on symbolic
    scenes; returns `[(step, held-out accuracies)]` every `config.every` steps and at the end."""
    if config.steps < 0 or config.batch < 1 or config.turns < 1:
        raise ValueError(f"steps={config.steps}, batch={config.batch}, turns={config.turns}: "
                         "steps must be >= 0, batch and turns >= 1")
    asked = [kind in VIDEO_KINDS for kind in config.kinds]
    if not 0.0 <= config.videos <= 1.0:
        raise ValueError(f"videos={config.videos}: the share of video scenes must be within [0, 1]")
    if config.videos > 0 and not any(asked):
        raise ValueError(f"kinds={config.kinds} with videos={config.videos}: video scenes need one of {VIDEO_KINDS}")
    if config.videos < 1 and all(asked):
        raise ValueError(f"kinds={config.kinds} with videos={config.videos}: image scenes need one of the "
                         "image kinds (colour, shape, position, count, caption)")
    model.to(device).train()
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not ("vision_encoder" in name or "mm_projector" in name))
    writer = SceneWriter(tokenizer, config)
    simplest = SceneWriter(tokenizer, dataclasses.replace(config, objects=2, kinds=("colour",), videos=0.0))
    held_out = [writer(np.random.default_rng(999 + i), 1) for i in range(config.eval_scenes)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  betas=(0.9, config.beta2), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    rng, generator = np.random.default_rng(config.seed), torch.Generator().manual_seed(config.seed)
    curve, start = [], time.time()
    for step in range(config.steps + 1):
        if step % config.every == 0 or step == config.steps:
            curve.append((step, score(model, held_out, writer.pad, config.noise)))
            logger.info("step %d (%.0f s): %s", step, time.time() - start, {k: round(v, 2) for k, v in curve[-1][1].items()})
        if step == config.steps:
            break
        source = simplest if step < config.warmup_steps else writer
        batch = [source(rng, config.turns) for _ in range(config.batch)]
        embeds, labels, mask = embed_batch(batch, model.get_input_embeddings(), writer.pad, config.noise, generator)
        model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable[name])
    return curve
