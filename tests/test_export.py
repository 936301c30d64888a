"""Export to a Hub folder from our, the official, and the native layout: same logits after loading."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoProcessor

from tools.oracle import native_twin
from tests.test_processing import official_checkpoint
from tools.tiny import tiny_config, tiny_tokenizer
from tests.tiny_processor import tiny_processor
from tools.export import export
from tools.local import REPO_ROOT, remote_module

M = remote_module("modeling_videollama3")
REMOTE_FILES = [
    "configuration_videollama3.py", "modeling_videollama3.py", "processing_videollama3.py",
    "image_processing_videollama3.py", "video_processing_videollama3.py",
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return M.Videollama3Qwen2ForCausalLM(tiny_config(tiny_tokenizer())).eval()


def ours(model, folder):
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def official(model, folder):
    official_checkpoint(folder)  # tokenizer + official processor files
    config = model.config.to_dict()
    config["auto_map"] = {
        "AutoConfig": "configuration_videollama3.Videollama3Qwen2Config",
        "AutoModelForCausalLM": "modeling_videollama3.Videollama3Qwen2ForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def native(model, folder):
    native_twin(model, video_token_id=tiny_tokenizer().convert_tokens_to_ids("<|stream_start|>")).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("layout", [ours, official, native])
def test_export_round_trip(model, tmp_path, layout):
    source = layout(model, tmp_path / "source")
    out = export(source, tmp_path / "hub")
    for name in REMOTE_FILES + ["README.md", "handler.py", "chat_template.jinja", "config.json", "model.safetensors"]:
        assert (out / name).is_file(), name
    for name in REMOTE_FILES:
        assert (out / name).read_text() == (REPO_ROOT / name).read_text()
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert {"AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoProcessor"} <= set(auto_map)

    loaded, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    frames = torch.randint(0, 255, (3, 56, 84, 3), dtype=torch.uint8).numpy()
    messages = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What?"}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).logits, model(**inputs).logits)


def test_export_refuses_unknown_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is neither"):
        export(tmp_path, tmp_path / "out")
