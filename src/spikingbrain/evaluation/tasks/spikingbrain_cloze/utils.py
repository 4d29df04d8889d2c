"""Data loader for the spikingbrain_cloze lm-eval task: reads the JSONL that sits next to the
YAML, so the task works from any working directory and without network."""
import json
from pathlib import Path


def load_cloze(data_files=None, **_metadata):
    """``data_files``: optional ``{"test": path}`` to score other items in the same format.
    Returns a ``datasets.DatasetDict`` with a ``test`` split."""
    import datasets

    path = Path((data_files or {}).get("test") or Path(__file__).with_name("cloze_test.jsonl"))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
