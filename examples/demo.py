"""Answer questions about an image and a video with a VideoLLaMA3 checkpoint.

    python examples/demo.py                       # the embedded tiny model on the bundled examples
    python examples/demo.py --model DAMO-NLP-SG/VideoLLaMA3-2B --video clip.mp4 --question "..."

`--model` takes a local folder or Hub id, in this repository's layout or the official one.
For each answer it prints the visual token budget (kept and pruned by the Differential Frame
Pruner) and, when the answer is a time span, the span parsed into seconds.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tools.spans import parse_span  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "tiny_model"
EXAMPLES = REPO_ROOT / "examples" / "media" / "examples.json"

logger = logging.getLogger("demo")


def bundled_examples() -> list[dict]:
    """`[{"image"|"video": path, "questions": [...], "answers": [...]}]` shipped with the repository."""
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
        entries = [{kind: media, "questions": args.question, "answers": [None] * len(args.question)}]
    else:
        entries = bundled_examples()

    correct = total = 0
    for entry in entries:
        kind = "image" if "image" in entry else "video"
        for question, expected in zip(entry["questions"], entry["answers"]):
            text, kept, pruned = answer(model, processor, kind, entry[kind], question, args.max_new_tokens)
            line = f"[{kind}] {Path(entry[kind]).name} | Q: {question}\n    A: {text}"
            line += f"\n    visual tokens: {kept} kept, {pruned} pruned"
            try:
                start, end = parse_span(text)
                line += f"\n    span: {start:.1f}s to {end:.1f}s"
            except ValueError:
                pass
            if expected is not None:
                total += 1
                correct += text == expected
                line += f"\n    expected: {expected} ({'right' if text == expected else 'wrong'})"
            logger.info(line)
    if total:
        logger.info(f"{correct}/{total} bundled questions answered exactly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
