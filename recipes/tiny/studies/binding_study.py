"""Binding study: can the tiny LLM learn to answer "What colour is the square?" about a scene?

The LLM alone (a fresh tiny Qwen2 of `train_default.MODEL`'s shape, or one loaded from a
checkpoint) is trained on `scene_pretrain`'s symbolic scenes: a 6x6 grid of tokens, each the sum
of the LLM's word embeddings of what covers it ("red" + "square" + "top" + "left") plus noise,
followed by the curriculum's questions; it is scored on held-out scenes per question kind and per
number of shapes (answers exact, teacher-forced). It isolates the LLM from vision: its finding,
that a fresh LLM learns these lookups after a plateau of a few hundred steps and a text-pretrained
one does not, is why the recipe has a scene step. Runs: docs/experiments.md ("Studies").

    python -m recipes.tiny.studies.binding_study --objects 2 --kinds colour --heads 16  # the simplest binding
    python -m recipes.tiny.studies.binding_study --width 256 --heads 8                  # the recipe's LLM width
    python -m recipes.tiny.studies.binding_study --answers restated --kinds colour,shape,position,count,colours,caption
"""

import argparse
import json
import logging

import torch

from recipes.tiny import curriculum, scene_pretrain
from tools.local import REPO_ROOT


def build_llm(tokenizer, heads: int, init: str | None, layers: int | None = None, width: int | None = None):
    """A tiny model of `train_default.MODEL`'s shape with `heads` attention heads (and `layers`
    decoder layers and hidden size `width`, MLP 4x as wide, both default that shape's), or the model
    saved at `init`; only its LLM is used."""
    from recipes.tiny import train_default

    if init:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(init, trust_remote_code=True)
    shape = dict(train_default.MODEL, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    if layers is not None:
        shape["num_hidden_layers"] = layers
    if width is not None:
        shape["hidden_size"], shape["intermediate_size"] = width, 4 * width
    return train_default.build_model(tokenizer, seed=torch.initial_seed(), shape=shape)


def run(study: scene_pretrain.SceneConfig, tokenizer, heads: int = 4, init: str | None = None,
        layers: int | None = None, width: int | None = None) -> list[tuple[int, dict[str, float]]]:
    """Train the LLM on symbolic scenes; returns `[(step, held-out accuracies)]` every `study.every` steps."""
    torch.manual_seed(study.seed)
    model = build_llm(tokenizer, heads, init, layers, width)
    return scene_pretrain.pretrain_llm(model, tokenizer, study)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(REPO_ROOT / "tiny_model"), help="folder with the recipe's tokenizer")
    parser.add_argument("--init", default=None, help="start from this checkpoint's LLM instead of fresh weights")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: train_default.MODEL's)")
    parser.add_argument("--width", type=int, default=None, help="LLM hidden size, MLP 4x (default: train_default.MODEL's)")
    parser.add_argument("--objects", type=int, default=0, help="shapes per scene (0: one to three)")
    parser.add_argument("--kinds", default="colour,shape,position,count")
    parser.add_argument("--answers", choices=curriculum.ANSWER_STYLES, default="short")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta2", type=float, default=0.999, help="AdamW's second-moment decay")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=0, help="steps on two-shape colour questions first")
    parser.add_argument("--videos", type=float, default=0.0,
                        help="share of scenes that are symbolic videos, asked the video kinds among --kinds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the accuracy curve here (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=True)
    study = scene_pretrain.SceneConfig(
        objects=args.objects, kinds=tuple(args.kinds.split(",")), turns=args.turns, steps=args.steps,
        batch=args.batch, lr=args.lr, beta2=args.beta2, seed=args.seed, every=args.every,
        warmup_steps=args.warmup_steps, answers=args.answers, videos=args.videos)
    curve = run(study, tokenizer, heads=args.heads, init=args.init, layers=args.layers, width=args.width)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump([{"step": s, "accuracy": a} for s, a in curve], handle, indent=1)
    return curve


if __name__ == "__main__":
    main()
