"""Import this checkout's remote-code files as a package, the way the Hub loader sees them.

The `*_videollama3.py` files use single-dot relative imports (the only form the Hub's
dynamic-module loader follows), so they cannot be imported as top-level modules. Tests, benchmarks
and tools import them through a synthetic package whose path is the repository root.
"""

import importlib
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "videollama3_local"


def remote_module(name: str) -> types.ModuleType:
    """Return `<repo>/<name>.py` imported as `videollama3_local.<name>`."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(REPO_ROOT)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")
