"""The tiny recipe: train the embedded default VideoLLaMA3 from nothing, on 2 CPU cores, in one command.

    python -m recipes.tiny.train_default                      # full recipe -> ./tiny_model (about 16 minutes, `FULL`)
    python -m recipes.tiny.train_default --quick --out /tmp/t  # a few steps per stage (tests, CI)

Steps, mirroring how the real model was made at a scale a laptop can run:
1. `curriculum` writes the synthetic shapes curriculum (images, H.264 videos with a still
   of each, 1000 more clips of appearances only, text) in the official data format.
2. A byte-level BPE tokenizer is trained on the curriculum's text (Qwen2 pre-tokenizer, the Qwen
   chat specials, `<image>` and the stream tokens), and wrapped in the VideoLLaMA3 processor.
3. A randomly initialised tiny model; its LLM alone is pretrained on symbolic scenes
   (`scene_pretrain`: each "patch" the sum of the LLM's word embeddings of what covers it,
   with the curriculum's questions, then on their position questions alone), standing in for
   starting from Qwen2.5, which can look things up in its context. Off unless `--plan` turns it
   on: a text-only chat pretraining of the LLM through `trainer/`.
4. The vision encoder is pretrained alone on dense patch labels (`vision_pretrain`: colour,
   shape and position of every patch, and each image's background style), standing in for
   starting from SigLIP; then a second pass that also trains colour and kind on the 2x2-merged
   tokens of one still per training clip (`stills`), the tokens video frames are served as.
   Off unless `--plan` turns it on: a linear map that gives colour, kind, quadrant and background
   like shares of each feature, folded into the projector's first linear
   (`vision_pretrain.balance_projector`).
5. Stages 1-4 through `python -m trainer --stage N` (its CLI, called in-process), each starting
   from the previous stage's checkpoint. The stage presets keep their own trainable modules,
   merge sizes and DiffFP settings; only sizes of the run (steps, batch, learning rates, bf16 off)
   are overridden, because learning rates meant for pretrained 2B weights do not move a model
   that starts from random weights within minutes. A plan may set a stage's `trainable` modules
   and its `seed` (the order it draws its rows in).
   Between stages 1 and 2, encoder and projector are pulled towards the LLM's embeddings of the
   words naming each patch (`vision_pretrain.align_projector`, the stand-in for SigLIP's language
   alignment), so the visual tokens read like the scenes the LLM learnt its lookups on; the
   2x2-merged tokens video frames are served as are aligned too. Stages 3 and 4 also train on
   the clips of appearances (temporal grounding).
6. The stage-4 checkpoint is copied to `--out` in the Hub layout (config with `auto_map`,
   `model.safetensors`, processor, tokenizer, chat template, the five remote-code files); its
   processor serves images at the official merge size (1).

The differences to the official recipe, all forced by scale: stand-ins for the pretrained SigLIP
and Qwen2.5 weights, a few hundred steps instead of epochs over millions of samples, learning
rates that move random weights within minutes (keeping the official ordering: the vision encoder
at a fraction of the projector and LLM rates), fp32 on CPU.
"""

import argparse
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from recipes.tiny import curriculum, scene_pretrain, vision_pretrain
from trainer.checkpoint import copy_remote_code
from tools.local import REPO_ROOT, remote_module
from tools.tiny import SPECIAL_TOKENS, byte_tokenizer, tiny_config

VOCAB_SIZE = 512
SEED = 0

# The tiny shape: the quick run and the binding study build this; `FULL["model"]` widens its LLM.
MODEL = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    vision_hidden_size=64, vision_intermediate_size=256, vision_layers=2, vision_heads=4,
)

# Vision pretraining (`FULL`'s "vision"; its optional second pass, "stills", keeps these settings).
VISION = dict(steps=1200, batch=16, lr=1e-3, background_weight=1.0, scene_weight=0.0)

# Per stage: which curriculum files (with how many copies), steps, batch size and learning rates.
# Presets (trainable modules, merge sizes, DiffFP) come from trainer.config.STAGES unchanged. The
# sizes fit the recipe in 20 minutes on 2 CPU cores; the runs behind each number are in
# docs/experiments.md ("Embedded default recipe"). A step whose `steps` (or `images`) is 0 is off.
FULL = {
    # 256 wide, 8 heads: learns the scene lookups by step 800 (128 wide: not in 1000); MLP 512 for
    # time. Init seed 1: from seed 0 the scene step had not learnt shape-by-colour by step 800.
    "model": dict(MODEL, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                  init_seed=1),
    # Stills of each clip for the `stills` pass; 1000 appearance clips for spans in stages 3 and 4.
    "curriculum": dict(images=2000, videos=1000, texts=600, video_frames=True, appear_videos=1000),
    # The Qwen2.5 stand-in: the LLM alone learns lookups in context on symbolic scenes.
    "scenes": dict(steps=650, batch=16, lr=1e-3, every=650, eval_scenes=300, seed=1),
    # Position questions alone: mixed scenes get left and right swapped.
    "positions": dict(steps=110, batch=16, lr=1e-3, every=110, eval_scenes=300, seed=1, kinds=("position",)),
    # Off: text pretraining after the scenes erases their colour lookups; text is learnt in stages 3-4.
    "pretrain": dict(data={"text": 1, "lm": 1}, steps=0, batch=16, lr=3e-3),
    # The SigLIP stand-in: dense patch labels plus each image's background style (captions name it).
    "vision": VISION,
    # A second pass that also labels the 2x2-merged tokens of video stills: video shapes' kinds.
    "stills": dict(VISION, steps=400, frames="frames.jsonl", frame_weight=1.0),
    # Encoder and projector pulled to the LLM's word sums for each patch, merged video tokens too.
    "align": dict(steps=400, batch=16, lr=1e-3, merged_weight=1.0),
    # Off: a projector balanced across colour, kind and quadrant did not beat the plain one.
    "balance": dict(images=0, residual=0.2),
    # The official ordering of rates: the (stand-in) pretrained encoder moves slowest.
    1: dict(data={"caption": 1}, steps=60, batch=16, lr=dict(vision=1e-4, projector=1e-3)),
    2: dict(data={"caption": 1, "image": 2}, steps=380, batch=16, lr=dict(vision=2e-4, projector=1e-3, llm=1e-3)),
    # Stage 3 teaches the spans; 160 steps fit the time, at a cost to video answers.
    3: dict(data={"image": 1, "video": 1, "video_appear": 1, "text": 1}, steps=160, batch=16,
            lr=dict(vision=2e-4, projector=1e-3, llm=1e-3)),
    # Seed 3 (the order rows are drawn in): chosen among 0-3 by the bundled demo (6 / 6, others 5 / 6).
    4: dict(data={"video": 2, "video_appear": 2, "image": 2, "text": 1}, steps=340, batch=16,
            lr=dict(vision=1e-4, projector=5e-4, llm=5e-4), seed=3),
}
QUICK = {
    "model": MODEL,
    "curriculum": dict(images=8, videos=4, texts=8, video_frames=True, appear_videos=2),
    "scenes": dict(steps=2, batch=4, lr=1e-3, every=2, eval_scenes=8),
    "positions": dict(steps=2, batch=4, lr=1e-3, every=2, eval_scenes=8, kinds=("position",)),
    "pretrain": dict(data={"text": 1, "lm": 1}, steps=0, batch=4, lr=3e-3),
    # The full plan's heads and losses (background style, merged tokens), for a few steps.
    "vision": dict(FULL["vision"], steps=2, batch=4),
    "stills": dict(FULL["stills"], steps=2, batch=4),
    "align": dict(FULL["align"], steps=2, batch=4),
    "balance": dict(images=0, residual=0.2),
    **{stage: {**FULL[stage], "steps": 2, "batch": 4} for stage in (1, 2, 3, 4)},
}

logger = logging.getLogger("train_default")


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Qwen2 byte-level BPE trained on `texts`, with the Qwen chat specials and the VideoLLaMA3 tokens.

    Starting from a Qwen2 tokenizer of bare bytes keeps Qwen2's pre-tokenizer (digits split one by
    one, the same regex) and its class, so `AutoTokenizer` loads it like the real one.
    """
    tokenizer = byte_tokenizer().train_new_from_iterator(texts, vocab_size=vocab_size, new_special_tokens=SPECIAL_TOKENS)
    tokenizer.padding_side = "left"  # batched generation
    return tokenizer


def build_processor(tokenizer):
    image_processing = remote_module("image_processing_videollama3")
    processing = remote_module("processing_videollama3")
    return processing.Videollama3Qwen2Processor(image_processor=image_processing.Videollama3ImageProcessor(), tokenizer=tokenizer)


def build_model(tokenizer, seed: int = SEED, shape: dict | None = None):
    """A randomly initialised tiny model of `shape` (default `MODEL`) for `tokenizer`."""
    shape = MODEL if shape is None else shape
    modeling = remote_module("modeling_videollama3")
    config = tiny_config(
        tokenizer,
        # Untied: tied, text pretraining pulls the colour words' (and shape words') embeddings together.
        tie_word_embeddings=False,
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=2048,
        rope_theta=10000.0,
        vision_encoder_config=dict(
            hidden_size=shape["vision_hidden_size"],
            intermediate_size=shape["vision_intermediate_size"],
            num_hidden_layers=shape["vision_layers"],
            num_attention_heads=shape["vision_heads"],
            patch_size=14,
        ),
    )
    torch.manual_seed(seed)
    model = modeling.Videollama3Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.do_sample = False
    return model


def write_mix(data_dir: Path, name: str, parts: dict[str, int], seed: int) -> Path:
    """Concatenate curriculum JSONL files (`parts`: file stem -> copies), shuffled, into `name`."""
    lines = []
    for stem, copies in parts.items():
        lines += (data_dir / f"{stem}.jsonl").read_text().splitlines() * copies
    random.Random(seed).shuffle(lines)
    path = data_dir / name
    path.write_text("\n".join(lines) + "\n")
    return path


def write_lm_rows(data_dir: Path) -> Path:
    """Text-only chat rows for the LLM's pretraining: the curriculum's answers as free text."""
    rows = []
    for stem in ("caption", "video"):
        for line in (data_dir / f"{stem}.jsonl").read_text().splitlines():
            for message in json.loads(line)["conversations"][1::2]:
                rows.append({"conversations": [{"from": "human", "value": "Say something about shapes."},
                                               {"from": "gpt", "value": message["value"]}]})
    path = data_dir / "lm.jsonl"
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def run_stage(stage, model_dir: Path, data: Path, data_root: Path, out_dir: Path, plan: dict, threads: int,
              device: str = "cpu", sample_cache=None):
    """One `python -m trainer` run, in-process, on `device` ("cpu" or "cuda"); `sample_cache` (a
    `trainer.data.SampleCache`) is shared with the recipe's other stages."""
    from trainer.cli import main as trainer_main

    lr = plan["lr"]
    argv = [
        "--model", str(model_dir), "--data", str(data), "--output_dir", str(out_dir),
        "--data_root", str(data_root),
        "--max_steps", str(plan["steps"]), "--per_device_train_batch_size", str(plan["batch"]),
        "--gradient_accumulation_steps", "1", "--bf16", "false", "--use_cpu", str(device == "cpu").lower(),
        "--warmup_steps", str(max(1, plan["steps"] // 20)), "--weight_decay", "0.0", "--max_grad_norm", "1.0",
        "--logging_steps", "25", "--save_strategy", "no", "--report_to", "none",
        "--seed", str(plan.get("seed", SEED)),  # the order the stage draws its rows in
        "--dataloader_num_workers", "0", "--disable_tqdm", "true",
        # Packed rows: each sample attends on its own and no step computes padding (same losses, faster).
        "--multimodal_packing", "true", "--lr_scheduler_type", plan.get("scheduler", "cosine"),
        # Mixtures repeat rows: keep them encoded (unused when the recipe passes its shared `sample_cache`).
        "--encoded_sample_cache", "8192",
    ]
    if stage == "pretrain":
        argv += ["--trainable_modules", "llm", "--learning_rate", str(lr),
                 "--use_token_compression", "false"]
    else:
        argv += ["--stage", str(stage), "--learning_rate", str(max(lr.values()))]
        for module, key in (("vision", "vision_encoder_learning_rate"), ("projector", "projector_learning_rate"),
                            ("llm", "llm_learning_rate")):
            if module in lr:
                argv += [f"--{key}", str(lr[module])]
    if "trainable" in plan:  # the modules that train, instead of the stage preset's
        argv += ["--trainable_modules", *plan["trainable"]]
    torch.set_num_threads(threads)
    trainer = trainer_main(argv, sample_cache=sample_cache)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses


def train_in_place(model_dir: Path, out_dir: Path, threads: int, train):
    """Load the checkpoint at `model_dir`, run `train(model, processor)` on it in place, save it to
    `out_dir` (with the remote code) and return what `train` returned: the steps outside `trainer/`."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    result = train(model, processor)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    copy_remote_code(out_dir)
    return result


def run_scene_pretraining(model_dir: Path, out_dir: Path, plan: dict, threads: int, device: str = "cpu"):
    """The Qwen2.5 stand-in (`scene_pretrain`): the LLM alone on symbolic scenes; returns the
    held-out accuracies `[(step, {kind: accuracy})]`."""
    config = scene_pretrain.SceneConfig(**{"seed": SEED, **plan})
    return train_in_place(model_dir, out_dir, threads, lambda model, processor: scene_pretrain.pretrain_llm(
        model, processor.tokenizer, config, device=device))


def run_vision_pretraining(step: str, model_dir: Path, data_root: Path, out_dir: Path, plan: dict, threads: int,
                           device: str = "cpu"):
    """The SigLIP stand-ins (`vision_pretrain`): "vision", the encoder alone on dense patch
    labels (returns the loss curve); "balance", the projector's first linear folded with
    `balance_map` (returns its report); "align", encoder and projector towards the LLM's embeddings
    of those labels' words (returns the loss curve)."""
    train = {"vision": vision_pretrain.pretrain_vision, "stills": vision_pretrain.pretrain_vision,
             "align": vision_pretrain.align_projector, "balance": vision_pretrain.balance_projector}[step]
    return train_in_place(model_dir, out_dir, threads, lambda model, processor: train(
        model, processor, data_root / "vision.jsonl", data_root, seed=SEED, device=device, **plan))


def package(stage_dir: Path, out: Path, image_merge_size: int) -> None:
    """Copy the final checkpoint to `out`, dropping trainer-only files; the model card is its README.

    `image_merge_size` is written into the processor config: the merge size images are served at.
    """
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(stage_dir, out, ignore=shutil.ignore_patterns("training_args.bin", "checkpoint-*", "runs"))
    shutil.copyfile(REPO_ROOT / "model_card.md", out / "README.md")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(stage_dir, trust_remote_code=True, image_merge_size=image_merge_size)
    processor.save_pretrained(out)


def describe(result) -> str:
    """One log line for a step's result: a report (dict), held-out accuracies per step, or a loss curve."""
    if isinstance(result, dict):
        return str(result)
    if result and isinstance(result[-1], tuple):
        step, accuracy = result[-1]
        return f"held-out at step {step}: {({k: round(v, 2) for k, v in accuracy.items()})}"
    return f"loss {[round(x, 3) for x in result[:1] + result[-1:]]}"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the embedded tiny VideoLLaMA3 (all four stages).")
    parser.add_argument("--out", default=str(REPO_ROOT / "tiny_model"), help="final checkpoint folder")
    parser.add_argument("--work", default=None, help="data and stage checkpoints (default: <out>.work)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (tests)")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="torch threads")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder")
    parser.add_argument("--plan", default=None, help="JSON file overriding parts of the plan (experiments)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the stages train; the committed model is the CPU run (fp32 either way)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = dict(QUICK if args.quick else FULL)
    if args.plan:
        for key, value in json.loads(Path(args.plan).read_text()).items():
            key = int(key) if key.isdigit() else key
            plan[key] = {**plan[key], **value}
    out = Path(args.out)
    work = Path(args.work or f"{out}.work")
    data_dir = work / "data"
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    timings = {}
    start = time.time()

    # Media are rendered and encoded in one process per thread (the same files for any number).
    curriculum.generate(data_dir, seed=SEED, workers=args.threads, **plan["curriculum"])
    paths = {n: data_dir / f"{n}.jsonl" for n in ("image", "caption", "video", "text")}
    write_lm_rows(data_dir)
    tokenizer = build_tokenizer(curriculum.corpus_text(paths) + [f"Time {t:.1f}s:" for t in range(200)])
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=plan["model"].get("init_seed", SEED), shape=plan["model"])
    base = work / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    copy_remote_code(base)
    timings["data+tokenizer"] = time.time() - start

    # One cache of encoded samples for all stages: a row a later stage encodes alike is decoded once.
    from trainer.data import SampleCache

    sample_cache, previous, results = SampleCache(16384), base, {}
    for stage in ("scenes", "positions", "pretrain", "vision", "stills", "balance", 1, "align", 2, 3, 4):
        if 0 in (plan[stage].get("steps"), plan[stage].get("images")):  # a step switched off in the plan
            continue
        t0 = time.time()
        stage_dir = work / (f"stage{stage}" if isinstance(stage, int) else {"pretrain": "llm"}.get(stage, stage))
        if stage in ("scenes", "positions"):
            results[stage] = run_scene_pretraining(previous, stage_dir, plan[stage], args.threads, args.device)
        elif stage in ("vision", "stills", "balance", "align"):
            results[stage] = run_vision_pretraining(stage, previous, data_dir, stage_dir, plan[stage], args.threads,
                                                   args.device)
        else:
            mix = write_mix(data_dir, f"{stage}.jsonl", plan[stage]["data"], seed=SEED)
            results[stage] = run_stage(stage, previous, mix, data_dir, stage_dir, plan[stage], args.threads, args.device,
                                       sample_cache)
        previous = stage_dir
        timings[f"stage {stage}"] = time.time() - t0
        logger.info("stage %s done in %.0f s; %s", stage, timings[f"stage {stage}"], describe(results[stage]))

    # Images are served at the official processor's merge size (1), though stage 4 trains them at 2.
    package(previous, out, image_merge_size=1)
    if not args.keep_work:
        shutil.rmtree(work)
    total = time.time() - start
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    for name, seconds in timings.items():
        print(f"{name:>16}: {seconds:6.0f} s")
    print(f"{'total':>16}: {total:6.0f} s; checkpoint {out} {size:.1f} MB")
    return out


if __name__ == "__main__":
    main()
