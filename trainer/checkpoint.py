"""What makes a stage's output folder a complete checkpoint: auto-class registration, the
remote-code files, and the model card.

`trainers` and `lora` both save checkpoints, so this module imports neither.
"""

import inspect
import os
import shutil
from enum import Enum
from pathlib import Path

from torch import nn
from torch.distributed.fsdp import FSDPModule

REMOTE_CODE_FILES = (
    "configuration_videollama3.py",
    "modeling_videollama3.py",
    "processing_videollama3.py",
    "image_processing_videollama3.py",
    "video_processing_videollama3.py",
)


def unwrap(model: nn.Module) -> nn.Module:
    """The `Videollama3Qwen2ForCausalLM` inside a PEFT and/or distributed wrapper."""
    while hasattr(model, "module") and not hasattr(model, "lm_head"):
        model = model.module  # DDP / DeepSpeed engines
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def model_class(model: nn.Module) -> type:
    """The class the checkpoint's remote code defines: FSDP2 swaps in a subclass of it that lives in torch."""
    return next(cls for cls in type(unwrap(model)).__mro__ if not issubclass(cls, FSDPModule))


def register_auto_classes(model, processor):
    """Register the live classes so `save_pretrained` writes their `auto_map` entries."""
    base = unwrap(model)
    own = model_class(base)
    own.register_for_auto_class("AutoModelForCausalLM")
    if type(base) is not own:
        # save_pretrained would copy torch's FSDP module as the model's code and map AutoModelForCausalLM to it;
        # copy_remote_code copies ours instead, and the config maps the model as custom_object_save would.
        type(base)._auto_class = None
        base.config.auto_map = {**(getattr(base.config, "auto_map", None) or {}),
                                "AutoModelForCausalLM": f"{own.__module__.rpartition('.')[2]}.{own.__name__}"}
    if processor is not None and getattr(type(processor), "_auto_class", None) is None:
        type(processor).register_for_auto_class("AutoProcessor")
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and getattr(type(image_processor), "_auto_class", None) is None:
        type(image_processor).register_for_auto_class("AutoImageProcessor")


def copy_remote_code(output_dir, model=None, processor=None) -> list[str]:
    """Copy the remote-code `.py` files that define the loaded classes into `output_dir`.

    The files are taken from where the live classes came from (this checkout or the Hub module
    cache), falling back to the checkout next to this package.
    """
    sources = {}
    base = unwrap(model) if model is not None else None
    objects = (getattr(base, "config", None), processor, getattr(processor, "image_processor", None))
    classes = ([model_class(base)] if base is not None else []) + [type(obj) for obj in objects if obj is not None]
    for cls in classes:
        try:
            path = Path(inspect.getfile(cls))
        except TypeError:
            continue
        sources.setdefault(path.name, path)
        for name in REMOTE_CODE_FILES:  # siblings, e.g. the configuration next to the modeling file
            if (path.parent / name).exists():
                sources.setdefault(name, path.parent / name)
    checkout = Path(__file__).resolve().parent.parent
    copied = []
    os.makedirs(output_dir, exist_ok=True)
    for name in REMOTE_CODE_FILES:
        source = sources.get(name) or (checkout / name)
        if source.exists() and source.resolve() != (Path(output_dir) / name).resolve():
            shutil.copyfile(source, Path(output_dir) / name)
            copied.append(name)
    return copied


# The usage snippet of a stage's card: how the model loads (full weights or an adapter), then one chat turn.
LOAD_FULL = 'model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)'
LOAD_ADAPTER = (
    'base = AutoModelForImageTextToText.from_pretrained("{base}", trust_remote_code=True)\n'
    "model = PeftModel.from_pretrained(base, path)"
)
USAGE = '''```python
{imports}from transformers import AutoModelForImageTextToText, AutoProcessor

path = "{path}"
{load}
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "image": "photo.png"}},
                                        {{"type": "text", "text": "What is in the picture?"}}]}}]
inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                       return_dict=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```'''

# The settings a stage's card lists: what decides what the run learned.
CARD_SETTINGS = (
    "trainable_modules", "vision_encoder_learning_rate", "projector_learning_rate", "llm_learning_rate",
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "image_merge_size", "video_merge_size",
    "fps", "max_frames", "max_visual_tokens", "use_token_compression", "max_length", "multimodal_packing",
    "bf16", "lora", "seed",
)
LORA_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_vision")


def model_card(args, base_model: str, data: list[str], num_rows: int, stage_name: str | None,
               output_dir: str, adapter: bool) -> str:
    """The README.md of a stage's output folder: base model, stage, data, recipe and usage."""
    stage = f"stage {args.stage} ({stage_name})" if args.stage is not None else "a custom recipe"
    tags = ["videollama3", "custom_code", "trl", "sft"] + ([f"stage-{args.stage}"] if args.stage else [])
    tags += ["peft", "lora"] if adapter else []
    base_line = f"  - {base_model}\n" if base_model and not os.path.isdir(base_model) else ""
    values = {k: getattr(args, k) for k in CARD_SETTINGS + (LORA_SETTINGS if adapter else ())}
    recipe = "\n".join(f"| `{k}` | `{v.value if isinstance(v, Enum) else v}` |" for k, v in values.items())
    sources = ", ".join(f"`{d}`" for d in data) if data else "rows passed in memory"
    usage = USAGE.format(imports="from peft import PeftModel\n" if adapter else "", path=output_dir,
                         load=LOAD_ADAPTER.format(base=base_model) if adapter else LOAD_FULL)
    return (
        "---\n"
        "library_name: " + ("peft" if adapter else "transformers") + "\n"
        "pipeline_tag: image-text-to-text\n"
        + (f"base_model:\n{base_line}" if base_line else "")
        + "tags:\n" + "".join(f"  - {t}\n" for t in tags)
        + "---\n\n"
        f"# VideoLLaMA3, {stage}\n\n"
        f"Trained with this repository's `trainer` ({'a LoRA adapter' if adapter else 'full weights'}).\n\n"
        f"- base model: `{base_model}`\n"
        f"- stage: {stage}\n"
        f"- data: {sources} ({num_rows} rows)\n\n"
        "## Recipe\n\n| setting | value |\n|---|---|\n" + recipe + "\n\n"
        "## Usage (image-text-to-text)\n\n" + usage + "\n"
    )
