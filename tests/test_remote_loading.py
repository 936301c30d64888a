"""Remote code as users load it: the Auto classes in a fresh process with a fresh module cache, from a
local folder, an official-layout folder and a Hub snapshot, all giving the same inputs and tokens."""

import subprocess
import sys

import pytest
import torch

from tests.remote_smoke import CONVERSATION, LAYOUTS, in_fresh_process
from tools.local import REPO_ROOT, remote_module


@pytest.fixture(scope="module")
def reference():
    """The same conversation through this checkout's files imported in-process (no Hub loader)."""
    processor = remote_module("processing_videollama3").Videollama3Qwen2Processor.from_pretrained(
        str(REPO_ROOT / "tiny_model"), trust_remote_code=True)
    inputs = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    model = remote_module("modeling_videollama3").Videollama3Qwen2ForCausalLM.from_pretrained(str(REPO_ROOT / "tiny_model"))
    with torch.no_grad():
        generated = model.eval().generate(**inputs, max_new_tokens=4, do_sample=False)
    return dict(inputs, generated=generated[0, inputs["input_ids"].shape[1]:].tolist())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_auto_classes_in_a_fresh_process(layout, tmp_path, reference):
    out = in_fresh_process(REPO_ROOT / "tiny_model", layout, tmp_path / f"modules-{layout}")
    assert out["input_ids"] == reference["input_ids"][0].tolist()
    assert out["grid_sizes"] == reference["grid_sizes"].tolist()
    assert out["kept_tokens"] == int(reference["compression_mask"].sum()) < int(reference["compression_mask"].numel())
    assert out["pixel_sum"] == pytest.approx(float(reference["pixel_values"].double().sum()), rel=1e-12)
    assert out["generated"] == reference["generated"] and not out["torchvision_imported"]
    assert out["loaded_before"] == []  # nothing of the checkout (nor pytest) ahead of the Auto classes
    if layout == "snapshot":  # a Hub snapshot's files share one module folder named by the commit
        assert out["processor_module"].endswith("videollama3.tiny.0123456789abcdef0123456789abcdef01234567.processing_videollama3")
    else:
        assert out["processor_module"].startswith("transformers_modules.checkpoint.")


def test_the_tokenizer_alone_needs_no_remote_code():
    """`trust_remote_code=False` loads the tokenizer without prompting; without the flag transformers asks
    about the folder's config.json code (AutoTokenizer reads the config first), which nothing here can change."""
    code = ("from transformers import AutoTokenizer; "
            "t = AutoTokenizer.from_pretrained('tiny_model', trust_remote_code=False); print(type(t).__name__, len(t))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and "[y/N]" not in done.stdout + done.stderr, done.stderr[-2000:]
    assert done.stdout.split()[0] in ("Qwen2Tokenizer", "Qwen2TokenizerFast", "TokenizersBackend")
