"""Training for VideoLLaMA3: the four stages of the paper as TRL `SFTTrainer` subclasses.

An ordinary package (the Hub remote-code files never import it). Entry points:
`python -m trainer --stage N ...`, or `Videollama3SFTConfig` / `stage_config` with one of the
stage trainers and `trainer.data.load_records`.
"""

from .config import STAGE_NAMES, Videollama3SFTConfig, stage_config, stage_preset
from .data import (
    MediaLoadError,
    SampleError,
    SampleTooLongError,
    TooManySkippedError,
    Videollama3DataCollator,
    build_collator,
    load_records,
    pack_samples,
    pad_samples,
)
from .checkpoint import copy_remote_code, register_auto_classes
from .lora import build_lora_config, lora_target_regex, merge_adapter
from .trainers import (
    STAGE_TRAINERS,
    MultiTaskFineTuningTrainer,
    VideoCentricFineTuningTrainer,
    VisionEncoderAdaptationTrainer,
    VisionLanguageAlignmentTrainer,
    Videollama3Trainer,
)

__all__ = [
    "Videollama3SFTConfig",
    "stage_config",
    "stage_preset",
    "STAGE_NAMES",
    "Videollama3Trainer",
    "VisionEncoderAdaptationTrainer",
    "VisionLanguageAlignmentTrainer",
    "MultiTaskFineTuningTrainer",
    "VideoCentricFineTuningTrainer",
    "STAGE_TRAINERS",
    "load_records",
    "build_collator",
    "Videollama3DataCollator",
    "pad_samples",
    "pack_samples",
    "SampleError",
    "MediaLoadError",
    "SampleTooLongError",
    "TooManySkippedError",
    "build_lora_config",
    "lora_target_regex",
    "merge_adapter",
    "register_auto_classes",
    "copy_remote_code",
]
