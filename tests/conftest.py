"""Test-suite wide setup: make ``tests/testutils.py`` importable under ``--import-mode=importlib``."""
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for the whole suite: the models here are tiny, and on 2 shared cores
    OpenMP's thread hand-off was measured to cost more than the work (up to 30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
