"""Packing: rows never exceed seq_len, no token is lost, positions restart at documents."""
import numpy as np
import pytest

from spikingbrain.train.encode import IGNORE
from spikingbrain.train.packing import pack, pack_stream

PAD = 999


def _docs(seed, n=30, max_len=50):
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n):
        L = int(rng.integers(1, max_len))
        ids = list(rng.integers(0, 500, L))
        docs.append((ids, list(ids)))
    return docs


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64, 200])
@pytest.mark.parametrize("seed", [0, 1])
def test_pack_keeps_every_token_in_order_and_within_rows(seq_len, seed):
    docs = _docs(seed)
    rows = pack(docs, seq_len, PAD)
    ids = rows["input_ids"]
    assert ids.shape[1] == seq_len and rows["labels"].shape == ids.shape == rows["position_ids"].shape
    flat = ids.reshape(-1)
    n = sum(len(d[0]) for d in docs)
    assert np.array_equal(flat[:n], np.concatenate([d[0] for d in docs]))
    assert (flat[n:] == PAD).all() and len(flat) - n < seq_len  # only the last row is padded


def test_positions_restart_at_documents_and_rows():
    docs = [([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9, 10, 11], [6, 7, 8, 9, 10, 11])]
    rows = pack(docs, 4, PAD)
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, PAD]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2], [0, 1, 2, 0]]
    # a document's first token is never a target (no prediction across a boundary); a
    # continuation at a row start keeps its label (the HF shift drops column 0 anyway)
    assert rows["labels"].tolist() == [[IGNORE, 2, 3, IGNORE], [5, IGNORE, 7, 8], [9, 10, 11, IGNORE]]


def test_positions_match_a_reference_loop():
    docs = _docs(3, n=20, max_len=30)
    rows = pack(docs, 24, PAD)
    expect, p = [], 0
    for ids, _ in docs:
        expect.extend(range(len(ids)))
    flat_pos = rows["position_ids"].reshape(-1)
    # reference: restart at each document and at each row start
    ref = []
    k = 0
    for i, _ in enumerate(rows["input_ids"].reshape(-1)):
        if i < len(expect):
            starts_doc = expect[i] == 0
        else:
            starts_doc = i == len(expect)
        if starts_doc or i % 24 == 0:
            k = 0
        ref.append(k)
        k += 1
    assert flat_pos.tolist() == ref


def test_sft_labels_survive_packing():
    docs = [([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4]), ([5, 6, 7], [IGNORE, 6, 7])]
    rows = pack(docs, 8, PAD)
    assert rows["labels"].tolist() == [[IGNORE, IGNORE, 3, 4, IGNORE, 6, 7, IGNORE]]


@pytest.mark.parametrize("seq_len", [5, 16, 33])
def test_stream_packing_equals_in_memory_packing(seq_len):
    docs = _docs(5)
    rows = pack(docs, seq_len, PAD)
    streamed = list(pack_stream(iter(docs), seq_len, PAD))
    assert len(streamed) == rows["input_ids"].shape[0]
    for k in rows:
        assert np.array_equal(np.stack([r[k] for r in streamed]), rows[k]), k
