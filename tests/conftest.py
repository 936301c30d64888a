import sys
from pathlib import Path

# Make `tools` and `tests.tiny` importable whatever directory pytest is started from.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
