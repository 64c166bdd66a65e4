"""The examples are scripts, run as ``python examples/<name>.py``, and import each other by bare name; the
tests that use them import them the same way."""

import sys
from pathlib import Path

EXAMPLES = str(Path(__file__).resolve().parent.parent / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
