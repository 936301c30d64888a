"""`python -m trainer`: run one stage of the recipe from the command line or a YAML file.

Settings are layered: the stage's official preset, then the YAML recipe (`--config`), then flags.
Every `Videollama3SFTConfig` / `SFTConfig` / `TrainingArguments` field is a flag
(`--per_device_train_batch_size 2`, dashes or underscores). The stage ends with a complete
checkpoint in `--output_dir`: the next stage's `--model`.

    python -m trainer --stage 1 --model ./base --data train.jsonl --data_root ./media --output_dir ./stage1
    python -m trainer --config trainer/configs/stage3.yaml --resume
    python -m trainer --stage 3 --help      # every field, with stage 3's values as defaults
"""

import argparse
import dataclasses
import json
import logging
import os
import sys

import yaml
from transformers import HfArgumentParser, TrainerState
from transformers.trainer_utils import get_last_checkpoint

from .config import Videollama3SFTConfig, stage_preset
from .data import load_records
from .lora import merge_adapter
from .trainers import STAGE_TRAINERS, Videollama3Trainer

logger = logging.getLogger("trainer")

SCRIPT_KEYS = ("stage", "model", "data", "eval_data", "resume", "merge_lora", "config")
# Always part of the logged effective settings, besides the preset's and the user's.
LOGGED_FIELDS = ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "bf16",
                 "num_train_epochs", "max_steps", "media_error_policy", "lora", "seed")


def add_script_arguments(parser: argparse.ArgumentParser, stage: bool = True) -> None:
    """The script's own flags; `stage=False` where the config's `stage` field already is one."""
    parser.add_argument("--config", help="YAML recipe: any config field plus stage/model/data")
    if stage:
        parser.add_argument("--stage", type=int, choices=(1, 2, 3, 4), help="official preset to start from")
    parser.add_argument("--model", help="checkpoint folder or Hub id (the previous stage's output)")
    parser.add_argument("--data", help="training rows: .json/.jsonl/.parquet file, folder or Hub dataset")
    parser.add_argument("--eval_data", "--eval-data", dest="eval_data", help="optional evaluation rows")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="continue from the last checkpoint in output_dir (or from the given checkpoint)")
    parser.add_argument("--merge_lora", "--merge-lora", dest="merge_lora", action="store_true",
                        help="after LoRA training, also write a merged full checkpoint to <output_dir>/merged")


def parse_args(argv=None) -> tuple[dict, Videollama3SFTConfig]:
    """Returns the script settings (`stage`, `model`, `data`, ...) and the training config."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # A first pass finds the stage and the recipe, whose values become the defaults of the full parser.
    first = argparse.ArgumentParser(add_help=False)
    add_script_arguments(first)
    known, _ = first.parse_known_args(argv)
    recipe = {}
    if known.config:
        with open(known.config, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
    script_defaults = {k: recipe.pop(k) for k in SCRIPT_KEYS if k in recipe}
    stage = known.stage or script_defaults.get("stage")
    defaults = {**(stage_preset(stage) if stage else {}), **recipe}
    unknown = set(defaults) - {f.name for f in dataclasses.fields(Videollama3SFTConfig)}
    if unknown:
        raise SystemExit(f"python -m trainer: unknown setting(s) {sorted(unknown)}")

    # One parser, so `--help` prints one usage block with this stage's and recipe's values as defaults.
    parser = HfArgumentParser(Videollama3SFTConfig, prog="python -m trainer", description=__doc__.split("\n\n")[0])
    add_script_arguments(parser, stage=False)
    parser.set_defaults(**defaults, **{k: v for k, v in script_defaults.items() if k != "stage"})
    given = {a.split("=")[0] for a in argv}
    if "output_dir" not in defaults and not given & {"--output_dir", "--output-dir"} and not given & {"-h", "--help"}:
        raise SystemExit("python -m trainer: --output_dir is required (or 'output_dir:' in the --config recipe)")
    config, namespace = parser.parse_args_into_dataclasses(argv)
    settings = {k: getattr(namespace, k, None) for k in SCRIPT_KEYS}
    settings["stage"] = config.stage
    settings["merge_lora"] = bool(settings["merge_lora"])
    for key in ("model", "data"):
        if not settings.get(key):
            raise SystemExit(f"python -m trainer: --{key} is required (or '{key}:' in the --config recipe)")
    return settings, config


def effective_settings(settings: dict, config: Videollama3SFTConfig, argv) -> dict:
    """The script settings and every config field the preset, the recipe or a flag set."""
    preset = stage_preset(settings["stage"]) if settings.get("stage") else {}
    flags = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv or []) if a.startswith("--")}
    fields = {f.name for f in dataclasses.fields(config)}
    keys = [k for k in fields if k in preset or k in flags or k in LOGGED_FIELDS]
    return {**{k: v for k, v in settings.items() if v not in (None, False)},
            **{k: getattr(config, k) for k in sorted(keys)}}


def resume_point(resume, output_dir: str | None) -> str | None:
    """The checkpoint folder `--resume` names (True: the last one in `output_dir`)."""
    if resume is True:
        resume = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
        if resume is None:
            logger.warning("--resume: no checkpoint in %s, starting from the beginning", output_dir)
    return resume or None


def warn_if_sharding_was_dropped(trainer) -> None:
    """accelerate sets up FSDP and DeepSpeed only on GPU-type devices; on CPU a launch with
    fsdp.yaml or zero3.yaml trains as plain DDP (accelerate/state.py, `AcceleratorState.__init__`)."""
    for engine, variable, enabled in (("FSDP", "ACCELERATE_USE_FSDP", trainer.is_fsdp_enabled),
                                      ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", trainer.is_deepspeed_enabled)):
        if os.environ.get(variable, "false").lower() == "true" and not enabled:
            logger.warning("the accelerate config asks for %s, but accelerate runs it only on GPU-type devices; "
                           "this run uses %s instead (every process holds the whole model)%s",
                           engine, trainer.accelerator.distributed_type,
                           "; --fsdp_size N shards with transformers' FSDP2 on CPU ranks too" if engine == "FSDP" else "")


def main(argv=None, sample_cache=None):
    """Run one training from command-line arguments; returns the trainer. `sample_cache`: a
    `trainer.data.SampleCache` to encode into, shared with runs before and after this one in the
    same process (a recipe's stages), so rows they share are decoded once."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, config = parse_args(argv)
    # Under DDP/FSDP every process runs this; only the main one logs information.
    logger.setLevel(logging.INFO if config.should_log else logging.WARNING)
    logger.info("effective settings: %s", json.dumps(effective_settings(settings, config, argv), default=str))

    trainer_class = STAGE_TRAINERS.get(config.stage, Videollama3Trainer)
    train_dataset = load_records(settings["data"])
    eval_dataset = load_records(settings["eval_data"]) if settings.get("eval_data") else None
    trainer = trainer_class(model=settings["model"], args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            sample_cache=sample_cache)

    logger.info("training on %d process(es)", trainer.accelerator.num_processes)
    warn_if_sharding_was_dropped(trainer)
    resume = resume_point(settings.get("resume"), config.output_dir)
    if resume:
        step = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json")).global_step
        logger.info("resuming from %s at step %d", resume, step)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    trainer.save_state()  # trainer_state.json: the run's log history next to the weights
    skipped = trainer.data_collator.skipped
    if skipped:
        logger.warning("skipped samples (this process): %s", dict(skipped))
    if config.lora and settings["merge_lora"] and trainer.is_world_process_zero():
        merged = merge_adapter(config.output_dir, f"{config.output_dir}/merged", base_model_dir=settings["model"])
        logger.info("merged checkpoint saved to %s", merged)
    logger.info("saved to %s", config.output_dir)
    return trainer


if __name__ == "__main__":
    main()
