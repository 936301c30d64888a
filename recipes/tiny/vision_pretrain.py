"""Vision pretraining for the tiny recipe: the stand-in for starting from SigLIP.

The real VideoLLaMA3 starts its vision encoder from SigLIP, which already sees colours, shapes and
where things are. A randomly initialised tiny encoder sees none of that, and stage 1 (captions
through a frozen LLM) is too weak a signal to teach it from scratch in minutes: the projected
tokens stay noise the LLM learns to ignore. So, as text-only pretraining stands in for Qwen2.5,
this step stands in for SigLIP: the encoder alone, with a throw-away linear head, learns per patch
what covers it (shape colour or background), the kind of that shape, and where the patch is
(normalised row and column; the encoder has only relative 2D RoPE, so absolute position has to be
learnt). The head is discarded; only the encoder's weights carry over to stage 1.

With `background_weight` (on in the recipe): per image, the background's style from the mean of
its background patches, since captions name the style and colour labels alone do not teach it.

Off unless asked (`scene_weight`): every patch also reads out the whole scene, as the slots of
`SCENE_SLOTS` (the colour of each kind, the kind and quadrant of each colour, the colour and kind
at each quadrant, the background, the count), so that any one token carries which colour, kind and
quadrant belong together. The LLM did not use them, so the recipe leaves it off (docs/experiments.md).

Labels come from the curriculum's pixels: shapes are filled with exact palette colours that no
background comes close to, and each image holds at most one shape of each colour, so the palette
colour covering a patch names the shape too (`objects` of `vision.jsonl`).
"""

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from recipes.tiny.curriculum import BACKGROUNDS, COLOURS, QUADRANTS, SHAPES, VIDEO_SIZE
from recipes.tiny.scene_pretrain import VIDEO_GRID, block_quadrant

logger = logging.getLogger("vision_pretrain")

COVER_PIXELS = 0.15  # share of a patch a shape must cover for the patch to be labelled with it

# The scene as a fixed set of slots, each a class (0: nothing there): what a caption binds together.
SCENE_SLOTS = (
    [(f"colour of {k}", len(COLOURS) + 1) for k in SHAPES]
    + [(f"kind of {c}", len(SHAPES) + 1) for c in COLOURS]
    + [(f"quadrant of {c}", len(QUADRANTS) + 1) for c in COLOURS]
    + [(f"colour at {q}", len(COLOURS) + 1) for q in QUADRANTS]
    + [(f"kind at {q}", len(SHAPES) + 1) for q in QUADRANTS]
    + [("background", len(BACKGROUNDS)), ("count", 4)]
)


@dataclass
class PatchLabels:
    colour: torch.Tensor  # (N,) 0 = background, 1.. = COLOURS order
    shape: torch.Tensor  # (N,) 0 = background, 1.. = SHAPES order
    position: torch.Tensor | None  # (N, 2) row and column in [0, 1]; None: not trained (merged blocks)


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """`(..., 3)` integer RGB as `(...)` int64 `r << 16 | g << 8 | b`."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


PACKED_PALETTE = pack_rgb(np.array(list(COLOURS.values())))  # (C,) in `COLOURS` order


def palette_index(pixels: np.ndarray) -> np.ndarray:
    """`(H, W)` int: per pixel 1 + its colour's index in `COLOURS` where it is exactly a palette
    colour (a shape), 0 elsewhere (background)."""
    # Each RGB triple packed into one integer: one comparison per colour instead of three.
    match = pack_rgb(pixels)[:, :, None] == PACKED_PALETTE[None, None]  # (H, W, C)
    return np.where(match.any(-1), match.argmax(-1) + 1, 0)  # (H, W)


def block_counts(index: np.ndarray, side: int) -> np.ndarray:
    """`(blocks, C)`: pixels of each palette colour in each `side` x `side` block of a `palette_index`
    map, blocks in raster order (a partial last row or column of pixels is left out)."""
    rows, cols = index.shape[0] // side, index.shape[1] // side
    blocks = index[: rows * side, : cols * side].reshape(rows, side, cols, side).swapaxes(1, 2)
    blocks = blocks.reshape(rows * cols, side * side)  # (blocks, side*side)
    values = len(COLOURS) + 1
    offsets = blocks + values * np.arange(rows * cols)[:, None]  # each block's values counted apart
    counts = np.bincount(offsets.ravel(), minlength=rows * cols * values).reshape(rows * cols, values)  # (blocks, C + 1)
    return counts[:, 1:].astype(np.float64)  # (blocks, C)


def patch_labels(pixels: np.ndarray, kinds: dict[str, str], patch: int) -> PatchLabels:
    """Per-patch labels of one `(H, W, 3)` uint8 image in raster order; `kinds`: colour -> shape kind."""
    return index_labels(palette_index(pixels), kinds, patch)


def index_labels(index: np.ndarray, kinds: dict[str, str], patch: int) -> PatchLabels:
    """`patch_labels` from an image's `palette_index` map."""
    rows, cols = index.shape[0] // patch, index.shape[1] // patch
    cover = block_counts(index, patch) / (patch * patch)  # (N, C) share of each palette colour
    best = cover.argmax(1)
    present = cover[np.arange(len(best)), best] >= COVER_PIXELS
    names = list(COLOURS)
    colour = np.where(present, best + 1, 0)
    shape = np.array([SHAPES.index(kinds[names[b]]) + 1 if p else 0 for b, p in zip(best, present)])
    grid_r, grid_c = np.meshgrid(np.arange(rows) / max(1, rows - 1), np.arange(cols) / max(1, cols - 1), indexing="ij")
    position = np.stack([grid_r.ravel(), grid_c.ravel()], 1)  # (N, 2)
    return PatchLabels(torch.from_numpy(colour), torch.from_numpy(shape), torch.from_numpy(position).float())


def scene_labels(row: dict) -> torch.Tensor:
    """`(len(SCENE_SLOTS),)` class of each slot of one `vision.jsonl` row (0: nothing there)."""
    by_colour = {o["colour"]: o for o in row["objects"]}
    by_kind = {o["shape"]: o for o in row["objects"]}
    by_quadrant = {o["quadrant"]: o for o in row["objects"]}
    colours, quadrants = list(COLOURS), list(QUADRANTS)
    labels = (
        [colours.index(by_kind[k]["colour"]) + 1 if k in by_kind else 0 for k in SHAPES]
        + [SHAPES.index(by_colour[c]["shape"]) + 1 if c in by_colour else 0 for c in COLOURS]
        + [quadrants.index(by_colour[c]["quadrant"]) + 1 if c in by_colour else 0 for c in COLOURS]
        + [colours.index(by_quadrant[q]["colour"]) + 1 if q in by_quadrant else 0 for q in QUADRANTS]
        + [SHAPES.index(by_quadrant[q]["shape"]) + 1 if q in by_quadrant else 0 for q in QUADRANTS]
        + [BACKGROUNDS.index(row["background"]), len(row["objects"])]
    )
    return torch.tensor(labels)


class PatchHead(torch.nn.Module):
    """Linear read-outs of the encoder's patch features; discarded after pretraining."""

    def __init__(self, width: int, background_weight: float = 0.0, scene_weight: float = 0.0):
        super().__init__()
        self.background_weight = background_weight
        self.scene_weight = scene_weight
        self.colour = torch.nn.Linear(width, len(COLOURS) + 1)
        self.shape = torch.nn.Linear(width, len(SHAPES) + 1)
        self.position = torch.nn.Linear(width, 2)
        # Created only when used, so that the default draws the same random numbers as before it existed.
        self.background = torch.nn.Linear(width, len(BACKGROUNDS)) if background_weight else None
        self.scene = torch.nn.Linear(width, sum(n for _, n in SCENE_SLOTS)) if scene_weight else None

    def loss(self, features: torch.Tensor, labels: PatchLabels, image_of_patch: torch.Tensor,
             backgrounds: torch.Tensor | None = None, scenes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """`features` (N, D) of all patches of a batch; `image_of_patch` (N,) image index of each
        patch; `backgrounds` (B,) each image's `BACKGROUNDS` index (needed with `background_weight`);
        `scenes` (B, S) each image's `scene_labels` (needed with `scene_weight`)."""
        colour, shape = self.colour(features), self.shape(features)
        # Each shape's patches averaged: one patch sees a corner or an edge, the set sees the shape,
        # and an average over a shape's tokens is what an LLM attention head reads out.
        objects = image_of_patch * (len(COLOURS) + 1) + labels.colour  # (N,) one id per (image, colour)
        ids, member = objects.unique(return_inverse=True)
        pooled = features.new_zeros(len(ids), features.shape[1]).index_add_(0, member, features)  # (O, D)
        pooled = pooled / torch.bincount(member, minlength=len(ids))[:, None]
        object_shape = labels.shape.new_zeros(len(ids)).index_put_((member,), labels.shape)  # (O,)
        is_shape = object_shape > 0
        pooled_shape = self.shape(pooled[is_shape])
        loss = (
            F.cross_entropy(colour, labels.colour)
            + F.cross_entropy(shape, labels.shape)
            + F.cross_entropy(pooled_shape, object_shape[is_shape])
        )
        if labels.position is not None:
            loss = loss + 10 * F.mse_loss(self.position(features), labels.position)
        metrics = {
            "colour": (colour.argmax(1) == labels.colour).float().mean().item(),
            "shape_of_patch": (shape.argmax(1) == labels.shape)[labels.shape > 0].float().mean().item(),
            "shape_of_object": (pooled_shape.argmax(1) == object_shape[is_shape]).float().mean().item(),
        }
        if self.background_weight:
            if backgrounds is None:
                raise ValueError("backgrounds: needed when background_weight is set (one style index per image)")
            # The style is a texture: one background patch sees a piece of a stripe, all of them the stripes.
            is_background = labels.colour == 0
            images = len(backgrounds)
            mean = features.new_zeros(images, features.shape[1]).index_add_(
                0, image_of_patch[is_background], features[is_background])  # (B, D)
            mean = mean / torch.bincount(image_of_patch[is_background], minlength=images).clamp(min=1)[:, None]
            background = self.background(mean)  # (B, styles)
            loss = loss + self.background_weight * F.cross_entropy(background, backgrounds)
            metrics["background"] = (background.argmax(1) == backgrounds).float().mean().item()
        if self.scene_weight:
            if scenes is None:
                raise ValueError("scenes: needed when scene_weight is set (one `scene_labels` row per image)")
            # Every patch reads out the whole scene, so that any mix of an image's tokens an LLM
            # attention head takes carries which colour, kind and quadrant belong together.
            target = scenes[image_of_patch]  # (N, S)
            logits = self.scene(features).split([n for _, n in SCENE_SLOTS], dim=1)  # S x (N, classes)
            losses = [F.cross_entropy(slot, target[:, i]) for i, slot in enumerate(logits)]
            loss = loss + self.scene_weight * torch.stack(losses).mean()
            right = torch.stack([slot.argmax(1) == target[:, i] for i, slot in enumerate(logits)], 1)  # (N, S)
            metrics["scene"] = right.float().mean().item()
            metrics["scene_all"] = right.all(1).float().mean().item()
        return loss, metrics


def load_rows(path: Path, data_root: Path, processor, patch: int,
              limit: int | None = None) -> list[tuple[dict, PatchLabels, dict]]:
    """Each image's processor inputs (computed once), patch labels and `vision.jsonl` row; the first
    `limit` rows only, when given (no other image is opened)."""
    rows = []
    for line in Path(path).read_text().splitlines()[:limit]:
        row = json.loads(line)
        image = Image.open(data_root / row["image"]).convert("RGB")
        kinds = {o["colour"]: o["shape"] for o in row["objects"]}
        # merge_size 1: the encoder's output is then one feature per patch in raster order.
        inputs = processor.image_processor([image], merge_size=1, return_tensors="pt")
        rows.append((inputs, patch_labels(np.asarray(image), kinds, patch), row))
    return rows


def load_stills(data_root: Path, frames: str | None, weight: float, processor) -> list[tuple[dict, np.ndarray, dict]]:
    """Each video still's processor inputs (merge size 1), pixels and row, from the `frames.jsonl`
    rows file `frames` under `data_root` (`curriculum.generate(video_frames=True)`); none when
    `weight` is 0."""
    if not weight:
        return []
    if not (frames and (data_root / frames).is_file()):
        raise ValueError(f"frames={frames!r}: frame_weight={weight} needs the stills' rows file under {data_root} "
                         "(frames.jsonl, written by curriculum.generate(video_frames=True))")
    stills = []
    for line in (data_root / frames).read_text().splitlines():
        row = json.loads(line)
        image = Image.open(data_root / row["image"]).convert("RGB")
        inputs = processor.image_processor([image], merge_size=1, return_tensors="pt")
        stills.append((inputs, np.asarray(image), row))
    return stills


def check_still(row: dict, pixels: np.ndarray, patch: int) -> None:
    """A still must be a video frame as the processor serves it: `VIDEO_SIZE` px, `VIDEO_GRID`
    merged tokens a side."""
    if pixels.shape[:2] != (VIDEO_SIZE, VIDEO_SIZE) or 2 * patch * VIDEO_GRID != VIDEO_SIZE:
        raise ValueError(f"{row.get('image')}: a still of {pixels.shape[1]}x{pixels.shape[0]} px in {patch} px patches; "
                         f"stills are video frames of {VIDEO_SIZE} px, {VIDEO_GRID} merged tokens a side")


def block_labels(row: dict, pixels: np.ndarray, patch: int) -> PatchLabels:
    """Colour and kind of each 2x2-merged token of a video still (`curriculum.frame_row`), raster
    order, by what covers its `2 * patch` px block (`index_labels`); no positions."""
    check_still(row, pixels, patch)
    labels = index_labels(palette_index(pixels), {o["colour"]: o["shape"] for o in row["objects"]}, 2 * patch)
    return PatchLabels(labels.colour, labels.shape, None)


def shift_bounds(index: np.ndarray, most: int) -> tuple[int, int, int, int]:
    """`(low_y, high_y, low_x, high_x)`: the shifts, at most `most` px either way, by which an image
    with `palette_index` map `index` can be rolled without a shape crossing its border."""
    ys, xs = np.nonzero(index)
    if len(ys) == 0:
        return -most, most, -most, most
    height, width = index.shape
    return (max(-most, -int(ys.min())), min(most, height - 1 - int(ys.max())),
            max(-most, -int(xs.min())), min(most, width - 1 - int(xs.max())))


def shifted_entry(entry, pixels: np.ndarray, index: np.ndarray, most: int, rng: np.random.Generator, processor,
                  patch: int):
    """The `load_rows` entry of an image rolled by a random shift within `shift_bounds`, labels
    recomputed from the rolled pixels. Only the background wraps round (its texture shows a seam);
    the shapes move whole."""
    inputs, _, row = entry
    low_y, high_y, low_x, high_x = shift_bounds(index, most)
    dy, dx = int(rng.integers(low_y, high_y + 1)), int(rng.integers(low_x, high_x + 1))
    rolled = np.roll(pixels, (dy, dx), axis=(0, 1))  # (H, W, 3)
    kinds = {o["colour"]: o["shape"] for o in row["objects"]}
    labels = index_labels(np.roll(index, (dy, dx), axis=(0, 1)), kinds, patch)
    moved = dict(inputs, pixel_values=processor.image_processor.to_patches(rolled[None], 1))  # (N, 3*P*P)
    return moved, labels, row


def batch_inputs(chosen, device="cpu") -> dict:
    """The encoder's inputs of the `load_rows` entries in `chosen`, concatenated, on `device`."""
    return {key: torch.cat([x[key] for x, *_ in chosen]).to(device) for key in ("pixel_values", "grid_sizes", "merge_sizes")}


def warmup_cosine(optimizer, steps: int):
    """Linear warm-up over the first 5% of `steps`, then cosine decay to zero."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + np.cos(np.pi * min(1.0, s / max(1, steps))))))


def pretrain_vision(model, processor, vision_rows: Path, data_root: Path, *, steps: int, batch: int, lr: float,
                    seed: int = 0, background_weight: float = 0.0, scene_weight: float = 0.0, shift: int = 0,
                    frames: str | None = None, frame_weight: float = 0.0, device: str = "cpu") -> list[float]:
    """Train `model.model.vision_encoder` in place on dense patch labels (and, with
    `background_weight`, each image's background style; with `scene_weight`, the whole scene from
    every patch) on `device`; returns the loss curve.

    `shift`: each image of a batch is rolled by a fresh random shift of at most that many pixels
    either way that keeps its shapes whole (`shifted_entry`). The curriculum's 84 px images leave a
    shape 1-4 px of play in its quadrant, so without it every shape's centre lies near the middle
    of a patch, while video shapes lie anywhere; at 7 (half a patch) every phase is reached where
    the image leaves its shapes room. Images must already be at a size the processor keeps.

    `frames` (a `frames.jsonl` under `data_root`, `curriculum.generate(video_frames=True)`) with
    `frame_weight`: each step also takes `batch // 2` video stills and trains the same read-outs
    (colour and kind per token and per shape, the background's style) on their 2x2-merged tokens
    (`block_labels`), with this weight: the tokens a served video frame has. Video shapes lie at
    any phase of the 28 px merged grid, which the images never show. The recipe runs it as a
    second pass (its `stills` step) after the images alone; mixed in from the first step, the
    64-wide encoder kept neither the images' patch kinds nor the stills' well."""
    if shift < 0:
        raise ValueError(f"shift={shift}: the largest shift in pixels must be >= 0")
    encoder = model.model.vision_encoder
    patch = encoder.config.patch_size
    rows = load_rows(vision_rows, data_root, processor, patch)
    images = []
    for inputs, _, row in rows if shift else ():
        pixels = np.asarray(Image.open(data_root / row["image"]).convert("RGB"))
        served = tuple(patch * n for n in inputs["grid_sizes"][0, 1:].tolist())
        if pixels.shape[:2] != served:
            raise ValueError(f"{row['image']}: {pixels.shape[1]}x{pixels.shape[0]} px, but the processor serves it at "
                             f"{served[1]}x{served[0]}; shift rolls the pixels as they are, so images must be at a served size")
        images.append((pixels, palette_index(pixels)))
    stills = [(inputs, block_labels(row, pixels, patch), row)
              for inputs, pixels, row in load_stills(data_root, frames, frame_weight, processor)]
    torch.manual_seed(seed)
    head = PatchHead(encoder.config.hidden_size, background_weight, scene_weight).to(device)
    encoder.to(device)
    parameters = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    rng = random.Random(seed)
    shifts = np.random.default_rng(seed + 1)  # its own stream: the images drawn are the same as without
    still_rng = random.Random(seed + 2)  # its own stream too
    encoder.train()
    losses = []
    for step in range(steps):
        picked = rng.sample(range(len(rows)), min(batch, len(rows)))
        chosen = [shifted_entry(rows[i], *images[i], shift, shifts, processor, patch) if shift else rows[i] for i in picked]
        inputs = batch_inputs(chosen, device)
        features = encoder(inputs["pixel_values"], inputs["grid_sizes"], inputs["merge_sizes"])  # (N, D)
        labels = PatchLabels(*(torch.cat([getattr(lab, f) for _, lab, _ in chosen]).to(device)
                               for f in ("colour", "shape", "position")))
        image_of_patch = torch.cat([torch.full((len(lab.colour),), i) for i, (_, lab, _) in enumerate(chosen)]).to(device)  # (N,)
        backgrounds = None
        if background_weight:
            backgrounds = torch.tensor([BACKGROUNDS.index(row["background"]) for *_, row in chosen], device=device)  # (B,)
        scenes = torch.stack([scene_labels(row) for *_, row in chosen]).to(device) if scene_weight else None  # (B, S)
        loss, metrics = head.loss(features, labels, image_of_patch, backgrounds, scenes)
        if stills:
            picked = [stills[i] for i in still_rng.sample(range(len(stills)), min(max(1, batch // 2), len(stills)))]
            frame_inputs = batch_inputs(picked, device)
            frame_features = encoder(frame_inputs["pixel_values"], frame_inputs["grid_sizes"], frame_inputs["merge_sizes"])  # (N_f, D)
            blocks = merge_blocks(frame_features, [tuple(g) for g in frame_inputs["grid_sizes"].tolist()])  # (N_f / 4, D)
            merged_labels = PatchLabels(*(torch.cat([getattr(lab, f) for _, lab, _ in picked]).to(device)
                                          for f in ("colour", "shape")), None)
            image_of_block = torch.cat([torch.full((len(lab.colour),), i) for i, (_, lab, _) in enumerate(picked)]).to(device)  # (N_f / 4,)
            frame_backgrounds = None
            if background_weight:
                frame_backgrounds = torch.tensor([BACKGROUNDS.index(row["background"]) for *_, row in picked], device=device)  # (B_f,)
            frame_loss, frame_metrics = head.loss(blocks, merged_labels, image_of_block, frame_backgrounds)
            loss = loss + frame_weight * frame_loss
            metrics.update({f"frame_{k}": v for k, v in frame_metrics.items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info("vision pretraining step %d: loss %.3f, %s", step, loss.item(),
                        {k: round(v, 3) for k, v in metrics.items()})
    return losses


def word_targets(row: dict, labels: PatchLabels, embed) -> torch.Tensor:
    """`(N, D)`: per patch, the sum of the LLM's embeddings of the words naming what covers it.

    A shape's patch: its colour, its kind and its quadrant ("red" + "square" + "top" + "left"); a
    background patch: the background style ("striped").
    """
    objects = {o["colour"]: o for o in row["objects"]}
    names = list(COLOURS)
    targets = []
    for colour in labels.colour.tolist():
        if colour:
            o = objects[names[colour - 1]]
            targets.append(embed(o["colour"]) + embed(o["shape"]) + embed(o["quadrant"]))
        else:
            targets.append(embed(row["background"]))
    return torch.stack(targets)  # (N, D)


def merge_blocks(x: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
    """`(N, D)` per-patch rows of images in raster order -> `(N / 4, D)`: the mean of each 2x2 block,
    which is what the encoder's factor-2 bilinear merge (video frames) computes from the same patches."""
    blocks = []
    for item, (t, h, w) in zip(x.split([t * h * w for t, h, w in grids]), grids):
        if h % 2 or w % 2:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): merging 2x2 blocks needs an even number of patch rows and columns")
        blocks.append(item.view(t, h // 2, 2, w // 2, 2, -1).mean((2, 4)).reshape(t * h * w // 4, -1))  # (t*h*w/4, D)
    return torch.cat(blocks)  # (N / 4, D)


def frame_block_targets(row: dict, pixels: np.ndarray, embed, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a video still (`curriculum.frame_row`): which 2x2-merged tokens a shape covers at all,
    `(N / 4,)` bool in raster order, and for those the sum of the LLM's embeddings of the shape's
    colour and kind and of the token's own quadrant, `(M, D)`: how `scene_pretrain` lays out
    a served video's tokens (`clip_tokens`), so a merged token is pulled to the scene token the LLM
    learnt to read."""
    check_still(row, pixels, patch)
    counts = block_counts(palette_index(pixels), 2 * patch)  # (N / 4, C) pixels of each palette colour
    covered = counts.sum(1) > 0
    objects = {o["colour"]: o for o in row["objects"]}
    names, targets = list(COLOURS), []
    for block in np.flatnonzero(covered):
        o = objects[names[int(counts[block].argmax())]]
        targets.append(embed(o["colour"]) + embed(o["shape"]) + embed(block_quadrant(int(block))))
    return torch.from_numpy(covered), torch.stack(targets)  # (N / 4,), (M, D)


def align_projector(model, processor, vision_rows: Path, data_root: Path, *, steps: int, batch: int, lr: float,
                    seed: int = 0, merged_weight: float = 0.0, frames: str | None = None, frame_weight: float = 0.0,
                    device: str = "cpu") -> list[float]:
    """Train the encoder (at lr / 10) and the projector in place so each visual token is the LLM's
    embedding of the words naming what covers its patch (`word_targets`); returns the loss curve.

    The stand-in for SigLIP's language alignment: SigLIP's features already sit near the text that
    describes them, while the tiny encoder's features, however well they separate colours and
    shapes, start in no relation to the LLM's words. The recipe's LLM learnt its lookups on tokens
    that are sums of its word embeddings (`scene_pretrain`), so once the visual tokens are
    such sums it answers questions about images as it did about scenes. The recipe runs this after
    stage 1, whose captions through the frozen LLM would otherwise pull the tokens away from the
    words.

    `merged_weight`: also align the tokens of 2x2-merged patches (how video frames are served) that
    a shape covers in part to the mean of their four patches' word sums, with this weight; otherwise
    only merge size 1 is trained and a merged token is whatever the projector makes of a mean
    feature. Merged blocks of background alone are left out: videos are never asked about the
    background, and pulling a block's mean feature to its style word cost the single patches theirs.

    `frames` (a `frames.jsonl` under `data_root`, `curriculum.generate(video_frames=True)`) with
    `frame_weight`: each step also takes `batch // 2` video stills and pulls their shape-covered
    merged tokens to `frame_block_targets`, with this weight. Video shapes lie at any patch phase
    and size, which the images never show.
    """
    model.to(device)
    encoder, projector = model.model.vision_encoder, model.model.mm_projector
    embeddings = model.get_input_embeddings().weight.detach()
    tokenizer = processor.tokenizer
    cache = {}

    def embed(text: str) -> torch.Tensor:
        if text not in cache:
            cache[text] = embeddings[tokenizer(" " + text, add_special_tokens=False)["input_ids"]].sum(0)  # (D,)
        return cache[text]

    rows = load_rows(vision_rows, data_root, processor, encoder.config.patch_size)
    targets = [word_targets(row, labels, embed) for _, labels, row in rows]
    # Per image, once: the merged blocks a shape covers in part and their targets (`merged_weight`).
    merged_targets = []
    for (inputs, labels, _), target in zip(rows, targets) if merged_weight else ():
        grids = [tuple(g) for g in inputs["grid_sizes"].tolist()]
        covered = merge_blocks((labels.colour > 0).float()[:, None], grids)[:, 0] > 0  # (N / 4,)
        merged_targets.append((covered, merge_blocks(target, grids)[covered]))  # (N / 4,), (M, D_t)
    stills = [(inputs, *frame_block_targets(row, pixels, embed, encoder.config.patch_size))
              for inputs, pixels, row in load_stills(data_root, frames, frame_weight, processor)]
    scale = embeddings.var()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([{"params": encoder.parameters(), "lr": lr / 10},
                                   {"params": projector.parameters(), "lr": lr}], weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    rng = random.Random(seed)
    still_rng = random.Random(seed + 1)  # its own stream: the images drawn are the same as without stills
    order = list(range(len(rows)))
    encoder.train()
    losses = []
    for step in range(steps):
        chosen = rng.sample(order, min(batch, len(order)))
        inputs = batch_inputs([rows[i] for i in chosen], device)
        features = encoder(inputs["pixel_values"], inputs["grid_sizes"], inputs["merge_sizes"])  # (N, D_v)
        target = torch.cat([targets[i] for i in chosen])  # (N, D_t)
        loss = F.mse_loss(projector(features), target) / scale
        if merged_weight:
            grids = [tuple(g) for g in inputs["grid_sizes"].tolist()]
            shape = torch.cat([merged_targets[i][0] for i in chosen]).to(device)  # (N / 4,)
            merged = projector(merge_blocks(features, grids)[shape])  # (M, D_t)
            merged_target = torch.cat([merged_targets[i][1] for i in chosen]).to(device)  # (M, D_t)
            loss = loss + merged_weight * F.mse_loss(merged, merged_target) / scale
        if stills:
            picked = [stills[i] for i in still_rng.sample(range(len(stills)), min(max(1, batch // 2), len(stills)))]
            frame_inputs = batch_inputs(picked, device)
            frame_features = encoder(frame_inputs["pixel_values"], frame_inputs["grid_sizes"], frame_inputs["merge_sizes"])  # (N_f, D_v)
            grids = [tuple(g) for g in frame_inputs["grid_sizes"].tolist()]
            covered = torch.cat([c for _, c, _ in picked]).to(device)  # (N_f / 4,)
            merged = projector(merge_blocks(frame_features, grids)[covered])  # (M_f, D_t)
            frame_target = torch.cat([t for *_, t in picked]).to(device)  # (M_f, D_t)
            loss = loss + frame_weight * F.mse_loss(merged, frame_target) / scale
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(encoder.parameters()) + list(projector.parameters()), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info("projector alignment step %d: loss %.3f", step, loss.item())
    return losses


BALANCE_SLOTS = {"colour": len(COLOURS), "kind": len(SHAPES), "quadrant": len(QUADRANTS), "background": len(BACKGROUNDS)}


def balance_projector(model, processor, vision_rows: Path, data_root: Path, *, images: int, residual: float,
                      ridge: float = 1e-2, seed: int = 0, device: str = "cpu") -> dict:
    """Fold a linear map into the projector's first Linear that re-expresses each encoder feature as
    clean, equally weighted codes of what covers its patch, plus a shrunk residual (`balance_map`),
    from the first `images` rows of `vision_rows`. The model stays a VideoLLaMA3 projector; nothing
    is added.

    After vision pretraining kind dominates the encoder's features of shape patches and the
    quadrant has almost no share; balancing gives each its part. It helped positions after stage 2
    but not the whole recipe, which leaves it off (docs/experiments.md). Returns the read-out
    accuracies and the variance shares before and after.
    """
    if images < 1:
        raise ValueError(f"images={images}: the read-out needs at least one image")
    model.to(device)
    encoder = model.model.vision_encoder
    rows = load_rows(vision_rows, data_root, processor, encoder.config.patch_size, limit=images)
    features, classes = [], []
    encoder.eval()
    with torch.no_grad():
        for inputs, labels, row in rows:
            inputs = batch_inputs([(inputs,)], device)
            features.append(encoder(inputs["pixel_values"], inputs["grid_sizes"], inputs["merge_sizes"]).double().cpu())  # (N, D)
            quadrant = (labels.position[:, 0] >= 0.5).long() * 2 + (labels.position[:, 1] >= 0.5).long()  # (N,)
            background = torch.where(labels.colour == 0, BACKGROUNDS.index(row["background"]) + 1, 0)  # (N,)
            classes.append(torch.stack([labels.colour, labels.shape, quadrant + 1, background], 1))  # (N, 4)
    fold, mean, report = balance_map(torch.cat(features), torch.cat(classes), residual=residual, ridge=ridge, seed=seed)
    fold_into_linear(model.model.mm_projector.readout[0], fold, mean)
    logger.info("projector balanced: %s", report)
    return report


def balance_map(x: torch.Tensor, classes: torch.Tensor, *, residual: float, ridge: float = 1e-2, seed: int = 0):
    """The map of `balance_projector` from patch features `x` (P, D) and their `classes` (P, 4):
    colour, kind, quadrant and background style as 1-based indices, 0 where the slot does not apply.

    A ridge read-out `B` (16, D) of the slots' one-hot codes goes through fixed orthonormal codes
    `G` (D, 16): x' = M (x - mu) + mu with M = s (G B + residual I), s keeping the total variance.
    `residual` weighs the centred features against one-hot codes of norm 1, so its effect depends
    on the features' scale (0.2 suits the tiny encoder). Returns `(M (D, D), mu (D,), report)`.
    """
    if residual < 0:
        raise ValueError(f"residual={residual}: must be >= 0 (the share of the original features kept)")
    if x.shape[1] < sum(BALANCE_SLOTS.values()):
        raise ValueError(f"features of width {x.shape[1]}: need at least {sum(BALANCE_SLOTS.values())} (one code each)")
    x = x.double()
    t = torch.cat([F.one_hot(classes[:, i], n + 1)[:, 1:] for i, n in enumerate(BALANCE_SLOTS.values())], 1).double()  # (P, 16)
    mu = x.mean(0)
    xc, tc = x - mu, t - t.mean(0)
    eye = torch.eye(x.shape[1], dtype=torch.double)
    readout = torch.linalg.solve(xc.T @ xc + ridge * xc.var(0).sum() * eye, xc.T @ tc).T  # (16, D)
    codes = torch.linalg.qr(torch.randn(x.shape[1], t.shape[1], dtype=torch.double,
                                        generator=torch.Generator().manual_seed(seed)))[0]  # (D, 16)
    fold = codes @ readout + residual * eye  # (D, D)
    fold = fold * (xc.var(0).sum() / (xc @ fold.T).var(0).sum()).sqrt()
    predicted = (xc @ readout.T).split(list(BALANCE_SLOTS.values()), 1)
    report = {"readout": {}, "shares_before": variance_shares(xc, classes), "shares_after": variance_shares(xc @ fold.T, classes)}
    for i, (name, scores) in enumerate(zip(BALANCE_SLOTS, predicted)):
        applies = classes[:, i] > 0
        report["readout"][name] = round((scores[applies].argmax(1) + 1 == classes[applies, i]).double().mean().item(), 3)
    return fold, mu, report


def fold_into_linear(linear: torch.nn.Linear, fold: torch.Tensor, mu: torch.Tensor) -> None:
    """Make `linear(x)` compute the old `linear(fold @ (x - mu) + mu)`, in place."""
    with torch.no_grad():
        weight = linear.weight.double().cpu()
        linear.bias.copy_((linear.bias.double().cpu() + weight @ (mu - fold @ mu)).float())
        linear.weight.copy_((weight @ fold).float())


def variance_shares(features: torch.Tensor, classes: torch.Tensor) -> dict:
    """Share of the variance of shape patches' `features` (P, D) explained by their colour, kind and
    quadrant (`classes` (P, 4) as in `balance_map`)."""
    shape = classes[:, 0] > 0
    z = features[shape] - features[shape].mean(0)
    shares = {}
    for i, name in enumerate(("colour", "kind", "quadrant")):
        _, which = classes[shape, i].unique(return_inverse=True)
        means = torch.zeros(int(which.max()) + 1, z.shape[1], dtype=z.dtype).index_add_(0, which, z)
        means = means / torch.bincount(which)[:, None]
        shares[name] = round((means[which].var(0).sum() / z.var(0).sum()).item(), 3)
    return shares
