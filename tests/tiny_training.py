"""What the training tests share: tiny media and rows, the tiny model and its saved base checkpoint,
and weight comparisons. The fixtures built from these are in `tests/conftest.py`."""

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.media import write_garbage, write_video
from tools.local import remote_module
from tools.tiny import tiny_config
from trainer.checkpoint import copy_remote_code, register_auto_classes

REPLIES = ["Grey noise.", "A square slides right.", "Hello there!", "Both are synthetic.", "Yes."]


def write_media(root):
    """The files the rows name: a noise image, a grey image, a 4 s video (1 s static) and an undecodable video."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)).save(root / "noise.png")
    Image.fromarray(np.full((42, 70, 3), 128, dtype=np.uint8)).save(root / "grey.png")
    write_video(root / "clip.mp4", seconds=4, fps=10, height=56, width=56, static_seconds=1)
    write_garbage(root / "broken.mp4")
    return root


def official_rows():
    return [
        {"image": "noise.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": REPLIES[0]},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": REPLIES[4]}]},
        {"video": ["clip.mp4"], "start_time": 0.0, "end_time": 3.0, "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"},
            {"from": "gpt", "value": REPLIES[1]}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": REPLIES[2]}]},
        {"image": ["grey.png"], "video": ["clip.mp4"], "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\n<video>\nCompare them."},
            {"from": "gpt", "value": REPLIES[3]}]},
    ]


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def tiny_model(processor, seed=0, **config):
    torch.manual_seed(seed)
    M = remote_module("modeling_videollama3")
    return M.Videollama3Qwen2ForCausalLM(tiny_config(processor.tokenizer, **config))


def save_base(model, processor, folder):
    """`model` and `processor` saved as a checkpoint the trainer and the Auto classes load; returns its path."""
    register_auto_classes(model, processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    copy_remote_code(folder, model, processor)
    return str(folder)


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def changed(a, b, prefix):
    """Whether any weight named `prefix...` differs between state dicts `a` and `b` (there must be some)."""
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(a[k], b[k]) for k in keys)
