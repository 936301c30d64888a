"""Answer questions about an image and a video with a VideoLLaMA3 checkpoint.

    python -m examples.demo                       # the embedded tiny model on the bundled examples
    python -m examples.demo --model DAMO-NLP-SG/VideoLLaMA3-2B --video clip.mp4 --question "..."

`--model` takes a local folder or Hub id, in this repository's layout or the official one.
For each answer it prints the visual token budget (kept and pruned by the Differential Frame
Pruner) and, when the answer is a time span, the span parsed into seconds. The bundled answers are
graded as the held-out evaluation grades them (`tools.evaluate_default.is_correct`): exact text,
and a time span when both its ends are within 1 s of the true ones.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from tools.evaluate_default import TEMPORAL_TOLERANCE_S, is_correct
from tools.local import REPO_ROOT
from tools.spans import parse_span

DEFAULT_MODEL = REPO_ROOT / "tiny_model"
EXAMPLES = REPO_ROOT / "examples" / "media" / "examples.json"

logger = logging.getLogger("demo")


def bundled_examples() -> list[dict]:
    """`[{"image"|"video": path, "questions": [...], "kinds": [...], "answers": [...]}]` shipped with
    the repository; `kinds` are the evaluation's question kinds ("when": a time span)."""
    entries = json.loads(EXAMPLES.read_text())
    for entry in entries:
        for kind in ("image", "video"):
            if kind in entry:
                entry[kind] = str(EXAMPLES.parent / entry[kind])
    return entries


def answer(model, processor, kind: str, media: str, question: str, max_new_tokens: int) -> tuple[str, int, int]:
    messages = [{"role": "user", "content": [{"type": kind, kind: media}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    mask = inputs["compression_mask"]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    return text, int(mask.sum()), int((~mask).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="local folder or Hub id")
    parser.add_argument("--image", help="an image file of your own")
    parser.add_argument("--video", help="a video file of your own")
    parser.add_argument("--question", action="append", help="question to ask (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)

    if args.image or args.video:
        if not args.question:
            parser.error("--question is required with --image or --video")
        kind, media = ("image", args.image) if args.image else ("video", args.video)
        entries = [{kind: media, "questions": args.question, "kinds": [None] * len(args.question),
                    "answers": [None] * len(args.question)}]
    else:
        entries = bundled_examples()

    correct = total = 0
    for entry in entries:
        kind = "image" if "image" in entry else "video"
        for question, question_kind, expected in zip(entry["questions"], entry["kinds"], entry["answers"]):
            text, kept, pruned = answer(model, processor, kind, entry[kind], question, args.max_new_tokens)
            line = f"[{kind}] {Path(entry[kind]).name} | Q: {question}\n    A: {text}"
            line += f"\n    visual tokens: {kept} kept, {pruned} pruned"
            try:
                start, end = parse_span(text)
                line += f"\n    span: {start:.1f}s to {end:.1f}s"
            except ValueError:
                pass
            if expected is not None:
                right = is_correct(question_kind, text, expected)
                total += 1
                correct += right
                rule = ""
                if question_kind == "when":
                    rule = (f", both ends within {TEMPORAL_TOLERANCE_S:.0f} s" if right
                            else f", an end more than {TEMPORAL_TOLERANCE_S:.0f} s off or no span")
                line += f"\n    expected: {expected} ({'right' if right else 'wrong'}{rule})"
            logger.info(line)
    if total:
        logger.info(f"{correct}/{total} bundled questions answered right (exact; time spans within "
                    f"{TEMPORAL_TOLERANCE_S:.0f} s at both ends)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
