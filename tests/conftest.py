import sys
from pathlib import Path

# Make `tools`, `recipes`, `bench` and `examples` importable whatever directory pytest is started from.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
