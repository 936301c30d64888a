import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Make `tools`, `recipes`, `bench` and `examples` importable whatever directory pytest is started from.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# A module cache of this session's own (set before transformers is imported, which reads it once),
# so no test passes on a remote-code copy left by an earlier run; and no test reaches the Hub.
_modules = tempfile.mkdtemp(prefix="hf-modules-")
atexit.register(shutil.rmtree, _modules, ignore_errors=True)
os.environ["HF_MODULES_CACHE"] = _modules
os.environ["HF_HUB_OFFLINE"] = "1"


# ------------------------------------------------------------------------------------------------
# Fixtures of the training tests (test_trainer*.py, test_gpu.py); each test module builds its own.
# They import `tests.tiny_training` when first used, so that collecting other tests stays light and
# nothing imports transformers before the environment above is set.


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    """The images and videos the training rows name (`tests.tiny_training.write_media`)."""
    from tests.tiny_training import write_media

    return write_media(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def processor():
    """The tiny processor; test modules with a processor of their own override this."""
    from tests.tiny_processor import tiny_processor

    return tiny_processor()


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A saved tiny model (seed 0) with the tiny processor and remote code: a `--model` for the CLI."""
    from tests.tiny_processor import tiny_processor
    from tests.tiny_training import save_base, tiny_model

    processor = tiny_processor()
    return save_base(tiny_model(processor), processor, tmp_path_factory.mktemp("base") / "ckpt")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """The four official-format rows (image, video, text, image + video) as a JSONL file."""
    from tests.tiny_training import official_rows, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("cli-data") / "train.jsonl", official_rows())
