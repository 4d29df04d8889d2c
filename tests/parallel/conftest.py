"""Put this folder on ``sys.path`` (``--import-mode=importlib`` does not) so that the tests and
the spawned worker processes import the shared ``cp_worker`` module."""
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
