"""Model loading, LoRA / QLoRA configuration and adapter merging.

LoRA targets are a regex matched with `re.fullmatch` against module names, so the LLM's
`self_attn.q_proj` is hit while the vision encoder's (`model.vision_encoder.encoder.layers.N.
self_attn.q_proj`) is not; a plain list `["q_proj", ...]` would match both by suffix.
"""

import torch
from peft import LoraConfig, PeftConfig, PeftModel, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoProcessor, BitsAndBytesConfig, DistributedConfig

from .checkpoint import copy_remote_code, register_auto_classes

# Linear layers of the Qwen2 decoder: attention q/k/v/o and the SwiGLU MLP.
LLM_LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# Linear layers of the SigLIP vision encoder (opt-in).
VISION_LORA_TARGETS = r"model\.vision_encoder\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"


def lora_target_regex(train_llm: bool = True, train_vision: bool = False) -> str:
    """The `target_modules` regex for the LLM and, when asked, the vision encoder."""
    parts = ([LLM_LORA_TARGETS] if train_llm else []) + ([VISION_LORA_TARGETS] if train_vision else [])
    if not parts:
        raise ValueError("LoRA needs at least one of the LLM or the vision encoder as target")
    return "|".join(f"(?:{p})" for p in parts)


def build_lora_config(model, args):
    """`LoraConfig` from a `Videollama3SFTConfig`.

    The LLM gets adapters when `"llm"` is in `trainable_modules`; the projector, when listed, is
    trained fully and saved with the adapter (`modules_to_save`); the vision encoder gets adapters
    only with `lora_vision=True` (otherwise it stays frozen under LoRA).
    """
    modules_to_save = ["mm_projector"] if "mm_projector" in args.trainable_modules else None
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_regex("llm" in args.trainable_modules, args.lora_vision),
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )


def check_qlora_supported():
    """QLoRA's 4-bit kernels (bitsandbytes) need a CUDA GPU; refuse clearly elsewhere."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "QLoRA (load_in_4bit) needs a CUDA GPU and bitsandbytes, and this machine has no CUDA device. "
            "Train plain LoRA instead (drop --load-in-4bit)."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise RuntimeError("QLoRA (load_in_4bit) needs bitsandbytes: pip install bitsandbytes") from error


def load_model(path: str, args=None, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs)` in fp32, or 4-bit for QLoRA.

    `args.model_init_kwargs` (TRL's, e.g. `--model_init_kwargs '{"attn_implementation": "flash_attention_2"}'`)
    come first; `kwargs` override them.

    With `args.load_in_4bit`, only the LLM's linears are quantized (NF4, bf16 compute); the vision
    encoder, projector and LM head stay in bf16.
    """
    kwargs = {**((args.model_init_kwargs or {}) if args is not None else {}), **kwargs}
    kwargs["trust_remote_code"] = True  # the model class lives in the checkpoint's remote code
    if args is not None and args.load_in_4bit:
        check_qlora_supported()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=["vision_encoder", "mm_projector", "lm_head"],
        )
        kwargs.setdefault("dtype", torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.activation_checkpointing))
    # Full-weight training keeps fp32 master weights; `bf16=True` then means mixed precision (autocast).
    kwargs.setdefault("dtype", torch.float32)
    if args is not None and args.fsdp_size is not None:
        kwargs["distributed_config"] = DistributedConfig(fsdp_size=args.fsdp_size)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def merge_adapter(adapter_dir: str, output_dir: str, base_model_dir: str | None = None) -> str:
    """Fold a LoRA adapter into its base model and save a complete checkpoint (with processor and code)."""
    if base_model_dir is None:
        base_model_dir = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, trust_remote_code=True)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    processor = AutoProcessor.from_pretrained(adapter_dir, trust_remote_code=True)
    register_auto_classes(merged, processor)
    merged.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    copy_remote_code(output_dir, merged, processor)
    return output_dir
