"""The embedded default (`tiny_model/`) against the answers shipped with the README demo's media.

The expected answers are the bundled examples' ground truth (`examples/media/examples.json`, made
with the curriculum's drawing code), not recordings of the model, graded as the demo and the
held-out evaluation grade them (exact text; a time span when both ends are within 1 s). Every
bundled question must be answered right: the README's first command shows these answers.
"""

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from tools.local import REPO_ROOT
from trainer.checkpoint import REMOTE_CODE_FILES


def load_demo():
    return importlib.import_module("examples.demo")


DEMO = load_demo()
CASES = [
    pytest.param(kind, entry[kind], question, question_kind, expected, id=f"{kind}: {question}")
    for entry in DEMO.bundled_examples()
    for kind in ("image", "video") if kind in entry
    for question, question_kind, expected in zip(entry["questions"], entry["kinds"], entry["answers"])
]


@pytest.fixture(scope="module")
def model_and_processor():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    folder = str(REPO_ROOT / "tiny_model")
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True), AutoProcessor.from_pretrained(
        folder, trust_remote_code=True)


@pytest.mark.parametrize("kind, media, question, question_kind, expected", CASES)
def test_embedded_default_answers_the_bundled_examples(model_and_processor, kind, media, question, question_kind,
                                                       expected):
    model, processor = model_and_processor
    text, kept, pruned = DEMO.answer(model, processor, kind, media, question, 32)
    assert DEMO.is_correct(question_kind, text, expected), text


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_embedded_default_carries_the_repository_remote_code(name):
    """Loading `tiny_model/` runs the code in its folder, so it must be the repository's."""
    assert (REPO_ROOT / "tiny_model" / name).read_bytes() == (REPO_ROOT / name).read_bytes()
