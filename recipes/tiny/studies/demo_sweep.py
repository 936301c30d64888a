"""How the demo video's answers depend on where its shape is.

    python -m recipes.tiny.studies.demo_sweep                 # ./tiny_model, a green square, centres 30-82 px every 2 px
    python -m recipes.tiny.studies.demo_sweep --kind circle --step 4

The bundled clip (`curriculum.demo_frames`) is redrawn with its shape centred at every point of a
grid, and each clip is asked the demo's two video questions ("What appears in the video?", "When
does the green <kind> appear?"), graded as the held-out evaluation grades them. For each question
a map is printed, one row per centre y and one character per centre x: `#` right, `.` wrong. A
single clip says little about a model that is right three times in four; the map shows whether a
wrong answer is bad luck or a place the model does not see well (bands 14 px apart follow the
patch grid).
"""

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import torch

from recipes.tiny import curriculum
from tools.evaluate_default import answer_batch, is_correct, load
from tools.local import REPO_ROOT

def sweep(model_path: str, kind: str, centres: list[int], batch_size: int = 16, device: str = "cpu") -> dict:
    """`{question kind: {(x, y): (right, answer)}}` for the demo clip with its shape at each `(x, y)`
    of `centres` x `centres`."""
    if kind not in curriculum.SHAPES:
        raise ValueError(f"kind {kind!r}: not one of the curriculum's shapes {curriculum.SHAPES}")
    lowest, highest = 16, curriculum.VIDEO_SIZE - 16  # the radius-16 shape stays inside the frame
    outside = [c for c in centres if not lowest <= c <= highest]
    if outside:
        raise ValueError(f"centres {outside}: outside {lowest}-{highest} px, the shape would leave the frame")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, processor = load(model_path, device)
    questions = curriculum.video_questions(curriculum.demo_event(kind))  # the same wherever the shape is
    results = {name: {} for name, _, _ in questions}
    with tempfile.TemporaryDirectory(prefix="videollama3-sweep-") as scratch:
        clips = []
        for y in centres:
            for x in centres:
                path = Path(scratch) / f"{x}_{y}.mp4"
                curriculum.write_video(path, curriculum.demo_frames(kind, (float(x), float(y))))
                clips.append(((x, y), path))
        for name, question, reference in questions:
            for first in range(0, len(clips), batch_size):
                batch = clips[first:first + batch_size]
                conversations = [[{"role": "user", "content": [{"type": "video", "video": str(path)},
                                                               {"type": "text", "text": question}]}]
                                 for _, path in batch]
                answers, _ = answer_batch(model, processor, conversations)
                for (centre, _), answer in zip(batch, answers):
                    results[name][centre] = (is_correct(name, answer, reference), answer)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Answer the demo video's questions with its shape at a grid of places.")
    parser.add_argument("--model", default=str(REPO_ROOT / "tiny_model"))
    parser.add_argument("--kind", default="square", help="the shape that appears (circle, square, triangle)")
    parser.add_argument("--start", type=int, default=30, help="first centre coordinate, px")
    parser.add_argument("--stop", type=int, default=82, help="last centre coordinate, px")
    parser.add_argument("--step", type=int, default=2, help="px between centres")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    args = parser.parse_args(argv)
    if args.step < 1:
        raise ValueError(f"--step {args.step}: must be at least 1 px")
    centres = list(range(args.start, args.stop + 1, args.step))
    results = sweep(args.model, args.kind, centres, args.batch_size, args.device)
    print(f"rows: centre y; columns: centre x {centres[0]}-{centres[-1]} px every {args.step} px; # right, . wrong")
    for name, answers in results.items():
        print(f"\n{name}: {sum(right for right, _ in answers.values())} / {len(answers)} right")
        for y in centres:
            print(f"{y:4d} " + "".join("#" if answers[(x, y)][0] else "." for x in centres))
        wrong = Counter(answer for right, answer in answers.values() if not right)
        print("most frequent wrong answers:", ", ".join(f"{a!r} x{n}" for a, n in wrong.most_common(4)) or "none")
    x, y = (int(c) for c in curriculum.DEMO_CENTRE)
    if (x, y) in results["appear"]:
        print(f"\nthe bundled clip ({x}, {y}):", {name: answers[(x, y)][1] for name, answers in results.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
