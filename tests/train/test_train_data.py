"""Data: formats, seeded order, held-out split, exact resume of the data position."""
import json

import numpy as np
import pytest

from spikingbrain.errors import SpikingBrainError
from spikingbrain.train.data import TrainData
from spikingbrain.train.encode import DocumentEncoder
from spikingbrain.train.recipe import DataSection
from spikingbrain.train.sources import detect_format, iter_split, load_documents
from spikingbrain.train.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def enc():
    return DocumentEncoder(byte_tokenizer(), "cpt")


def make(enc, files, seed=0, streaming=False, world=1, rank=0, **cfg):
    c = DataSection(train=[str(f) for f in files], seq_len=32, streaming=streaming, shuffle_buffer=16, **cfg)
    return TrainData(c, enc, 256, seed=seed, batch_size=4, grad_accum=2, rank=rank, world_size=world,
                     show_progress=False)


def batches(data, n, seq_len=32):
    return [np.concatenate([m["input_ids"].numpy() for m in data.next_batch(seq_len).micro]) for _ in range(n)]


def test_order_is_seeded_and_epochs_reshuffle(enc, text_files):
    a, b, c = make(enc, [text_files["train"]]), make(enc, [text_files["train"]]), make(enc, [text_files["train"]], seed=1)
    ba, bb, bc = batches(a, 3), batches(b, 3), batches(c, 3)
    assert all(np.array_equal(x, y) for x, y in zip(ba, bb))
    assert not all(np.array_equal(x, y) for x, y in zip(ba, bc))
    rows = a._epoch_rows(32, 0)["input_ids"].shape[0]
    assert not np.array_equal(a._epoch_rows(32, 0)["input_ids"], a._epoch_rows(32, 1)["input_ids"])
    assert a._epoch_rows(32, 1)["input_ids"].shape[0] == rows  # same tokens, new order


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_continues_exactly(enc, text_files, streaming):
    a = make(enc, [text_files["train"]], streaming=streaming)
    batches(a, 5)
    state = json.loads(json.dumps(a.state_dict()))  # it goes through trainer.json
    expect = batches(a, 40)  # runs past the end of an epoch
    b = make(enc, [text_files["train"]], streaming=streaming)
    b.load_state_dict(state)
    got = batches(b, 40)
    assert all(np.array_equal(x, y) for x, y in zip(expect, got))


def test_ranks_split_the_same_global_batch(enc, text_files):
    one = make(enc, [text_files["train"]]).next_batch(32)
    r0 = make(enc, [text_files["train"]], world=2, rank=0).next_batch(32)
    r1 = make(enc, [text_files["train"]], world=2, rank=1).next_batch(32)
    assert r0.n_targets == r1.n_targets == one.n_targets
    for m in range(2):
        joined = np.concatenate([r0.micro[m]["input_ids"].numpy(), r1.micro[m]["input_ids"].numpy()])
        assert np.array_equal(joined, one.micro[m]["input_ids"].numpy())


def test_held_out_split_is_disjoint_and_stable(text_files):
    docs = list(load_documents([str(text_files["train"])]))
    tr = [d["text"] for d in iter_split(docs, "train", 0, 0.3, "text", "messages")]
    va = [d["text"] for d in iter_split(docs, "valid", 0, 0.3, "text", "messages")]
    assert len(tr) + len(va) == len(docs) and not set(tr) & set(va) and 5 < len(va) < 40
    assert va == [d["text"] for d in iter_split(list(reversed(docs)), "valid", 0, 0.3, "text", "messages")][::-1]


def test_formats(tmp_path, enc):
    import datasets

    (tmp_path / "a.txt").write_text("first doc\n\nsecond para")
    datasets.Dataset.from_dict({"text": ["parquet one", "parquet two"]}).to_parquet(str(tmp_path / "p.parquet"))
    assert [d["text"] for d in load_documents([str(tmp_path / "p.parquet")])] == ["parquet one", "parquet two"]
    assert len(list(load_documents([str(tmp_path / "a.txt")], text_sample_by="paragraph"))) == 2
    assert len(list(load_documents([str(tmp_path / "a.txt")]))) == 1
    with pytest.raises(SpikingBrainError, match="data.train"):
        detect_format([str(tmp_path / "a.txt"), str(tmp_path / "p.parquet")])
    with pytest.raises(SpikingBrainError, match="data.format"):
        detect_format([str(tmp_path / "a.csv")])
    d = make(enc, [tmp_path / "p.parquet"])
    # one row holds both documents; a batch of 4 rows wraps 4 epochs. Targets per document:
    # its tokens + EOS - its first token
    assert d.next_batch(32).n_targets == 4 * (len("parquet one") + len("parquet two"))


def test_valid_rows(enc, text_files):
    d = make(enc, [text_files["train"]], valid=[str(text_files["valid"])])
    rows = d.valid_rows(32, 100)
    assert rows["input_ids"].shape == (4, 32)
    assert make(enc, [text_files["train"]]).valid_rows(32, 100) is None
