"""Reading documents from local files through Hugging Face ``datasets``, and the held-out split.

A document is a mapping with a text field (``{"text": ...}``) or a chat (``{"messages":
[{"role", "content"}, ...]}``). Plain-text files yield one document per file, paragraph or
line (``data.text_sample_by``). ``streaming=True`` reads lazily (corpora larger than memory).
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator

from spikingbrain.errors import SpikingBrainError

_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".md": "text", ".text": "text"}
_BUILDER = {"jsonl": "json", "parquet": "parquet", "text": "text"}


def detect_format(files: list[str], fmt: str = "auto") -> str:
    """The ``datasets`` builder name for ``files`` (all must share one format)."""
    if fmt != "auto":
        return _BUILDER[fmt]
    kinds = set()
    for f in files:
        name = f[:-3] if f.endswith(".gz") else f
        ext = os.path.splitext(name)[1].lower()
        if ext not in _EXT:
            raise SpikingBrainError(
                f"recipe field data.format: cannot tell the format of {f!r} from its extension; "
                "set data.format to text | jsonl | parquet"
            )
        kinds.add(_EXT[ext])
    if len(kinds) > 1:
        raise SpikingBrainError(f"recipe field data.train: files mix formats {sorted(kinds)}; use one format per list")
    return _BUILDER[kinds.pop()]


def load_documents(files: list[str], fmt: str = "auto", *, streaming: bool = False,
                   text_sample_by: str = "document"):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when streaming) of the files' documents."""
    import datasets

    builder = detect_format(files, fmt)
    kwargs = {"sample_by": text_sample_by} if builder == "text" else {}
    prev = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files={"train": list(files)}, split="train",
                                     streaming=streaming, **kwargs)
    except Exception as e:  # malformed files surface as many exception types inside datasets
        raise SpikingBrainError(f"could not read {files}: {type(e).__name__}: {e}") from None
    finally:
        datasets.utils.logging.set_verbosity(prev)
        datasets.enable_progress_bars()


def document_key(doc: dict, text_field: str, messages_field: str) -> str:
    """The content that identifies a document (for the held-out split)."""
    if doc.get(text_field) is not None:
        return str(doc[text_field])
    if doc.get(messages_field) is not None:
        return json.dumps(doc[messages_field], sort_keys=True, ensure_ascii=False)
    raise SpikingBrainError(f"a document has neither a {text_field!r} nor a {messages_field!r} field: {str(doc)[:200]}")


def is_held_out(key: str, seed: int, fraction: float) -> bool:
    """Seeded hash split: the same document lands on the same side in every run and in
    streaming mode, independently of file order. Share held out ~= ``fraction``."""
    if fraction <= 0:
        return False
    h = zlib.crc32(f"{seed}\x00{key}".encode("utf-8", "surrogatepass"))
    return h / 2**32 < fraction


def iter_split(docs, split: str, seed: int, fraction: float, text_field: str, messages_field: str,
               max_documents: int | None = None) -> Iterator[dict]:
    """Documents of ``split`` ("train" | "valid") under the hash split (``fraction`` 0: all
    train); ``max_documents`` caps the documents read from the files, before the split."""
    n = 0
    for doc in docs:
        if max_documents is not None and n >= max_documents:
            return
        n += 1
        held = is_held_out(document_key(doc, text_field, messages_field), seed, fraction)
        if held == (split == "valid"):
            yield doc
