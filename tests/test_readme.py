"""Every Python block of the README runs as written, from the repository root, in a fresh process.

The Training section's block trains and is run by tests/test_trainer_cli.py; blocks that need CUDA are
skipped where there is none.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from tools.local import REPO_ROOT


def python_blocks() -> list[tuple[str, str]]:
    """(section title, code) of each ```python block outside the Training section."""
    blocks, section = [], ""
    for part in re.split(r"(?m)^(## .*)$", (REPO_ROOT / "README.md").read_text()):
        if part.startswith("## "):
            section = part[3:].strip()
        elif section != "Training":
            blocks += [(section, code) for code in re.findall(r"```python\n(.*?)```", part, flags=re.S)]
    return blocks


@pytest.mark.parametrize("section, code", python_blocks(), ids=lambda value: value[:40] if isinstance(value, str) else "")
def test_readme_python_block_runs(section, code, tmp_path):
    if "cuda" in code and not torch.cuda.is_available():
        pytest.skip("the block needs CUDA")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README section {section!r}:\n{code}\n{done.stderr[-3000:]}"


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 1
