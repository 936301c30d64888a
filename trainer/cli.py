"""`python -m trainer`: run one stage of the recipe from the command line or a YAML file.

Settings are layered: the stage's official preset, then the YAML recipe (`--config`), then flags.
Every `Videollama3SFTConfig` / `SFTConfig` / `TrainingArguments` field is a flag
(`--per_device_train_batch_size 2`, dashes or underscores). The stage ends with a complete
checkpoint in `--output_dir`: the next stage's `--model`.

    python -m trainer --stage 1 --model ./base --data train.jsonl --data_root ./media --output_dir ./stage1
    python -m trainer --config trainer/configs/stage3.yaml --resume
"""

import argparse
import logging
import sys

import yaml
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint

from .config import Videollama3SFTConfig, stage_preset
from .data import load_records

logger = logging.getLogger("trainer")

SCRIPT_KEYS = ("stage", "model", "data", "eval_data", "resume", "merge_lora", "config")


def parse_args(argv=None) -> tuple[dict, Videollama3SFTConfig]:
    """Returns the script settings (`stage`, `model`, `data`, ...) and the training config."""
    script = argparse.ArgumentParser(prog="python -m trainer", add_help=False)
    script.add_argument("--config", help="YAML recipe: any config field plus stage/model/data")
    script.add_argument("--stage", type=int, choices=(1, 2, 3, 4), help="official preset to start from")
    script.add_argument("--model", help="checkpoint folder or Hub id (the previous stage's output)")
    script.add_argument("--data", help="training rows: .json/.jsonl/.parquet file, folder or Hub dataset")
    script.add_argument("--eval_data", "--eval-data", dest="eval_data", help="optional evaluation rows")
    script.add_argument("--resume", nargs="?", const=True, default=None,
                        help="continue from the last checkpoint in output_dir (or from the given checkpoint)")
    script.add_argument("--merge_lora", "--merge-lora", dest="merge_lora", action="store_true",
                        help="after LoRA training, also write a merged full checkpoint to <output_dir>/merged")
    script.add_argument("-h", "--help", action="store_true")
    known, rest = script.parse_known_args(argv)
    parser = HfArgumentParser(Videollama3SFTConfig)
    if known.help:
        script.print_help()
        print("\nTraining fields (any of them, also in the YAML recipe):")
        parser.print_help()
        sys.exit(0)

    recipe = {}
    if known.config:
        with open(known.config, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
    settings = {k: recipe.pop(k, None) for k in SCRIPT_KEYS}
    settings.update({k: v for k, v in vars(known).items() if v not in (None, False) and k in SCRIPT_KEYS})
    settings["merge_lora"] = bool(settings.get("merge_lora"))
    for key in ("model", "data"):
        if not settings.get(key):
            raise SystemExit(f"python -m trainer: --{key} is required (or '{key}:' in the --config recipe)")

    defaults = stage_preset(settings["stage"]) if settings.get("stage") else {}
    defaults.update(recipe)
    unknown = set(defaults) - {f.dest for f in parser._actions}
    if unknown:
        raise SystemExit(f"python -m trainer: unknown setting(s) {sorted(unknown)}")
    parser.set_defaults(**defaults)
    if "output_dir" not in defaults and not any(a.split("=")[0] in ("--output_dir", "--output-dir") for a in rest):
        raise SystemExit("python -m trainer: --output_dir is required")
    (config,) = parser.parse_args_into_dataclasses(rest)
    return settings, config


def main(argv=None, sample_cache=None):
    """Run one training from command-line arguments; returns the trainer. `sample_cache`: a
    `trainer.data.SampleCache` to encode into, shared with runs before and after this one in the
    same process (a recipe's stages), so rows they share are decoded once."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, config = parse_args(argv)
    from .trainers import STAGE_TRAINERS, Videollama3Trainer

    trainer_class = STAGE_TRAINERS.get(config.stage, Videollama3Trainer)
    train_dataset = load_records(settings["data"])
    eval_dataset = load_records(settings["eval_data"]) if settings.get("eval_data") else None
    trainer = trainer_class(model=settings["model"], args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            sample_cache=sample_cache)

    logger.info("training on %d process(es)", trainer.accelerator.num_processes)
    resume = settings.get("resume")
    if resume is True:
        resume = get_last_checkpoint(config.output_dir) if config.output_dir else None
        if resume is None:
            logger.warning("--resume: no checkpoint in %s, starting from the beginning", config.output_dir)
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(config.output_dir)
    skipped = trainer.data_collator.skipped
    if skipped:
        logger.warning("skipped samples (this process): %s", dict(skipped))
    if config.lora and settings["merge_lora"] and trainer.is_world_process_zero():
        from .lora import merge_adapter

        merge_adapter(config.output_dir, f"{config.output_dir}/merged", base_model_dir=settings["model"])
    return trainer


if __name__ == "__main__":
    main()
