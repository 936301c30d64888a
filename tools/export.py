"""Write a Hub-ready VideoLLaMA3 folder from a trained, official, or transformers-native checkpoint.

    python -m tools.export SOURCE OUT [--dtype bfloat16]

SOURCE is a local folder in one of three layouts, detected from its config.json:
  * this repository's (a `trainer/` stage output or an earlier export): copied through;
  * the official DAMO-NLP-SG Hub layout (`model_type: videollama3_qwen2`): loads unchanged;
  * transformers' native port (`model_type: video_llama_3`, the `-HF` checkpoints): tensors are
    renamed to the official keys and the `<image>` placeholder replaces `<|image_pad|>`.
OUT receives the remote-code files, config.json with the full auto_map, the weights, the processor
files with the chat template that carries generation markers, and `README.md` (the model card).
Push it with `huggingface-cli upload <org>/<name> OUT` or `HfApi().upload_folder(...)`.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from tools.local import REPO_ROOT, remote_module

# transformers' native port names the same tensors differently (model.vision_model, model.projector, model.language_model).
NATIVE_KEY_RENAMES = (
    ("model.vision_model.", "model.vision_encoder."),
    ("model.projector.", "model.mm_projector."),
    ("model.language_model.", "model."),
)
NATIVE_TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
    "max_window_layers", "use_sliding_window", "sliding_window", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
)
NATIVE_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
)


def source_layout(source: Path) -> str:
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{source} has no config.json: not a checkpoint folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type == "videollama3_qwen2":
        return "videollama3"
    if model_type == "video_llama_3":
        return "native"
    raise ValueError(f"{config_file}: model_type {model_type!r} is neither 'videollama3_qwen2' nor 'video_llama_3'")


def native_config(source: Path, image_token_index: int):
    """Our flat config from a native `VideoLlama3Config` dict (text_config + vision_config)."""
    raw = json.loads((source / "config.json").read_text())
    text, vision = raw["text_config"], raw["vision_config"]
    fields = {k: text[k] for k in NATIVE_TEXT_FIELDS if k in text}
    fields["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    fields["vision_encoder_config"] = {k: vision[k] for k in NATIVE_VISION_FIELDS if k in vision}
    fields["image_token_index"] = image_token_index
    return remote_module("configuration_videollama3").Videollama3Qwen2Config(**fields)


def native_tokenizer(source: Path, vocab_size: int):
    """The native tokenizer with the official `<image>` placeholder added when it lacks one."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id >= vocab_size:
        raise ValueError(f"{source}: <image> would get id {image_id}, beyond the model's vocab_size {vocab_size}")
    return tokenizer


def native_state_dict(source: Path) -> dict:
    """All tensors of a native checkpoint (one file or shards), renamed to the official keys."""
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{source} has no .safetensors weights")
    state = {}
    for file in files:
        for key, tensor in load_file(file).items():
            for old, new in NATIVE_KEY_RENAMES:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            state[key] = tensor
    return state


def export(source, out, dtype: torch.dtype | None = None) -> Path:
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty")
    modeling = remote_module("modeling_videollama3")
    processing = remote_module("processing_videollama3")
    image_processing = remote_module("image_processing_videollama3")
    model_class = modeling.Videollama3Qwen2ForCausalLM

    if source_layout(source) == "native":
        vocab_size = json.loads((source / "config.json").read_text())["text_config"]["vocab_size"]
        tokenizer = native_tokenizer(source, vocab_size)
        config = native_config(source, tokenizer.convert_tokens_to_ids("<image>"))
        with tempfile.TemporaryDirectory() as renamed:
            config.save_pretrained(renamed)
            save_file(native_state_dict(source), Path(renamed) / "model.safetensors", metadata={"format": "pt"})
            model = model_class.from_pretrained(renamed, dtype=dtype)
        # The native processor's budgets are in pixels; the official defaults are used instead.
        processor = processing.Videollama3Qwen2Processor(image_processing.Videollama3ImageProcessor(), tokenizer)
    else:
        model = model_class.from_pretrained(source, dtype=dtype)
        processor = processing.Videollama3Qwen2Processor.from_pretrained(source, trust_remote_code=True)  # our own files
        # Official folders ship a template without generation markers; ours renders the same bytes
        # and also marks assistant replies, which assistant-only training needs.
        processor.chat_template = processing.CHAT_TEMPLATE

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    shutil.copy(REPO_ROOT / "model_card.md", out / "README.md")
    shutil.copy(REPO_ROOT / "handler.py", out / "handler.py")  # the Inference Endpoint route for remote code
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint folder: this repository's, official, or native -HF layout")
    parser.add_argument("out", help="empty or new folder to write")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights")
    args = parser.parse_args(argv)
    export(args.source, args.out, getattr(torch, args.dtype) if args.dtype else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
