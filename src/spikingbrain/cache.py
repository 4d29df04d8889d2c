"""Decode state of a SpikingBrain model: constant size per layer except full attention.

- ``gla`` layers keep the recurrent state ``[B, H, K, V]`` (fp32).
- ``swa`` layers keep a ring buffer of ``w`` key/value slots ``[B, Hkv, w, D]``.
- ``full`` layers keep growing keys/values.
- hybrids keep both of their branches' states; sink-token keys/values are stored once per layer.

Semantics (what makes cached decoding equal one full forward for any attention mask; the dense
reference ``tests/dense_reference.py`` states the same rules independently):

- **Real tokens and padding.** A token is real where ``attention_mask`` is 1. Padding (left,
  right, or holes anywhere) does not exist for the model: it never enters any state, never
  moves a ring, never advances a position, and its own outputs are unspecified.
- **Positions.** Per row, ``next_pos`` is the position of the last real token fed plus one (0
  before any). Without ``position_ids`` the real tokens of a chunk get ``next_pos, next_pos + 1,
  ...``; given ``position_ids`` are used as they are (the value at padding is ignored).
- **Documents.** A real token whose position is not greater than the previous real token's of
  the same row (in this chunk or, for the chunk's first real token, ``next_pos - 1`` from the
  cache) starts a new document. Nothing crosses a document boundary, whether it falls inside a
  chunk or exactly between two chunks: the GLA state restarts from zero, and every key/value the
  row had cached is dropped (marked invalid). So a row's state only ever holds its current
  document.
- **Sliding window.** Query at position ``p`` sees the keys of its document at positions
  ``p - w < q <= p`` (``w = sliding_window`` keys, itself included), plus the sink tokens.
- **Ring buffer** (``KVState`` with ``window=w``): the key/value of a real token at position
  ``p`` goes to slot ``p % w``; nothing else is written. Inside a document positions strictly
  increase, so the keys any later query can see (positions ``> p_last - w``) sit in distinct
  slots, and a key that a new token overwrites (position ``<= p - w``, or of a dropped document)
  is outside every later window. Each slot carries its key's position and a valid flag; reading
  the ring means masking by valid, document (the ring holds one) and the window over positions
  (``valid & (pos <= p) & (pos > p - w)``), which also covers position ids with gaps. A chunk
  writes, of the real tokens of its row's last document, those at positions
  ``> p_last - w`` (at most ``w``, distinct slots); the earlier ones only served the chunk's own
  queries.
- ``stream_len`` counts every token fed, padding included (what ``generate()`` calls the
  sequence length); it plays no part in where keys go.

Why not transformers' ``DynamicSlidingWindowLayer`` / ``LinearAttentionLayer``: those keep one
length for the whole batch. We keep, per row, the position of every cached key and whether it is
valid, so rows at different lengths can share a batch (left padding, and the server's continuous
batching: ``SpikingBrainCache.cat`` / ``select`` move rows between batches between decode steps).
The class still derives from ``transformers.Cache`` so ``generate()`` treats it as a cache.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from spikingbrain.errors import SpikingBrainError

_EMPTY_ROWS = ("cannot stack decode states when some hold no rows yet: feed every cache at least one "
               "chunk (a prompt) before SpikingBrainCache.cat")


class _Layer(CacheLayerMixin):
    """Base for our per-layer states. Tensors are batch-first so rows can be cat/selected."""

    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[str, torch.Tensor] = {}

    # HF abstract API: our mixers talk to the cache directly instead of through `update`.
    def lazy_initialization(self, key_states, value_states):  # pragma: no cover - unused
        pass

    def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover - unused
        raise NotImplementedError("SpikingBrain layers update their cache state directly")

    def get_mask_sizes(self, query_length: int):
        return 0, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if t is not None)

    def select(self, rows: torch.Tensor) -> None:
        self.tensors = {n: t.index_select(0, rows) for n, t in self.tensors.items()}

    def reset(self) -> None:
        self.tensors = {}


class LinearState(_Layer):
    """GLA recurrent state ``state [B, H, K, V]``."""

    @property
    def state(self):
        return self.tensors.get("state")

    def set_state(self, s: torch.Tensor) -> None:
        self.tensors["state"] = s

    @staticmethod
    def cat(layers: list["LinearState"]) -> "LinearState":
        out = LinearState()
        have = [l.state is not None for l in layers]
        if any(have) and not all(have):
            raise SpikingBrainError(_EMPTY_ROWS)
        if all(have):
            out.set_state(torch.cat([l.state for l in layers], 0))
        return out


def ring_entries(pos: torch.Tensor, keep: torch.Tensor | None, window: int) -> torch.Tensor:
    """``[B, T]`` bool: the tokens of a chunk (positions ``pos``, ``keep`` as in
    ``KVState.append``) that a ring of ``window`` slots stores: the kept ones at positions
    ``> p_last - window``, ``p_last`` the row's last kept position. Only they can be seen by a
    later query, and they have distinct slots ``pos % window``."""
    if keep is None:
        keep = torch.ones_like(pos, dtype=torch.bool)
    p_last = torch.where(keep, pos, torch.iinfo(pos.dtype).min).amax(1, keepdim=True)
    return keep & (pos > p_last - window)


class KVState(_Layer):
    """Keys/values with per-row positions and validity (the rules: module docstring).

    ``window=None``: grows (full attention). ``window=w``: a ring buffer of ``w`` slots; a real
    token at position ``p`` goes to slot ``p % w``. Tensors: ``k, v [B, Hkv, L, D]``,
    ``pos [B, L]`` (long), ``valid [B, L]`` (bool). A ring stores its keys transposed,
    ``k [B, Hkv, D, w]``: a decode step's ``q @ k^T`` then reads them contiguously (~2x faster
    on CPU); ``past()`` still returns ``[B, Hkv, w, D]`` (a view).
    """

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        self.window = window
        self.is_sliding = window is not None

    def past(self):
        """``(k, v, pos, valid)`` or ``None`` when empty."""
        if "k" not in self.tensors:
            return None
        t = self.tensors
        k = t["k"] if self.window is None else t["k"].transpose(-1, -2)
        return k, t["v"], t["pos"], t["valid"]

    def append(self, k, v, pos, keep=None, new_doc=None) -> None:
        """Store new tokens: ``k, v [B, Hkv, T, D]``, ``pos [B, T]``; ``keep [B, T]`` (None:
        all): the real tokens of each row's last document in the chunk, the only ones later
        queries can see; ``new_doc [B]`` (None: none): rows where a new document started in
        the chunk, whose earlier keys are dropped first."""
        B, Hkv, T, D = k.shape
        grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        t = self.tensors
        if new_doc is not None and "k" in t:
            t["valid"] = t["valid"] & ~new_doc[:, None]
        if self.window is None:
            valid = keep if keep is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
            if "k" not in t:
                self.tensors = {"k": k, "v": v, "pos": pos, "valid": valid}
            else:
                self.tensors = {
                    "k": torch.cat([t["k"], k], 2), "v": torch.cat([t["v"], v], 2),
                    "pos": torch.cat([t["pos"], pos], 1), "valid": torch.cat([t["valid"], valid], 1),
                }
            return
        w = self.window
        if "k" not in t:
            t.update({
                "k": k.new_zeros(B, Hkv, D, w), "v": v.new_zeros(B, Hkv, w, D),
                "pos": pos.new_zeros(B, w), "valid": torch.zeros(B, w, dtype=torch.bool, device=k.device),
            })
        store = keep if T == 1 else ring_entries(pos, keep, w)
        slots = pos % w
        if store is None or bool(store.all()):  # every token to its slot (a decode step)
            idx = slots[:, None, :, None].expand(B, Hkv, T, D)
            kt, kidx = k.transpose(-1, -2).to(t["k"].dtype), idx.transpose(-1, -2)
            vals = torch.ones(B, T, dtype=torch.bool, device=k.device)
            if grad:  # out of place: earlier attention calls saved the old buffer for backward
                t["k"] = t["k"].scatter(3, kidx, kt)
                t["v"] = t["v"].scatter(2, idx, v.to(t["v"].dtype))
                t["pos"] = t["pos"].scatter(1, slots, pos)
                t["valid"] = t["valid"].scatter(1, slots, vals)
            else:  # decoding: writing T slots in place instead of copying all w of them each step
                t["k"].scatter_(3, kidx, kt)
                t["v"].scatter_(2, idx, v.to(t["v"].dtype))
                t["pos"].scatter_(1, slots, pos)
                t["valid"].scatter_(1, slots, vals)
            return
        rows, cols = store.nonzero(as_tuple=True)
        s = slots[rows, cols]
        if grad:
            t["k"], t["v"], t["pos"], t["valid"] = (t[n].clone() for n in ("k", "v", "pos", "valid"))
        t["k"][rows, :, :, s] = k[rows, :, cols].to(t["k"].dtype)  # [N, Hkv, D] both sides
        t["v"][rows, :, s] = v[rows, :, cols].to(t["v"].dtype)
        t["pos"][rows, s] = pos[rows, cols]
        t["valid"][rows, s] = True

    def get_seq_length(self) -> int:
        return 0 if "k" not in self.tensors else int(self.tensors["v"].shape[2])

    @staticmethod
    def cat(layers: list["KVState"]) -> "KVState":
        out = KVState(layers[0].window)
        have = ["k" in l.tensors for l in layers]
        if any(have) and not all(have):
            raise SpikingBrainError(_EMPTY_ROWS)
        if not any(have):
            return out
        L = max(l.tensors["k"].shape[2] for l in layers)
        parts = {n: [] for n in ("k", "v", "pos", "valid")}
        for l in layers:
            t = l.tensors
            pad = L - t["k"].shape[2]  # only full-attention rows differ in length: left-pad invalid
            parts["k"].append(torch.nn.functional.pad(t["k"], (0, 0, pad, 0)))
            parts["v"].append(torch.nn.functional.pad(t["v"], (0, 0, pad, 0)))
            parts["pos"].append(torch.nn.functional.pad(t["pos"], (pad, 0)))
            parts["valid"].append(torch.nn.functional.pad(t["valid"], (pad, 0), value=False))
        out.tensors = {n: torch.cat(p, 0) for n, p in parts.items()}
        return out


class LayerCache(_Layer):
    """All the state of one decoder layer: a linear part, a softmax part, or both, plus the
    sink tokens' keys/values (computed once, shared by every row)."""

    def __init__(self, layer_type: str, window: int | None) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.linear = LinearState() if "gla" in layer_type else None
        kv_window = window if "swa" in layer_type else None
        self.kv = KVState(kv_window) if ("swa" in layer_type or "full" in layer_type) else None
        self.is_sliding = "swa" in layer_type
        self.sink_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def _parts(self):
        return [p for p in (self.linear, self.kv) if p is not None]

    def nbytes(self) -> int:
        n = sum(p.nbytes() for p in self._parts())
        if self.sink_kv is not None:
            n += sum(t.numel() * t.element_size() for t in self.sink_kv)
        return n

    def growing_nbytes(self) -> int:
        return self.kv.nbytes() if (self.kv is not None and self.kv.window is None) else 0

    def select(self, rows) -> None:
        for p in self._parts():
            p.select(rows)

    def get_seq_length(self) -> int:
        return self.kv.get_seq_length() if self.kv is not None else 0

    def reset(self) -> None:
        for p in self._parts():
            p.reset()

    @staticmethod
    def cat(layers: list["LayerCache"]) -> "LayerCache":
        first = layers[0]
        out = LayerCache(first.layer_type, first.kv.window if first.kv is not None else None)
        if first.linear is not None:
            out.linear = LinearState.cat([l.linear for l in layers])
        if first.kv is not None:
            out.kv = KVState.cat([l.kv for l in layers])
        out.sink_kv = first.sink_kv
        return out


class SpikingBrainCache(Cache):
    """Per-layer decode state plus, per row, the tokens seen and the next position id.

    ``stream_len [B]``: tokens fed so far (padding included); ``next_pos [B]``: the position of
    the row's last real token plus one (0 before any), the position the next real token gets
    when none is given.
    """

    def __init__(self, config) -> None:
        layers = [LayerCache(t, config.sliding_window) for t in config.layer_types]
        super().__init__(layers=layers)
        self.stream_len: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None

    # ------------------------------------------------------------------ bookkeeping
    def _rows(self, batch_size: int, device) -> None:
        if self.next_pos is None:
            self.stream_len = torch.zeros(batch_size, dtype=torch.long, device=device)
            self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        elif self.next_pos.shape[0] != batch_size:
            raise SpikingBrainError(
                f"this decode state holds {self.next_pos.shape[0]} rows, the input has {batch_size}"
            )

    def positions_for(self, batch_size: int, valid: torch.Tensor, device) -> torch.Tensor:
        """Position ids ``[B, T]`` of new tokens with validity ``valid [B, T]``: the real ones
        continue from ``next_pos``; padding gets the position of the next real token (it is
        masked everywhere anyway)."""
        self._rows(batch_size, device)
        return self.next_pos[:, None] + (valid.long().cumsum(1) - valid.long())

    def last_positions(self, batch_size: int, device) -> torch.Tensor:
        """``[B]``: the position of each row's last real token (-1: none yet)."""
        self._rows(batch_size, device)
        return self.next_pos - 1

    def advance(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Account for a chunk fed with ``positions / valid [B, T]``."""
        T = valid.shape[1]
        self.stream_len = self.stream_len + T
        if T == 0:
            return
        idx = torch.where(valid, torch.arange(T, device=valid.device), -1).amax(1)  # last real token
        last = positions.gather(1, idx.clamp_min(0)[:, None])[:, 0]
        self.next_pos = torch.where(idx >= 0, last + 1, self.next_pos)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far (the longest row), which is what ``generate()`` needs."""
        return 0 if self.stream_len is None else int(self.stream_len.max())

    def get_max_length(self) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    # ------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        """Bytes of decode state held (all layers)."""
        return sum(l.nbytes() for l in self.layers)

    def memory_report(self) -> dict[str, int]:
        """``constant``: linear states, SWA windows, sink KV; ``growing``: full-attention KV."""
        growing = sum(l.growing_nbytes() for l in self.layers)
        total = self.nbytes()
        return {"constant": total - growing, "growing": growing, "total": total}

    # ------------------------------------------------------------------ batching
    @property
    def batch_size(self) -> int:
        return 0 if self.stream_len is None else int(self.stream_len.shape[0])

    def select(self, rows) -> "SpikingBrainCache":
        """Keep only ``rows`` (in that order), in place; returns self."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.stream_len.device)
        for l in self.layers:
            l.select(rows)
        self.stream_len = self.stream_len.index_select(0, rows)
        self.next_pos = self.next_pos.index_select(0, rows)
        return self

    def batch_select_indices(self, indices: torch.Tensor):
        self.select(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.select(beam_idx)

    @classmethod
    def cat(cls, caches: list["SpikingBrainCache"]) -> "SpikingBrainCache":
        """Stack caches along the batch (rows may be at different lengths)."""
        if not caches:
            raise SpikingBrainError("SpikingBrainCache.cat needs at least one cache")
        if any(c.stream_len is None for c in caches):
            raise SpikingBrainError(_EMPTY_ROWS)
        if len({len(c.layers) for c in caches}) != 1:
            raise SpikingBrainError("SpikingBrainCache.cat: the caches belong to models with different layers")
        out = cls.__new__(cls)
        Cache.__init__(out, layers=[LayerCache.cat([c.layers[i] for c in caches])
                                    for i in range(len(caches[0].layers))])
        out.stream_len = torch.cat([c.stream_len for c in caches])
        out.next_pos = torch.cat([c.next_pos for c in caches])
        return out
