"""Evaluate a (tiny) VideoLLaMA3 checkpoint on a held-out synthetic shapes set.

    python -m tools.evaluate_default                       # ./tiny_model, 150 images, 60 videos
    python -m tools.evaluate_default --model /tmp/t --images 20 --videos 10
    python -m tools.evaluate_default --seed 20240918                # a second held-out set

The held-out set comes from `recipes.tiny.curriculum` with a seed the recipe never trains on. The
checkpoint is loaded the way users load it (`AutoModelForCausalLM` / `AutoProcessor` with
`trust_remote_code=True`), questions go through the processor's chat template, answers are greedy.

Scores:
* image questions (colour, shape, count, position, caption): exact match;
* video questions (what appears / moves, direction): exact match; temporal grounding ("When
  does the red circle appear?"): correct when both ends of the parsed span are within 1 s;
* DiffFP: the share of video tokens the processor's Differential Frame Pruner removes on the
  held-out videos (kept `<image>` tokens vs. merged tokens before pruning).
Targets: image >= 90 %, video >= 70 %, pruned >= 50 %.
"""

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from recipes.tiny import curriculum
from tools.local import REPO_ROOT
from tools.spans import parse_span

HELD_OUT_SEED = 20240917
TARGETS = {"image": 0.90, "video": 0.70, "pruned": 0.50}
TEMPORAL_TOLERANCE_S = 1.0


def load(model_path: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    return model, processor


def messages_of(row: dict, data_dir: Path) -> tuple[list[dict], str]:
    """An eval row (official format, one turn) as chat messages plus the reference answer."""
    question = row["conversations"][0]["value"].split("\n", 1)[-1]
    answer = row["conversations"][1]["value"]
    content = []
    if "image" in row:
        content.append({"type": "image", "image": str(data_dir / row["image"][0])})
    if "video" in row:
        content.append({"type": "video", "video": str(data_dir / row["video"][0])})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}], answer


def answer_style(rows: list[dict]) -> str | None:
    """The answer style a held-out set was written in (`curriculum.ANSWER_STYLES`); None without image rows.

    Only restated sets ask "What colour is each shape?" (kind "colours"), once per image.
    """
    kinds = {row["kind"] for row in rows if row["modality"] == "image"}
    if not kinds:
        return None
    return "restated" if "colours" in kinds else "short"


def is_correct(kind: str, prediction: str, reference: str) -> bool:
    if kind == "when":
        try:
            (start, end), (ref_start, ref_end) = parse_span(prediction), parse_span(reference)
        except ValueError:
            return False
        return abs(start - ref_start) <= TEMPORAL_TOLERANCE_S and abs(end - ref_end) <= TEMPORAL_TOLERANCE_S
    return prediction.strip() == reference.strip()


@torch.no_grad()
def answer_batch(model, processor, conversations: list[list[dict]], max_new_tokens: int = 40) -> tuple[list[str], dict]:
    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    ).to(model.device)
    prompt_length = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.post_process_image_text_to_text(output[:, prompt_length:], skip_special_tokens=True)
    stats = {}
    if "compression_mask" in inputs:
        stats = {"kept": int(inputs["compression_mask"].sum()), "total": int(inputs["compression_mask"].numel())}
    return [t.strip() for t in texts], stats


def evaluate(model_path: str, images: int = 150, videos: int = 60, batch_size: int = 16, seed: int = HELD_OUT_SEED,
             data_dir: str | None = None, verbose: bool = False, answers: str = "short", device: str = "cpu") -> dict:
    """Generate the held-out set (unless `data_dir` already holds it), answer every question, score.

    `answers`: the style of the image answers the model was trained on (`curriculum.ANSWER_STYLES`).
    `device`: where the model answers ("cpu", "cuda"); the held-out set and its scores do not depend on it.
    """
    torch.set_num_threads(min(2, torch.get_num_threads()))
    scratch = None
    if data_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="videollama3-eval-")
        data_dir = scratch.name
    data = Path(data_dir)
    if not (data / "eval.jsonl").exists():
        curriculum.generate(data, seed=seed, images=images, videos=videos, texts=0, answers=answers,
                            workers=torch.get_num_threads())
    rows = [json.loads(line) for line in open(data / "eval.jsonl")]
    if not rows:
        raise ValueError(f"{data / 'eval.jsonl'}: no held-out questions to answer (images={images}, videos={videos})")
    style = answer_style(rows)
    if style not in (None, answers):
        # Scored against the other style, every image answer would count as wrong.
        raise ValueError(f"data_dir {data}: its held-out set has {style} answers, but answers={answers!r} was asked "
                         "(pass the style the set was written in, or an empty folder)")
    model, processor = load(model_path, device)

    per_kind = defaultdict(list)
    pruning = {"kept": 0, "total": 0}
    mistakes = []
    start = time.time()
    for modality in ("image", "video"):
        subset = [r for r in rows if r["modality"] == modality]
        for first in range(0, len(subset), batch_size):
            batch = subset[first:first + batch_size]
            pairs = [messages_of(r, data) for r in batch]
            predictions, stats = answer_batch(model, processor, [m for m, _ in pairs])
            if modality == "video":
                pruning["kept"] += stats["kept"]
                pruning["total"] += stats["total"]
            for row, (_, reference), prediction in zip(batch, pairs, predictions):
                ok = is_correct(row["kind"], prediction, reference)
                per_kind[(modality, row["kind"])].append(ok)
                if not ok:
                    mistakes.append((modality, row["kind"], prediction, reference))
    # Only what the set asks is scored: a set without images (`images=0`) has no image score, not 0%.
    scores = {}
    for modality in ("image", "video"):
        answered = [ok for (m, _), v in per_kind.items() if m == modality for ok in v]
        if answered:
            scores[modality] = sum(answered) / len(answered)
    if pruning["total"]:
        scores["pruned"] = 1 - pruning["kept"] / pruning["total"]
    result = {
        "scores": scores,
        "per_kind": {f"{m}/{k}": (sum(v), len(v)) for (m, k), v in sorted(per_kind.items())},
        "video_tokens": pruning,
        "seconds": time.time() - start,
        "mistakes": mistakes[:20] if verbose else mistakes[:5],
    }
    if scratch is not None:
        scratch.cleanup()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a VideoLLaMA3 checkpoint on held-out synthetic shapes.")
    parser.add_argument("--model", default=str(REPO_ROOT / "tiny_model"))
    parser.add_argument("--images", type=int, default=150, help="held-out images (about 5 questions each)")
    parser.add_argument("--videos", type=int, default=60, help="held-out videos (2 questions each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=None, help="keep the held-out set here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED,
                        help="seed of the held-out set (another seed gives a second, independent set)")
    parser.add_argument("--answers", choices=curriculum.ANSWER_STYLES, default="short",
                        help="style of the image answers the model was trained on")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    result = evaluate(args.model, args.images, args.videos, args.batch_size, seed=args.seed, data_dir=args.data_dir,
                      verbose=args.verbose, answers=args.answers, device=args.device)
    for name, (right, total) in result["per_kind"].items():
        print(f"{name:>18}: {right}/{total} ({right / total:.0%})")
    tokens = result["video_tokens"]
    scores = result["scores"]
    labels = {
        "image": "image questions exact:    {:.1%} (target >= {:.0%})",
        "video": "video questions correct:  {:.1%} (target >= {:.0%}; spans within 1 s)",
        "pruned": f"DiffFP pruned:            {{:.1%}} of video tokens ({tokens['total'] - tokens['kept']} of "
                  f"{tokens['total']}) (target >= {{:.0%}})",
    }
    for name, score in scores.items():
        print(labels[name].format(score, TARGETS[name]))
    for modality, kind, prediction, reference in result["mistakes"]:
        print(f"  wrong {modality}/{kind}: {prediction!r} (expected {reference!r})")
    print(f"evaluated in {result['seconds']:.0f} s")
    met = all(scores[k] >= TARGETS[k] for k in TARGETS if k in scores)
    unchecked = [k for k in TARGETS if k not in scores]
    print(("targets met" if met else "targets NOT met")
          + (f" (not in this set, so not checked: {', '.join(unchecked)})" if unchecked else ""))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
