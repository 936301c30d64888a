"""The four VideoLLaMA3 training stages as `SFTTrainer` subclasses.

`Videollama3Trainer` holds everything the stages share: explicit freezing (done in `__init__`,
before the optimizer, PEFT and the distributed wrapper see the model), optimizer parameter groups
built from module identity (vision encoder / projector / LLM, each with decay and no-decay), the
multimodal collator, and a `save_model` that writes a complete, loadable checkpoint (model,
processor, remote-code files). The four stage classes only name their stage; the recipe itself
is the stage's `Videollama3SFTConfig` preset. Only public hooks are overridden: `__init__`,
`create_optimizer`, `log`, `train`, `create_model_card`, `save_model`.
"""

import copy
import logging
import os

from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoProcessor, TrainerCallback
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from trl import SFTTrainer

from .checkpoint import copy_remote_code, model_card, register_auto_classes, unwrap
from .config import MODULES, STAGE_NAMES, Videollama3SFTConfig, stage_config
from .data import INDEX_COLUMN, SOURCE_COLUMN, build_collator, check_rows
from .lora import build_lora_config, load_model

logger = logging.getLogger(__name__)


# Registered by modeling_videollama3 when it is imported (`packed_sdpa_attention` there).
PACKED_SDPA = "videollama3_packed_sdpa"


def use_packed_attention(model: nn.Module) -> None:
    """Under sdpa, let packed rows attend one sample at a time instead of through sdpa's dense
    block-diagonal mask (the same numbers; on CPU the attention of a 4-sample row costs about a
    third). flash-attention already reads the samples' boundaries; eager is left as asked."""
    # transformers has a public setter (`set_attn_implementation`) but no public getter of the choice.
    if model.config._attn_implementation == "sdpa" and PACKED_SDPA in ALL_ATTENTION_FUNCTIONS:
        model.set_attn_implementation(PACKED_SDPA)


def module_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters of the vision encoder, the projector and the LLM, told apart by module identity.

    The LLM is everything that is neither vision encoder nor projector: embeddings, decoder layers,
    final norm and LM head (tied to the embeddings or not). LoRA weights belong to the module they
    adapt.
    """
    core = unwrap(model).model  # Videollama3Qwen2Model
    vision = {id(p) for p in core.vision_encoder.parameters()}
    projector = {id(p) for p in core.mm_projector.parameters()}
    groups = {name: [] for name in MODULES}
    for p in model.parameters():
        key = "vision_encoder" if id(p) in vision else "mm_projector" if id(p) in projector else "llm"
        groups[key].append(p)
    return groups


def set_trainable_modules(model: nn.Module, trainable_modules) -> None:
    """Freeze every module not in `trainable_modules`."""
    for name, params in module_parameters(model).items():
        for p in params:
            p.requires_grad_(name in trainable_modules)


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count per module (adapters count under the module they adapt)."""
    return {name: sum(p.numel() for p in params if p.requires_grad) for name, params in module_parameters(model).items()}


def held_parameters(model: nn.Module) -> tuple[int, int]:
    """Parameter values this process stores, and the model's total (they differ once FSDP2 or TP shard it)."""
    params = list(model.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    return local, sum(p.numel() for p in params)


class ModuleLearningRates(TrainerCallback):
    """Each module's learning rate of the last optimizer step, read before the scheduler moves on
    (the moment Trainer reads its own `learning_rate`)."""

    def __init__(self):
        self.rates: dict[str, float] = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        for group in optimizer.param_groups if optimizer is not None else ():
            module = str(group.get("name", "")).removesuffix(".no_decay")
            if module in MODULES:
                self.rates[module] = float(group["lr"])


class Videollama3Trainer(SFTTrainer):
    """`SFTTrainer` for VideoLLaMA3: explicit freezing, per-module learning rates, multimodal data.

    Args:
        model: a `Videollama3Qwen2ForCausalLM` or a path / Hub id loaded with `trust_remote_code`.
        args: a `Videollama3SFTConfig` (a stage class defaults to its official preset).
        train_dataset: rows in the official or messages format (see `trainer.data`), e.g. from
            `trainer.data.load_records`.
        processing_class: the VideoLLaMA3 processor; loaded from the model's folder if None.
        peft_config: a PEFT config; built from `args.lora*` (see `trainer.lora`) when `args.lora`.
        sample_cache: a `trainer.data.SampleCache` that the data collator encodes into instead of
            its own (`args.encoded_sample_cache`), shared with other trainers of the process.
        **kwargs: passed to `SFTTrainer`.
    """

    stage: int | None = None

    def __init__(self, model, args=None, train_dataset=None, processing_class=None, peft_config=None,
                 sample_cache=None, **kwargs):
        if args is None:
            if self.stage is None:
                raise ValueError("pass args=Videollama3SFTConfig(...)")
            args = stage_config(self.stage, output_dir=f"videollama3-stage{self.stage}")
        if not isinstance(args, Videollama3SFTConfig):
            raise TypeError(f"args must be a Videollama3SFTConfig, got {type(args).__name__}")
        if self.stage is not None and args.stage not in (None, self.stage):
            raise ValueError(f"{type(self).__name__} is stage {self.stage} but args.stage is {args.stage}")
        if isinstance(model, (str, os.PathLike)):
            model = load_model(str(model), args)
            # SFTTrainer sees the loaded model: its model_init_kwargs are applied already.
            args = copy.copy(args)
            args.model_init_kwargs = None
        elif args.fsdp_size is not None and not getattr(model, "is_distributed_loading_by_transformers", False):
            raise ValueError(f"fsdp_size={args.fsdp_size} shards the model as it loads: pass its path as model=, or "
                             f"load it with distributed_config=DistributedConfig(fsdp_size={args.fsdp_size})")
        self.base_model_name = model.name_or_path
        if args.multimodal_packing:
            use_packed_attention(model)
        if processing_class is None:
            processing_class = AutoProcessor.from_pretrained(model.name_or_path, trust_remote_code=True)
        if train_dataset is not None and INDEX_COLUMN not in train_dataset.column_names:
            train_dataset = train_dataset.add_column(INDEX_COLUMN, list(range(len(train_dataset))))
        if train_dataset is not None:
            train_dataset = check_rows(train_dataset, args.data_root, args.media_error_policy, args.max_skipped_fraction)

        if args.lora:
            peft_config = peft_config or build_lora_config(model, args)
            set_trainable_modules(model, ())  # PEFT turns on the adapters and modules_to_save only
        else:
            set_trainable_modules(model, args.trainable_modules)
        if "data_collator" not in kwargs or kwargs["data_collator"] is None:
            kwargs["data_collator"] = build_collator(processing_class, args, train_dataset, sample_cache)
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
            peft_config=peft_config, **kwargs,
        )
        self.module_learning_rates = ModuleLearningRates()
        self.add_callback(self.module_learning_rates)
        logger.info("trainable parameters per module%s: %s", " (LoRA adapters and modules_to_save)" if args.lora else "",
                    trainable_parameters(self.model))
        if self.is_distributed_loading_by_transformers:
            local, total = held_parameters(self.model)
            logger.info("sharded at load time over %d processes: this process holds %d of %d parameter values",
                        args.world_size, local, total)
        if self.stage is not None:
            logger.info("stage %d: %s", self.stage, STAGE_NAMES[self.stage])

    def create_optimizer(self, model=None):
        """AdamW (or `args.optim`) with one group per (module, decay / no-decay), each at its module's LR."""
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        decay_names = set(self.get_decay_parameter_names(opt_model))
        decays = {id(p): n in decay_names for n, p in opt_model.named_parameters()}
        groups = []
        for module, params in module_parameters(opt_model).items():
            lr = self.args.module_learning_rate(module)
            for decay in (True, False):
                chosen = [p for p in params if p.requires_grad and decays.get(id(p)) == decay]
                if chosen:
                    groups.append({
                        "params": chosen,
                        "lr": lr,
                        "weight_decay": self.args.weight_decay if decay else 0.0,
                        "name": f"{module}{'' if decay else '.no_decay'}",
                    })
        if not groups:
            raise ValueError("no parameter requires grad: check trainable_modules / LoRA settings")
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "lr"}
        self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds each module's current learning rate (`learning_rate/<module>`) to training logs;
        Trainer's own `learning_rate` is only the first group's."""
        if "learning_rate" in logs:
            logs.update({f"learning_rate/{m}": lr for m, lr in self.module_learning_rates.rates.items()})
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        """`Trainer.train`, then the skipped-rows guard over every row this process encoded."""
        output = super().train(*args, **kwargs)
        if self.args.media_error_policy == "skip" and hasattr(self.data_collator, "check_skipped"):
            self.data_collator.check_skipped()
        return output

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """Our card (base model, stage, data, recipe, usage) instead of TRL's generic one."""
        self.write_model_card(self.args.output_dir)

    def write_model_card(self, output_dir: str) -> None:
        """Write README.md into `output_dir` (main process only)."""
        if not self.is_world_process_zero():
            return
        dataset = self.train_dataset
        data = sorted(set(dataset[SOURCE_COLUMN])) if dataset is not None and SOURCE_COLUMN in dataset.column_names else []
        card = model_card(self.args, self.base_model_name, data, len(dataset) if dataset is not None else 0,
                          STAGE_NAMES.get(self.args.stage), output_dir, adapter=self.args.lora)
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save model (or adapter), processor, the remote-code files and the model card, so the
        folder loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`."""
        output_dir = output_dir or self.args.output_dir
        register_auto_classes(self.model, self.processing_class)
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            copy_remote_code(output_dir, self.model, self.processing_class)
            self.write_model_card(output_dir)


class VisionEncoderAdaptationTrainer(Videollama3Trainer):
    """Stage 1: adapt the vision encoder to the LLM through the projector; the LLM stays frozen."""

    stage = 1


class VisionLanguageAlignmentTrainer(Videollama3Trainer):
    """Stage 2: train everything on large-scale image-text data to align vision and language."""

    stage = 2


class MultiTaskFineTuningTrainer(Videollama3Trainer):
    """Stage 3: multi-task instruction data (images, videos, text); DiffFP prunes video tokens."""

    stage = 3


class VideoCentricFineTuningTrainer(Videollama3Trainer):
    """Stage 4: video-centric instruction data; images merge 2x2 like video frames."""

    stage = 4


STAGE_TRAINERS = {
    1: VisionEncoderAdaptationTrainer,
    2: VisionLanguageAlignmentTrainer,
    3: MultiTaskFineTuningTrainer,
    4: VideoCentricFineTuningTrainer,
}

