"""Packing tokenized documents into fixed-length rows.

Documents are concatenated in order and cut every ``seq_len`` tokens; the tail of the last row
is padded (pad id, label -100) so no token is dropped. Per row:

- ``input_ids``, ``labels``: ``[N, seq_len]`` int64. Labels follow the HF convention (the
  model shifts them), so the label at a document's first token is set to -100: nothing is
  ever predicted across a document boundary.
- ``position_ids``: ``[N, seq_len]``, restarting at 0 at every document start and at every row
  start (a document cut by a row boundary continues in the next row as a new segment that
  cannot see its beginning). Padding forms its own segment.

Boundary handling is done by position resets (HF's "flattening" convention), not by
``cu_seqlens``: SpikingBrain zeroes the GLA state and masks SWA/full attention wherever the
position does not increase, so a token never sees another document. Hugging Face models
(transformers >= 5) derive the same block-causal mask from restarting ``position_ids`` when
called with ``use_cache=False`` and no ``attention_mask``, which is how the trainer calls them.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from spikingbrain.train.encode import IGNORE


def position_ids_from_starts(starts: np.ndarray) -> np.ndarray:
    """``starts``: ``[N, L]`` bool, True where a segment begins (column 0 is forced True).
    Returns ``[N, L]`` int64 distances to the last segment start."""
    starts = starts.copy()
    starts[:, 0] = True
    idx = np.broadcast_to(np.arange(starts.shape[1]), starts.shape)
    last = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - last).astype(np.int64)


def pack(docs: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pack ``(ids, labels)`` documents into rows (see the module docstring)."""
    ids, labels, starts = [], [], []
    for d_ids, d_labels in docs:
        if not d_ids:
            continue
        ids.append(np.asarray(d_ids, dtype=np.int64))
        lab = np.asarray(d_labels, dtype=np.int64)
        if len(lab) != len(d_ids):
            raise ValueError("ids and labels differ in length")
        st = np.zeros(len(d_ids), dtype=bool)
        st[0] = True
        labels.append(lab)
        starts.append(st)
    if not ids:
        empty = np.zeros((0, seq_len), dtype=np.int64)
        return {"input_ids": empty, "labels": empty.copy(), "position_ids": empty.copy()}
    return _rows(np.concatenate(ids), np.concatenate(labels), np.concatenate(starts), seq_len, pad_id)


def _rows(ids, labels, starts, seq_len, pad_id):
    n = len(ids)
    rows = -(-n // seq_len)
    pad = rows * seq_len - n
    if pad:
        ids = np.concatenate([ids, np.full(pad, pad_id, dtype=np.int64)])
        labels = np.concatenate([labels, np.full(pad, IGNORE, dtype=np.int64)])
        st = np.zeros(pad, dtype=bool)
        st[0] = True
        starts = np.concatenate([starts, st])
    labels = np.where(starts, IGNORE, labels)
    starts = starts.reshape(rows, seq_len)
    return {
        "input_ids": ids.reshape(rows, seq_len),
        "labels": labels.reshape(rows, seq_len),
        "position_ids": position_ids_from_starts(starts),
    }


def pack_stream(docs: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
                flush: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Streaming version of ``pack``: yields one row at a time (dict of ``[seq_len]`` arrays),
    identical to the rows ``pack`` would produce for the same documents."""
    buf_ids, buf_lab, buf_st, size = [], [], [], 0
    for d_ids, d_labels in docs:
        if not d_ids:
            continue
        st = np.zeros(len(d_ids), dtype=bool)
        st[0] = True
        buf_ids.append(np.asarray(d_ids, dtype=np.int64))
        buf_lab.append(np.asarray(d_labels, dtype=np.int64))
        buf_st.append(st)
        size += len(d_ids)
        if size >= seq_len:
            ids, lab, st = (np.concatenate(b) for b in (buf_ids, buf_lab, buf_st))
            full = (size // seq_len) * seq_len
            block = _rows(ids[:full], lab[:full], st[:full], seq_len, pad_id)
            for r in range(block["input_ids"].shape[0]):
                yield {k: v[r] for k, v in block.items()}
            buf_ids, buf_lab, buf_st, size = [ids[full:]], [lab[full:]], [st[full:]], size - full
    if flush and size:
        ids, lab, st = (np.concatenate(b) for b in (buf_ids, buf_lab, buf_st))
        block = _rows(ids, lab, st, seq_len, pad_id)
        yield {k: v[0] for k, v in block.items()}
