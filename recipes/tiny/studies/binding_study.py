"""Binding study: can the tiny LLM learn to answer "What colour is the square?" about a scene?

Until the scene step (the last paragraphs), the embedded tiny model answered questions about
one-shape images (colour, position 100%) but was near chance when a scene held two or three shapes:
it named one of the present colours, right about one time in n. This study isolates the LLM from
vision (the scenes are `recipes.tiny.scene_pretrain`'s, which the recipe now also trains on). Each scene is a 6x6 grid of
symbolic visual tokens, standing in for the projector's output: a token covered by a shape is the
sum of the LLM's word embeddings of its colour, its kind and its quadrant ("red" + "square" + "top"
+ "left"), a background token is the embedding of the background style, plus Gaussian noise. The
LLM alone (a freshly initialised tiny Qwen2 of `train_default.MODEL`'s shape, or one loaded from a
checkpoint) is trained on the curriculum's questions about such scenes and scored on held-out
scenes, per question kind and per number of shapes (answers exact, teacher-forced).

    python -m recipes.tiny.studies.binding_study --objects 2 --kinds colour --heads 16   # the simplest binding
    python -m recipes.tiny.studies.binding_study --heads 4                               # the 128-wide tiny LLM
    python -m recipes.tiny.studies.binding_study --answers restated --kinds colour,shape,position,count,colours,caption

This tool (tied embeddings, as the recipe then was), two shapes, colour questions, 400 steps:
4 heads 47%, 48%, 51%, 56% and 16 heads 48%, 48%, 61%, 82% at steps 100-400 (chance 50%; about
170 s for 16 heads on 2 threads).

Earlier runs (batch 32, lr 2e-3, seed 1 unless said; measured with these scenes on a plain
`Qwen2ForCausalLM` of the recipe's LLM shape, tied embeddings, before this tool was written):
* recipe LLM (3 layers, width 128, 4 heads): two shapes, colour questions only: 47-55% at steps
  100-600 (chance 50%). All kinds with 1-3 shapes: one-shape scenes 100%, scenes with more shapes
  at chance. Seed 0 once learned the full task by step 500 (colour 97%, position 99%, shape 99%):
  the escape from the plateau exists, but at 4 heads it is luck;
* 16 heads of width 8 (same width 128): two shapes, colour only: 73% at step 300, 98% at 400.
  All kinds at once: still at chance on several shapes at step 500. 400 steps of two-shape colour
  questions first, then all kinds: colour 98% (three shapes 94%) at step 900, but shape 72% and
  position 25%: each kind of lookup has to be learnt on its own;
* conjunction codes added to the shape tokens (a fixed random vector per colour x shape,
  colour x quadrant, shape x quadrant pair) make binding learnable without lookup, slowly: colour
  79-85% and position 73-80% at steps 500-600 with 4 heads;
* the recipe's text-pretrained LLM (tied embeddings) as the start is worse than fresh weights:
  colour on one-shape scenes stays at chance for 800 steps. Its colour words have near-identical
  embeddings after text pretraining: mean pairwise cosine 0.93 for the five colours and 0.96 for
  the three shapes (-0.02 and -0.10 at initialisation; 0.60 and 0.84 in the earlier, tied tiny
  model after all four stages). With untied input and output embeddings the same text pretraining
  leaves 0.31 and 0.44;
* text instead of tokens ("A purple square at the top left ... What colour is the square?") stays
  at chance on several shapes for 1000 steps, also with answers that restate the subject ("The
  square is purple.") and with eight questions per scene.

Carried into the real recipe together (16 heads, untied embeddings, a first 300-step stage-2 phase
on two-shape colour questions, stage 3 cut to 550 steps), they did not help: held-out image 48.6%
and video 36.7% (against 49.9% and 61.7% before) in 21 minutes. Untied embeddings alone, the rest
of the recipe unchanged: image 48.4%, video 73.3% (when 88%, direction 100%) in 16.6 minutes, so the
recipe unties them and keeps 4 heads. The real visual tokens are not the clean sums above, and
that gap is where binding is still lost.

Restated answers (`--answers restated`, untied embeddings, 4 heads unless said, seeds 1 and 2; 7
runs of 500-800 steps, with and without the captions and the colours question). The bare answer
"square" to "What shape is the red object?" needs two dependent attention steps from the answer's
first token: find "red" in the question, then the red tokens. "It is a red square." needs one: "red"
is copied from the question (a lookup of its own, with its own gradient), and "square" is read off
the tokens that match the word just written. That is learnt at once:
* shape ("It is a red square."): 98-100% on scenes of three shapes by step 200 in all 7 runs;
* captions with each quadrant right after its shape ("A red circle top left, a blue square bottom
  right, on a striped background."): 100% at step 600; with "at the" before the quadrant, 92%;
* position ("The red circle is top left.", one word between the name and the answer): 49-100% at
  steps 500-600 (100% by step 200 with seed 2); "is at the top left" (three words): 64% at 500;
* colour ("The square is red."): the English order puts "is" between the shape and its colour,
  and the colour-from-shape lookup appears nowhere else: learnt late and by luck (99% at step 300
  once; 92% at step 800 with seed 2; about 60% at steps 600-800 in three runs). Restating alone does
  not help when nothing else teaches a lookup: two-shape colour questions only, 50-52% at steps
  100-400. Adding "What colour is each shape?" -> "square blue, circle red." (the colour right
  after its shape) brought colour to 100% at step 300 with seed 1, and 74% at step 500 with seed 2;
* 8 heads of width 16 instead of 4 did not help (colour 60% at step 800).

Short answers, all kinds, 4 heads, seed 1, untied embeddings (the recipe's LLM until it was
widened), measured at 1 and 2 threads with identical numbers: shape by colour ("What shape is the
red object?") is learnt between steps 300 and 500 (three shapes 98%), as in the real model, while
colour by shape and position stay at 1 in n. With 6 layers instead of 3 nothing is learnt by step
500 (shape 49% / 31% on two / three shapes). Longer, the other lookups come, unsteadily at the
constant lr: colour on two / three shapes 67% / 49% at step 750, 83% / 52% at 1000, 81% / 64% at
1250, 69% / 42% at 1500; position 48% / 33% until step 1000, then 72% / 61% at 1500. The number of
multi-shape questions seen is what the lookups wait for, not depth or the vision side.

Width does what depth does not (`--width 256 --heads 8`, heads of 32 as in the recipe, fresh
weights, seed 1, short answers, all kinds): colour by shape on two / three shapes 98% / 99% at step
200, where the 128-wide LLM is at 83% / 52% after 1000 steps; position 83% / 58% at step 300; shape
by colour still 45% / 29% at step 300. Restated, shape 100% at step 100 and position 70% / 65% at
step 200. A step costs about 2.5 times as much. On real images part of this carries over, and the
recipe now uses the 256-wide LLM: colour by shape in some runs, position in others
(`recipes.tiny.train_default`'s plan comments). Run to run, the study itself is a
lottery: restated answers from a text-pretrained LLM (`--init`) reached shape 100% at step 400 with
seed 1 and 32% with seed 2; with `--beta2 0.95` instead of 0.999, seed 2 reached 97% and seed 3 45%.
Starting the 256-wide LLM from the recipe's text pretraining (seed 0, short answers, captions in the
mix, batch 32) was slower still: after 300 steps (1.2 s each) colour 31%, shape 32%, position 41%,
even on one-shape scenes colour 33% and shape 50%, so a symbolic-scene phase before stage 1 (as a
stand-in for what Qwen2.5 brings) would cost more than the recipe's 20 minutes allow.

In the real recipe (`recipes.tiny.train_default --plan` with `{"curriculum": {"answers": "restated"}}`)
restated answers alone gave held-out image 40.7% (one-shape colour 100%, but one-shape shape 70% and
colour on two or three shapes 50% / 34%). The LLM does not get tokens that read like words: adding
the alignment of `vision_pretrain.align_projector` after stage 1 makes each shape's mean token
decode to the nearest sum of word embeddings with the right colour 100%, shape 96% and quadrant
100%, but after stage 2 (with its moved embeddings) 74%, 43% and 40%. Held-out: image 49.8%, video
66.7% (against 48.4% / 73.3% for the recipe then, all with 800 vision pretraining steps), 19.0
minutes; neither change is in the recipe. Keeping encoder and projector nearly still in stages 2 and
3 after the alignment (learning rates 2e-5 and 1e-4) was worse: 42.3% on image questions after stage
2, where the LLM did not even copy the question's shape reliably ("What colour is the square?" ->
"The circle is purple."). Shape itself was a second limit, since lifted: with 800 vision pretraining
steps one-shape "what shape" questions were 53% right (63-70% with restated answers) and a linear
probe on the encoder's mean feature of each shape read it 91% right; with 1600 steps (the recipe
now) the probe reads 100%, and the model answers "what shape" 99% right, also among three shapes.

After stage 2 of the 256-wide recipe the visual tokens are still not the limit: a linear probe on
each projected token of held-out images reads the kind of the shape covering it 98% right, its
colour 100% and its quadrant 98%. The LLM looks up by colour ("What shape is the red object?" 100%
/ 99% on two / three shapes) but not by kind ("What colour is the square?" 36% / 32%) nor for
positions (56% / 36%). At the answer position two last-layer heads attend more to the named shape
than to the other one for shape questions (0.25 against 0.09 of their attention); for colour
questions no head does. Of the variance of the tokens that cover shapes, colour explains 67% and
kind 19%. Stage 2 run again from the same stage-1 checkpoint (one thread) gives the same picture.
Each of these changes, stopped after stage 2, lost even the lookup by colour, and most lost
one-shape colour or shape too: no text pretraining; text pretraining without the curriculum's
answers; 8000 training images instead of 2000; 16 heads of 16; the word alignment before stage 2;
extra training answers listing each shape's colour, and its quadrant, in kind order ("circle red,
square blue."); an LLM learning rate of 2e-3 (constant) or 3e-3. Weighting the kind read-out 4x
in the vision pretraining did not make kind more salient (16% of the variance after stage 2) and
left colour by kind at chance (40% / 29%).

Two more, from the same stage-1 checkpoint (rebuilt: the recipe is deterministic), scored after
stage 2 (E2 there: image 65.3%; colour 36% / 32%, position 56% / 36% on two / three shapes,
one-shape position 80%):
* a first stage-2 phase of 200 steps on the hard questions only (every colour and position question
  of each two- and three-shape image as the turns of one row), then 340 steps of the usual mix: the
  phase itself ended at colour 43% / 29% and position 23% / 29%, and after the mix image 41.2%, with
  shape by colour lost (32% / 35%) and position at 1 in n;
* the encoder's output whitened before stage 1 (its covariance folded into the projector's first
  linear, shrunk by the mean eigenvalue): colour, kind and quadrant had 31%, 50% and 2% of the
  variance of shape tokens after the vision pretraining, and the projected tokens after stage 2
  27%, 38% and 22% (E2, same measure on 400 training images: 62%, 21%, 5%). One-shape positions
  became 100% right, but colour was not learnt at all (19% even on one shape) and image questions
  fell to 55.4%. After stages 3 and 4 (images served at merge size 2): image 70.3% / 71.9% on the
  two held-out sets, as E2 (70.4% / 71.4%), video 69.2%, colour among two / three shapes still at
  50% / 32%. Kind as the most salient feature does not bring the lookup by kind either.
Restated answers (`--plan` with `{"curriculum": {"answers": "restated"}}`) with the 256-wide LLM, the
whole recipe (1115 s): image 53.0% (colour 53%, position 31%, "What colour is each shape?" 27%,
captions 5%) and video 56.7%, far below the short answers' 70.4% / 78.3%.
Questions that only a lookup by kind or by quadrant answers, from E2's stage-1 checkpoint (K1):
1369 extra stage-2 rows, one per two- or three-shape training image, with three turns drawn from
"Where is the square?", "What shape is at the top left?" and "What colour is the square?" (mix
caption 1, image 2, these 1; 540 steps as before; scored at merge size 1 after stage 2). The
lookup by kind did not come (colour 44% / 28%, position 49% / 34% on two / three shapes) and the
lookup by colour was lost (shape 31% / 34%): image 45.9% against E2's 65.3%.
Stage 2 swept on a lent H200 (`recipes.tiny.train_default --device cuda` pieces; 24 variants, all from E2's
stage-1 checkpoint, fp32, scored after stage 2 at merge 1 on the first held-out set, image %):
seeds 0 / 1 / 2 of the recipe 65.0 / 66.7 / 64.7 (CPU: 65.3), so from a fixed stage 1 the spread is
about 1 point; constant learning rate 63.6; 1080 steps 67.6 (constant 63.9); batch 32 69.0, batch
32 for 270 steps 59.6, batch 64 for 270 steps 64.8, batch 32 at twice the learning rates 40.8;
batch 8 (1080 steps) 40.2, constant 35.6, batch 4 (2160 steps) 39.4, constant 33.7; every question
of an image as its turns 58.6 (batch 8: 40.5); no captions 44.8; a training-only "What is the
background?" turn 63.0 (batch 8: 38.0); multi-shape images asked colour and position first 53.0
(batch 8: 63.2); encoder at 1e-3 44.7; projector at 3e-3 62.0; LLM at 5e-4 64.4. Colour among two
or three shapes stayed at 1 in n in all of them. Of those below 60%, most lost the lookup by colour
(shape 101-175 of 357 right against 355).
On the CPU, also from E2's stage 1 (stage 2, then held-out images at merge 1):
* a training-only last turn "What colour is each shape?" -> "circle green bottom left, square
  purple bottom right." (the colour right after its kind, as in the symbolic runs): 53.6%, and the
  colour of even a lone shape was lost (72 / 357);
* training-only questions about an absent kind ("What colour is the triangle?" -> "There is no
  triangle."): 39.8%; the model answered "There is no triangle." to questions about the square, so
  it did not copy the kind from the question. A linear probe at the answer position of E2's stage 2
  reads the question's kind 91% right after LLM layer 1, 81% after layer 2 and 23% after layer 3;
* images at merge 2 in stage 2 (16 tokens, the image upscaled to 112 px as the processor's 16-token
  minimum asks): 47.5%, shape by colour lost;
* encoder and projector frozen in stage 2 (learning rate 1e-7): 62.3%;
* the projector balanced (`vision_pretrain.balance_projector`, residual 0.2: colour, kind and
  quadrant 31%, 50%, 2% of the variance of shape patches before, 35%, 41%, 10% after) before stage
  1, the rest as the recipe: 43.6%, shape by colour lost; the projected tokens after stage 1 held
  colour, kind and quadrant at 20%, 42% and 17% (E2: 12%, 64%, 1%; after E2's stage 2: 63%, 22%,
  6%);
* balanced, then stage 2 with encoder and projector frozen: **70.7%**, position 230 / 308 (E2 143 /
  308 at merge 1), shape 356 / 357, colour 178 / 357 (still 1 in n among several), captions 26 / 150.
  The whole recipe that way (`--plan` with `"balance": {"images": 600}` and `"trainable": ["llm"]`
  for the stages named), served at merge 2 and scored on both held-out parts of the first set:
  frozen in stages 2-4, image 68.1% and video 65.0% (71.6% on images after stage 3 at merge 1;
  stage 4 lost shape by colour, 311 / 357); frozen in stage 2 only, image 71.9% and video 73.3%
  (position 76%, colour 57%, captions 19%), against the recipe's 70.4% and 78.3%. So the recipe
  leaves it off.
Stage 4 does not cost the image questions: 65.3% after stage 2, 67.0% after stage 3 and 67.8%
after stage 4 at merge size 1. Stage 4 trains images at merge size 2, and the final model scores
70.4% served at 2 (71.4% on the second held-out set), which is how the recipe now packages it.

What did it (the recipe since stop 19): the LLM learns the lookups before it sees an image, on
these scenes (`recipes.tiny.scene_pretrain`, from fresh weights), and the visual tokens are then pulled to
the same word sums (`vision_pretrain.align_projector` after stage 1). At the recipe's batch 16 and
lr 1e-3 the 256-wide LLM sits at 1 in n among several shapes for about 400 steps, then escapes:
seed 1, colour on two / three shapes 53% / 40% at step 400, 100% / 90% at 600 and 100% / 100% at
800, shape 99%, positions 78%; seed 0 (the recipe's), colour 100% from step 400, positions 84% and
shape among several still 51% / 22% at step 800. The same training from the text-pretrained LLM
(E2's) was still at colour 53% / 40% and shape 44% / 31% at step 800, and 100 steps of text
pretraining after the scenes dropped held-out scene colour answers from 100% to 27%, so the recipe
runs the scenes from fresh weights and leaves the text pretraining off. The seed-1 scene LLM put
into E2's vision-pretrained model and aligned for 400 steps answered held-out images, with no
stage 2, 77% right: colour 355 / 357 (two / three shapes 98% / 100%), shape 355 / 357, position
234 / 308, count 79 / 150 (one-shape 100%, several 30%), captions 0 / 150 (never seen). After
stage 2 (540 steps, everything trained): 87.6%, colour 356 / 357, shape 356 / 357, count 149 / 150,
position 251 / 308, captions 46 / 150. E2's stage 2 from its own stage 1 scored 65.3%.
Also measured this stop, without the scene step (from E2's stage 1, images at merge 1 after stage 2):
* a caption row's second turn "List the shapes and their colours." -> "Colours: triangle blue,
  circle green." (each colour right after its kind, as captions put each kind right after its
  colour): 55.5%, colour 129 / 357, the same colour for every question about an image and often
  one not in it; with the balanced projector and the encoder and projector frozen: 47.7%;
* with captions among the scene questions (seed 1, 800 steps, 407 s against 310 s without), held-out
  scenes at step 800: captions 87%, positions 95%, shape 100%, but colour among two / three shapes
  still at 53% / 30% (without captions: 100% / 100%, positions 72%); the embedded default's wrong
  captions name the background wrongly in 84 of 123 cases (the shapes part is right in 111 of 150);
* between-class share of the answer position's variance in E2's stage 2: the question's kind in
  colour questions 1.3% after LLM layer 1 (0.9% after layers 2 and 3), the colour word in shape
  questions 4.7% (2.7%, 2.0%).
"""

import argparse
import json
import logging

import torch

from recipes.tiny import curriculum, scene_pretrain
from tools.local import REPO_ROOT
from recipes.tiny.scene_pretrain import SceneConfig


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


def run(study: SceneConfig, tokenizer, heads: int = 4, init: str | None = None,
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
    study = SceneConfig(objects=args.objects, kinds=tuple(args.kinds.split(",")), turns=args.turns, steps=args.steps,
                  batch=args.batch, lr=args.lr, beta2=args.beta2, seed=args.seed, every=args.every,
                  warmup_steps=args.warmup_steps, answers=args.answers, videos=args.videos)
    curve = run(study, tokenizer, heads=args.heads, init=args.init, layers=args.layers, width=args.width)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump([{"step": s, "accuracy": a} for s, a in curve], handle, indent=1)
    return curve


if __name__ == "__main__":
    main()
