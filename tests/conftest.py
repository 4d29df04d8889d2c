"""Test-suite wide setup: make ``tests/testutils.py`` importable under ``--import-mode=importlib``."""
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)
