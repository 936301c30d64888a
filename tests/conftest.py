import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Make `tools`, `recipes`, `bench` and `examples` importable whatever directory pytest is started from.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# A module cache of this session's own (set before transformers is imported, which reads it once),
# so no test passes on a remote-code copy left by an earlier run; and no test reaches the Hub.
_modules = tempfile.mkdtemp(prefix="hf-modules-")
atexit.register(shutil.rmtree, _modules, ignore_errors=True)
os.environ["HF_MODULES_CACHE"] = _modules
os.environ["HF_HUB_OFFLINE"] = "1"
