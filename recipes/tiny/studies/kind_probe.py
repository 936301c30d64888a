"""How much of a video shape's kind a model's vision tokens keep, before the LLM reads them.

    python -m recipes.tiny.studies.kind_probe                 # ./tiny_model, 2400 stills (about 15 s on 2 cores)
    python -m recipes.tiny.studies.kind_probe --model /tmp/t/served --stills 600

`demo_sweep` shows where the whole model misnames the demo clip's shape; this measures the
vision side alone, in a minute instead of a recipe run. It draws stills of the curriculum's video
world (`curriculum.video_event`: a clip's actor at a random shown frame, its static distractor when
it has one, on the clip's background), encodes each as the model serves video frames (2x2-merged
tokens, `merge_size` 2), and takes per still the mean of the merged tokens the actor covers, from
the vision encoder and after the projector. A linear read-out of the actor's kind (circle, square,
triangle) is fit on the first 70% of the stills and scored on the rest, overall and by where the
actor's centre lies on the 28 px grid of merged tokens (its phase): a shape that fills one merged
token lies at phase 14, one split evenly between two at phase 0.

An LLM that attends to a shape's tokens reads about what such a read-out reads, so a low score
puts the misnamed kinds on the vision side.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from recipes.tiny import curriculum
from tools.evaluate_default import load
from tools.local import REPO_ROOT
from recipes.tiny.scene_pretrain import VIDEO_GRID
from recipes.tiny.vision_pretrain import block_counts, palette_index

MERGED = curriculum.VIDEO_SIZE // VIDEO_GRID  # px a side of a video frame's merged token (14 px patches, merged 2x2)
BANDS = 4  # phase bands reported, MERGED / BANDS px each
TRAIN_SHARE = 0.7


def draw_still(rng: np.random.Generator) -> tuple[np.ndarray, curriculum.Shape, tuple[float, float]]:
    """One still of a random clip (`curriculum.video_event`): `(pixels (H, W, 3) uint8, the actor,
    its centre (x, y))`, the actor at a random frame where it is shown."""
    canvas, event, seconds = curriculum.draw_clip_plan(rng)
    frames = seconds * curriculum.VIDEO_FPS
    shown = curriculum.shown_frames(event, frames)
    centre = curriculum.actor_centre(event, shown[int(rng.integers(len(shown)))], frames)
    pixels = curriculum.draw_shape(curriculum.with_distractor(canvas, event), event["shape"], *centre, event["radius"])
    return pixels, event["shape"], centre


def covered_tokens(pixels: np.ndarray, colour: str) -> np.ndarray:
    """`(tokens,)` bool in raster order: the merged tokens holding at least one pixel of `colour`."""
    counts = block_counts(palette_index(pixels), MERGED)  # (tokens, C) pixels of each palette colour
    return counts[:, list(curriculum.COLOURS).index(colour)] > 0


def linear_probe(features: torch.Tensor, labels: torch.Tensor, train: int, classes: int, iterations: int = 300) -> torch.Tensor:
    """Fit multinomial logistic regression (standardised features, a little L2) on the first `train`
    rows of `features` (S, D); returns `(S - train,)` bool: each held-out row read right."""
    if not 0 < train < len(features):
        raise ValueError(f"train={train}: must leave rows both to fit and to score among {len(features)}")
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-6
    z = (features - mean) / std  # (S, D)
    weight = torch.zeros(z.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z[:train] @ weight + bias, labels[:train]) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (z[train:] @ weight + bias).argmax(1) == labels[train:]  # (S - train,)


def probe(model_path: str, stills: int = 2400, seed: int = 5, batch_size: int = 64, device: str = "cpu") -> dict:
    """`{"encoder": report, "projector": report}`, each report `{"all": accuracy, "phase a-b": ...}`
    over the held-out stills (`linear_probe`), bands of the actor centre's vertical phase."""
    if stills < 10:
        raise ValueError(f"stills={stills}: at least 10 are needed to fit and to score a read-out")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, processor = load(model_path, device)
    encoder, projector = model.model.vision_encoder, model.model.mm_projector
    if 2 * encoder.config.patch_size != MERGED:
        raise ValueError(f"{model_path}: {encoder.config.patch_size} px patches; the curriculum's video frames are "
                         f"served in {MERGED // 2} px patches, {MERGED} px merged tokens")
    rng = np.random.default_rng(seed)
    drawn = [draw_still(rng) for _ in range(stills)]
    kinds = torch.tensor([curriculum.SHAPES.index(shape.kind) for _, shape, _ in drawn])  # (S,)
    phases = np.array([centre[1] % MERGED for _, _, centre in drawn])  # (S,)
    pooled = {"encoder": [], "projector": []}
    with torch.no_grad():
        for first in range(0, stills, batch_size):
            chunk = drawn[first:first + batch_size]
            inputs = processor.image_processor([Image.fromarray(p) for p, _, _ in chunk], merge_size=2,
                                               return_tensors="pt").to(device)
            tokens = encoder(inputs["pixel_values"], inputs["grid_sizes"], inputs["merge_sizes"])  # (B * T, D_v)
            for name, x in (("encoder", tokens), ("projector", projector(tokens))):  # (B * T, D)
                x = x.view(len(chunk), -1, x.shape[-1]).cpu()  # (B, T, D)
                for item, (pixels, shape, _) in zip(x, chunk):
                    mask = torch.from_numpy(covered_tokens(pixels, shape.colour))  # (T,)
                    pooled[name].append(item[mask].mean(0))  # (D,)
    train = int(TRAIN_SHARE * stills)
    held_out = phases[train:]
    report = {}
    for name, rows in pooled.items():
        right = linear_probe(torch.stack(rows), kinds, train, len(curriculum.SHAPES)).float()  # (S - train,)
        report[name] = {"all": right.mean().item()}
        width = MERGED // BANDS
        for low in range(0, MERGED, width):
            band = torch.from_numpy((held_out >= low) & (held_out < low + width))
            report[name][f"phase {low}-{low + width - 1}"] = right[band].mean().item() if band.any() else float("nan")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description="Linear read-out of video shapes' kinds from a model's vision tokens.")
    parser.add_argument("--model", default=str(REPO_ROOT / "tiny_model"))
    parser.add_argument("--stills", type=int, default=2400, help="stills drawn; 70%% fit the read-out, 30%% score it")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    args = parser.parse_args(argv)
    report = probe(args.model, args.stills, args.seed, device=args.device)
    print(f"kind read from the merged tokens an actor covers, {args.stills - int(TRAIN_SHARE * args.stills)} held-out stills "
          f"(bands: the centre's vertical phase on the {MERGED} px merged grid)")
    for name, scores in report.items():
        print(f"{name:9s} " + "  ".join(f"{band} {score:.1%}" for band, score in scores.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
