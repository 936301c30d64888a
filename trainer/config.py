"""Typed training recipes: one `SFTConfig` subclass and the four presets of the official 2B recipe.

The paper trains VideoLLaMA3 in four stages (arXiv 2501.13106, section 3). They share every setting except
which modules train, their learning rates, the image merge size and whether DiffFP prunes video
tokens, so the presets below differ only there. Freezing is explicit: a module trains only when
it is listed in `trainable_modules`, whatever its learning rate says.
"""

import os
from dataclasses import dataclass, field

import torch
from trl import SFTConfig

MODULES = ("vision_encoder", "mm_projector", "llm")
MEDIA_ERROR_POLICIES = ("fail", "skip")


@dataclass
class Videollama3SFTConfig(SFTConfig):
    r"""`SFTConfig` plus the VideoLLaMA3 fields.

    Args:
        stage: which of the four stages this recipe is (1-4), or None for a custom recipe; only
            used for naming and logging.
        trainable_modules: modules whose parameters train, among `vision_encoder`, `mm_projector`
            and `llm` (embeddings, decoder layers, final norm and LM head). Everything else is frozen
            before the optimizer and the distributed wrapper are built.
        vision_encoder_learning_rate, projector_learning_rate, llm_learning_rate: peak learning rate
            of each module's parameter group; None means `learning_rate`. A learning rate never
            decides whether a module trains.
        image_merge_size, video_merge_size, fps, max_frames, max_visual_tokens,
            use_token_compression: the processor's media options (spatial merge of images and of
            video frames, frames sampled per second, most frames per video, merged-token budget of
            one sample, Differential Frame Pruner); None leaves the processor's own default, and the
            stage presets set the official recipe's values.
        data_root: directory that relative media paths in the dataset are resolved against.
        media_error_policy: `fail` (default) raises on a sample whose media cannot be loaded or that
            is longer than `max_length`, naming its index and path; `skip` drops it, counts it and
            logs it.
        max_skipped_fraction: under `skip`, the largest share of rows that may be skipped; more
            stops the run with the first errors (checked over the whole dataset for missing media
            and malformed rows before training, and over the rows encoded so far once at least
            `SKIP_GUARD_MIN_ROWS` were, and at the end of training).
        add_system_prompt: prepend the official VideoLLaMA3 system prompt to conversations that
            have no system message.
        encoded_sample_cache: encoded samples kept in memory, keyed by row content, so rows seen
            again skip media decoding and tokenizing (`SampleEncoder.cache_size`; 0: none). For
            small datasets trained over several epochs or mixtures with copies; memory grows with it.
            With data-loader workers each worker keeps its own.
        dataloader_worker_niceness: added to each data-loader worker's niceness (`os.nice`), so
            that when the training's threads fill the CPU cores, samples are encoded in the time
            they leave idle instead of taking it from them (CPU training; needs
            `dataloader_num_workers` >= 1; 0 leaves the workers as they are).
        multimodal_packing: concatenate the samples of a device batch into one row, with
            `position_ids` restarting per sample and no padding (TRL's own `packing` and
            `padding_free` refuse vision data and stay off).
        lora: train LoRA adapters instead of full weights (see `trainer.lora`).
        lora_r, lora_alpha, lora_dropout: LoRA hyper-parameters (official: 64, 16, 0.05).
        lora_vision: also put LoRA on the vision encoder's attention and MLP linears (off by default).
        load_in_4bit: QLoRA; needs CUDA and bitsandbytes.
        fsdp_size: shard the model over this many processes with FSDP2 when it loads
            (transformers' `DistributedConfig(fsdp_size=N)`: one unit per vision-encoder and decoder
            layer); the launch must start exactly that many. Runs over gloo on CPU ranks (with
            `use_cpu`) as well as on GPUs, unlike accelerate's FSDP plugin (GPU-type devices only).
            Full weights only, and checkpoints without optimizer state (`save_only_model`).
    """

    stage: int | None = field(default=None, metadata={"help": "Stage number 1-4 of the official recipe."})
    trainable_modules: list[str] = field(
        default_factory=lambda: list(MODULES),
        metadata={"help": "Modules that train: vision_encoder, mm_projector, llm."},
    )
    vision_encoder_learning_rate: float | None = field(default=None, metadata={"help": "LR of the vision encoder."})
    projector_learning_rate: float | None = field(default=None, metadata={"help": "LR of the projector."})
    llm_learning_rate: float | None = field(default=None, metadata={"help": "LR of the LLM."})
    image_merge_size: int | None = field(default=None, metadata={"help": "Spatial merge size of images."})
    video_merge_size: int | None = field(default=None, metadata={"help": "Spatial merge size of video frames."})
    fps: float | None = field(default=None, metadata={"help": "Video frames sampled per second."})
    max_frames: int | None = field(default=None, metadata={"help": "Most frames sampled from one video."})
    max_visual_tokens: int | None = field(default=None, metadata={"help": "Merged visual tokens per sample."})
    use_token_compression: bool | None = field(default=None, metadata={"help": "Differential Frame Pruner for videos."})
    data_root: str | None = field(default=None, metadata={"help": "Directory relative media paths start from."})
    media_error_policy: str = field(default="fail", metadata={"help": "fail or skip."})
    max_skipped_fraction: float = field(
        default=0.05, metadata={"help": "Under skip: largest share of rows that may be skipped before the run stops."}
    )
    add_system_prompt: bool = field(default=False, metadata={"help": "Prepend the official system prompt."})
    multimodal_packing: bool = field(default=False, metadata={"help": "Padding-free packing of each device batch."})
    encoded_sample_cache: int = field(default=0, metadata={"help": "Encoded samples kept in memory (0: none)."})
    dataloader_worker_niceness: int = field(
        default=0, metadata={"help": "Niceness added to data-loader workers, so they use idle CPU time (0: none)."}
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_vision: bool = field(default=False, metadata={"help": "Also adapt the vision encoder with LoRA."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA (CUDA only)."})
    fsdp_size: int | None = field(
        default=None, metadata={"help": "Shard the model over this many processes at load time (FSDP2)."}
    )

    # TRL defaults overridden: the official recipe's values, and CPU-friendly automatic choices.
    max_length: int | None = field(default=16384, metadata={"help": "Longest sample in tokens (never truncated)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None: on where the device has bf16."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing; None: on with CUDA."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Scheduler (official: cosine)."})
    warmup_ratio: float | None = field(default=0.03, metadata={"help": "Warmup fraction (official: 0.03)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (official: 1)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator reads raw rows."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X steps."})

    def __post_init__(self):
        unknown = set(self.trainable_modules) - set(MODULES)
        if unknown:
            raise ValueError(f"trainable_modules has unknown module(s) {sorted(unknown)}; choose from {list(MODULES)}")
        if self.media_error_policy not in MEDIA_ERROR_POLICIES:
            raise ValueError(f"media_error_policy must be one of {MEDIA_ERROR_POLICIES}, got {self.media_error_policy!r}")
        if self.stage is not None and self.stage not in (1, 2, 3, 4):
            raise ValueError(f"stage must be 1, 2, 3 or 4, got {self.stage!r}")
        if int(self.encoded_sample_cache) < 0:
            raise ValueError(f"encoded_sample_cache must be >= 0, got {self.encoded_sample_cache!r}")
        if int(self.dataloader_worker_niceness) < 0:
            raise ValueError(f"dataloader_worker_niceness must be >= 0 (a process may only lower its own priority), "
                             f"got {self.dataloader_worker_niceness!r}")
        if self.dataloader_worker_niceness and not hasattr(os, "nice"):
            raise ValueError("dataloader_worker_niceness needs os.nice, which this platform lacks; leave it at 0")
        if self.dataloader_worker_niceness and self.dataloader_num_workers < 1:
            raise ValueError(f"dataloader_worker_niceness={self.dataloader_worker_niceness} applies to data-loader "
                             f"workers, but dataloader_num_workers={self.dataloader_num_workers}: set it to 1 or more")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ValueError(f"max_skipped_fraction must be between 0 and 1, got {self.max_skipped_fraction!r}")
        for name in ("image_merge_size", "video_merge_size", "max_frames", "max_visual_tokens"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
        if self.packing or self.padding_free:
            raise ValueError(
                "TRL's packing/padding_free do not handle visual inputs; use multimodal_packing=True instead"
            )
        if self.load_in_4bit and not self.lora:
            raise ValueError("load_in_4bit (QLoRA) trains LoRA adapters: set lora=True as well")
        if self.lora and "llm" not in self.trainable_modules and not self.lora_vision:
            where = f"stage {self.stage} freezes the LLM" if self.stage is not None else "the LLM is frozen"
            raise ValueError(
                f"lora=True puts adapters on the LLM, but {where} (trainable_modules={self.trainable_modules}): "
                "use --lora_vision to adapt the vision encoder with LoRA (the projector then trains fully), "
                "or train without --lora"
            )
        cuda = torch.cuda.is_available() and not self.use_cpu
        if self.bf16 is None:
            self.bf16 = cuda and torch.cuda.is_bf16_supported()
        # Activation checkpointing pays off for the LLM on GPUs; on CPU it only slows tests down.
        # Non-reentrant checkpointing keeps gradients flowing into adapters of checkpointed layers
        # whose inputs (pixel patches) do not require grad.
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = cuda
        if self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        # Rows are raw official/messages records that the collator encodes; TRL must not tokenize them.
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        super().__post_init__()
        if self.fsdp_size is not None:
            self.check_fsdp_size()

    def check_fsdp_size(self) -> None:
        """Refuse what transformers' load-time FSDP2 cannot do, before any process loads weights."""
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if self.fsdp_size < 2 or self.fsdp_size != world_size:
            raise ValueError(f"fsdp_size={self.fsdp_size} must be at least 2 and equal the number of processes the "
                             f"launch started (WORLD_SIZE={world_size}), e.g. `python -m torch.distributed.run "
                             f"--nproc_per_node {max(self.fsdp_size, 2)} -m trainer ... --fsdp_size {max(self.fsdp_size, 2)}`")
        if self.lora:
            raise ValueError("fsdp_size shards full-weight training; LoRA under load-time FSDP2 is not supported: "
                             "drop --lora or --fsdp_size")
        if self.fsdp:
            raise ValueError("fsdp_size (transformers' FSDP2 at load time) and --fsdp (accelerate's FSDP plugin) both "
                             "shard the model: choose one")
        if self.save_strategy != "no" and not self.save_only_model:
            raise ValueError("fsdp_size: transformers does not save the optimizer state of a model sharded at load "
                             "time, so checkpoints cannot resume: add --save_only_model (or --save_strategy no)")
        if self.world_size != self.fsdp_size:
            raise ValueError(f"fsdp_size={self.fsdp_size}: the launch started {self.fsdp_size} processes, but they "
                             f"train as {self.world_size}; CPU ranks form one gloo job only with --use_cpu")

    def module_learning_rate(self, module: str) -> float:
        """Peak learning rate of `module` (one of `MODULES`)."""
        value = {
            "vision_encoder": self.vision_encoder_learning_rate,
            "mm_projector": self.projector_learning_rate,
            "llm": self.llm_learning_rate,
        }[module]
        return self.learning_rate if value is None else value


# What every stage of the official 2B recipe shares (official: bf16, global batch 128, ZeRO-1).
# bf16 stays None, so it is on where the device has it and CPUs train in fp32. Global batch is
# per_device_train_batch_size x gradient_accumulation_steps x GPUs; set those for your cluster.
COMMON = dict(
    bf16=None,
    lr_scheduler_type="cosine",
    warmup_ratio=0.03,
    num_train_epochs=1.0,
    max_length=16384,
    max_visual_tokens=10240,
    fps=1.0,
    max_frames=180,
    video_merge_size=2,
    multimodal_packing=True,
)

# Only where the stages differ.
STAGES = {
    1: dict(  # vision encoder adaptation
        trainable_modules=["vision_encoder", "mm_projector"],
        vision_encoder_learning_rate=1e-5,
        projector_learning_rate=1e-3,
        learning_rate=1e-3,
        image_merge_size=1,
        use_token_compression=False,
    ),
    2: dict(  # vision-language alignment
        trainable_modules=["vision_encoder", "mm_projector", "llm"],
        vision_encoder_learning_rate=2e-6,
        projector_learning_rate=1e-5,
        llm_learning_rate=1e-5,
        learning_rate=1e-5,
        image_merge_size=1,
        use_token_compression=False,
    ),
}
# Stages 3 and 4 train like stage 2; stage 3 turns the Differential Frame Pruner on, stage 4 also
# merges image tokens 2x2.
STAGES[3] = {**STAGES[2], "use_token_compression": True}  # multi-task fine-tuning
STAGES[4] = {**STAGES[3], "image_merge_size": 2}  # video-centric fine-tuning

STAGE_NAMES = {
    1: "vision encoder adaptation",
    2: "vision-language alignment",
    3: "multi-task fine-tuning",
    4: "video-centric fine-tuning",
}


def stage_preset(stage: int) -> dict:
    """The official 2B recipe's settings of `stage` as keyword arguments."""
    if stage not in STAGES:
        raise ValueError(f"stage must be 1, 2, 3 or 4, got {stage!r}")
    return {**COMMON, **STAGES[stage], "stage": stage}


def stage_config(stage: int, **overrides) -> Videollama3SFTConfig:
    """`Videollama3SFTConfig` of the official recipe's `stage`, with `overrides` applied last."""
    return Videollama3SFTConfig(**{**stage_preset(stage), **overrides})
