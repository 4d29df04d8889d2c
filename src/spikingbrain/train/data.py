"""Training and held-out data: documents -> packed rows -> global batches, resumable.

Order is a pure function of (seed, epoch, position): in memory, epoch ``e`` shuffles the
documents with ``numpy.random.default_rng([seed, e])`` and packs them (``packing.pack``);
streaming, ``datasets.IterableDataset.shuffle(seed, buffer)`` with ``set_epoch(e)`` feeds
``packing.pack_stream``. The position (epoch, rows consumed) is kept per sequence length (one
per stage) and saved in checkpoints, so a resumed run sees exactly the rows it would have seen.

Every process builds the same *global* batch and keeps its own slice: the batch (hence the
optimisation) is the same on 1 or N processes. Global batch ``[B, L]`` is split into
``grad_accum`` micro-batches of ``B / grad_accum`` rows; rank ``r`` of ``W`` takes rows
``[r*b, (r+1)*b)`` of each, ``b = B / grad_accum / W``. Streaming mode tokenizes the stream on
every rank (simple and exact; a cost when many ranks share slow tokenization).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from spikingbrain.errors import SpikingBrainError
from spikingbrain.train.encode import IGNORE, DocumentEncoder
from spikingbrain.train.packing import pack, pack_stream
from spikingbrain.train.recipe import DataSection
from spikingbrain.train.sources import iter_split, load_documents


@dataclass
class Batch:
    """This rank's micro-batches of one optimizer step.

    micro: list (length grad_accum) of dicts with ``input_ids``, ``labels``, ``position_ids``
        (``[b, L]`` int64).
    n_targets: label tokens that count in the loss in the whole *global* batch (after the
        HF shift: ``labels[:, 1:] != -100``), the loss normaliser shared by all ranks.
    n_tokens: tokens in the global batch (``B * L``), for throughput.
    """

    micro: list[dict[str, torch.Tensor]]
    n_targets: int
    n_tokens: int


class TrainData:
    def __init__(self, cfg: DataSection, encoder: DocumentEncoder, pad_id: int, *, seed: int,
                 batch_size: int, grad_accum: int, rank: int = 0, world_size: int = 1,
                 show_progress: bool = True):
        self.cfg, self.encoder, self.pad_id, self.seed = cfg, encoder, pad_id, seed
        self.batch_size, self.grad_accum, self.rank, self.world = batch_size, grad_accum, rank, world_size
        self.pos: dict[int, list[int]] = {}  # seq_len -> [epoch, rows consumed in that epoch]
        self._rows: dict[int, tuple[int, dict[str, np.ndarray]]] = {}  # seq_len -> (epoch, rows)
        self._streams: dict[int, tuple[int, int, object]] = {}  # seq_len -> (epoch, index, iterator)
        self._valid_cache: dict[tuple[int, int], dict[str, np.ndarray] | None] = {}
        if cfg.streaming:
            self._docs = None
        else:
            train = load_documents(cfg.train, cfg.format, text_sample_by=cfg.text_sample_by)
            docs = iter_split(train, "train", seed, cfg.valid_fraction, cfg.text_field, cfg.messages_field,
                              cfg.max_documents)
            it = tqdm(docs, desc="tokenizing", unit="doc", disable=not show_progress, leave=False)
            self._docs = [encoder(d) for d in it]
            if not self._docs:
                raise SpikingBrainError(f"recipe field data.train: no training documents in {cfg.train}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"positions": {str(k): list(v) for k, v in self.pos.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.pos = {int(k): [int(v[0]), int(v[1])] for k, v in state["positions"].items()}
        self._streams.clear()

    # ------------------------------------------------------------------ rows
    def _epoch_rows(self, seq_len: int, epoch: int) -> dict[str, np.ndarray]:
        cached = self._rows.get(seq_len)
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._docs))
            rows = pack((self._docs[i] for i in order), seq_len, self.pad_id)
            self._rows[seq_len] = (epoch, rows)
        return self._rows[seq_len][1]

    def _stream(self, epoch: int):
        ds = load_documents(self.cfg.train, self.cfg.format, streaming=True, text_sample_by=self.cfg.text_sample_by)
        ds = ds.shuffle(seed=self.seed, buffer_size=self.cfg.shuffle_buffer)
        ds.set_epoch(epoch)
        docs = iter_split(ds, "train", self.seed, self.cfg.valid_fraction, self.cfg.text_field,
                          self.cfg.messages_field, self.cfg.max_documents)
        return (self.encoder(d) for d in docs)

    def _take_stream(self, seq_len: int, n: int) -> dict[str, np.ndarray]:
        epoch, index = self.pos.setdefault(seq_len, [0, 0])
        st = self._streams.get(seq_len)
        if st is None or st[0] != epoch or st[1] != index:
            it = pack_stream(self._stream(epoch), seq_len, self.pad_id)
            for _ in range(index):  # resume: replay the epoch up to the saved position
                next(it)
            st = (epoch, index, it)
        epoch, index, it = st
        out = []
        while len(out) < n:
            row = next(it, None)
            if row is None:
                if index == 0:
                    raise SpikingBrainError(f"recipe field data.train: no training documents in {self.cfg.train}")
                epoch, index = epoch + 1, 0
                it = pack_stream(self._stream(epoch), seq_len, self.pad_id)
                continue
            out.append(row)
            index += 1
        self.pos[seq_len] = [epoch, index]
        self._streams[seq_len] = (epoch, index, it)
        return {k: np.stack([r[k] for r in out]) for k in out[0]}

    def _take(self, seq_len: int, n: int) -> dict[str, np.ndarray]:
        if self.cfg.streaming:
            return self._take_stream(seq_len, n)
        epoch, index = self.pos.setdefault(seq_len, [0, 0])
        parts = []
        need = n
        while need:
            rows = self._epoch_rows(seq_len, epoch)
            total = rows["input_ids"].shape[0]
            k = min(need, total - index)
            parts.append({key: v[index:index + k] for key, v in rows.items()})
            need -= k
            index += k
            if index == total:
                epoch, index = epoch + 1, 0
        self.pos[seq_len] = [epoch, index]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def peek(self, seq_len: int, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` rows of epoch 0 (e.g. for calibration); the position is unchanged."""
        if self.cfg.streaming:
            out = []
            for row in pack_stream(self._stream(0), seq_len, self.pad_id):
                out.append(row)
                if len(out) == n:
                    break
            return {k: np.stack([r[k] for r in out]) for k in out[0]}
        rows = self._epoch_rows(seq_len, 0)
        return {k: v[:n] for k, v in rows.items()}

    # ------------------------------------------------------------------ batches
    def next_batch(self, seq_len: int) -> Batch:
        rows = self._take(seq_len, self.batch_size)
        n_targets = int((rows["labels"][:, 1:] != IGNORE).sum())
        mb = self.batch_size // self.grad_accum
        b = mb // self.world
        micro = []
        for m in range(self.grad_accum):
            lo = m * mb + self.rank * b
            micro.append({k: torch.from_numpy(np.ascontiguousarray(v[lo:lo + b])) for k, v in rows.items()})
        return Batch(micro=micro, n_targets=n_targets, n_tokens=self.batch_size * seq_len)

    # ------------------------------------------------------------------ held-out
    def valid_rows(self, seq_len: int, max_tokens: int) -> dict[str, np.ndarray] | None:
        """The first ``ceil(max_tokens / seq_len)`` held-out rows in file order (all ranks
        get the same rows; the evaluator splits them). None when there is no held-out data."""
        key = (seq_len, max_tokens)
        if key in self._valid_cache:
            return self._valid_cache[key]
        cfg = self.cfg
        if cfg.valid:
            files, frac, split = cfg.valid, 0.0, "train"
        elif cfg.valid_fraction > 0:
            files, frac, split = cfg.train, cfg.valid_fraction, "valid"
        else:
            self._valid_cache[key] = None
            return None
        n_rows = max(1, -(-max_tokens // seq_len))
        ds = load_documents(files, cfg.format, streaming=True, text_sample_by=cfg.text_sample_by)
        docs = iter_split(ds, split, self.seed, frac, cfg.text_field, cfg.messages_field)
        out = []
        for row in pack_stream((self.encoder(d) for d in docs), seq_len, self.pad_id):
            out.append(row)
            if len(out) == n_rows:
                break
        rows = {k: np.stack([r[k] for r in out]) for k in out[0]} if out else None
        self._valid_cache[key] = rows
        return rows
