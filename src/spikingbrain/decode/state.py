"""Decode state of the lean step: fixed-shape buffers indexed by tensors.

Per row: ``next_pos`` (the position the next token gets) and ``stream_len`` (tokens fed). Per
GLA branch: its state ``[B, H, K, V]`` fp32. Per softmax branch: keys ``[B, Hkv, D, C]``
(transposed: a one-query ``q @ K`` reads them contiguously) and values ``[B, Hkv, C, D]`` in the
window's dtype (fp32, bf16, or int8 with one fp32 scale per key/value vector, ``[B, Hkv, C]``).
Every layer of one kind (``swa`` or ``full``) writes the same slots, so the slots' positions and
valid flags ``[B, C]`` are kept once per kind.

A token at position ``p`` goes to slot ``p % C``. Sliding-window rings have ``C = min(w, n)``
slots, ``n`` the smallest multiple of ``SLOT_GRAIN`` above every position so far (a 1k-token
chat reads ~1k slots, not ``w``); full attention has ``C = n``. While ``C < w`` every position
is below ``C``, so growing a ring is zero-padding it: no key moves. Growing happens on the host,
between steps, from a count of steps kept on the host (no device sync): the step itself only
sees fixed shapes (the compiled step treats ``C`` as a dynamic size: one graph for all).

The rules are those of ``spikingbrain/cache.py`` (the mask ``valid & pos <= p & pos > p - w``),
restricted to what decoding needs: one real token per row per step, continuing its document.
``from_cache`` / ``to_cache`` convert to and from a ``SpikingBrainCache`` (prefill runs the
model; a conversation continues by prefilling from ``to_cache``).
"""
from __future__ import annotations

import torch

from spikingbrain.errors import SpikingBrainError

KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
SLOT_GRAIN = 256  # rings grow by this many slots (a pad of every ring every 256 tokens)


def slots_for(max_pos: int, window: int | None) -> int:
    """Ring size holding positions ``0 .. max_pos`` (while below the window)."""
    c = (max_pos // SLOT_GRAIN + 1) * SLOT_GRAIN
    return c if window is None else min(window, c)


def quantize_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> ``(int8 codes [..., D], scale [...] fp32)``, ``scale = max|x| / 127``
    per vector (as ``spiking.quant.quantize_per_vector``)."""
    amax = x.abs().amax(-1).float()
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


class Ring:
    """Keys and values of one softmax branch (``k [B, Hkv, D, C]``, ``v [B, Hkv, C, D]``, and
    for int8 ``ks, vs [B, Hkv, C]``)."""

    def __init__(self, kind, k, v, ks=None, vs=None) -> None:
        self.kind, self.k, self.v, self.ks, self.vs = kind, k, v, ks, vs

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.ks, self.vs) if t is not None]

    def map(self, fn) -> "Ring":
        return Ring(self.kind, *(None if t is None else fn(t) for t in (self.k, self.v, self.ks, self.vs)))

    @staticmethod
    def empty(kind, B, Hkv, D, C, kv_dtype, device) -> "Ring":
        k = torch.zeros(B, Hkv, D, C, dtype=kv_dtype, device=device)
        v = torch.zeros(B, Hkv, C, D, dtype=kv_dtype, device=device)
        if kv_dtype != torch.int8:
            return Ring(kind, k, v)
        return Ring(kind, k, v, torch.ones(B, Hkv, C, device=device), torch.ones(B, Hkv, C, device=device))

    def put(self, rows, cols, k, v) -> None:
        """Store ``k, v [N, Hkv, D]`` at ``(rows, slots cols)``."""
        if self.ks is not None:
            k, kscale = quantize_vectors(k)
            v, vscale = quantize_vectors(v)
            self.ks[rows, :, cols] = kscale
            self.vs[rows, :, cols] = vscale
        self.k[rows, :, :, cols] = k.to(self.k.dtype)
        self.v[rows, :, cols] = v.to(self.v.dtype)

    def dense(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k [B, Hkv, C, D], v [B, Hkv, C, D])`` in ``dtype``."""
        k, v = self.k.transpose(-1, -2), self.v
        if self.ks is not None:
            return (k.float() * self.ks[..., None]).to(dtype), (v.float() * self.vs[..., None]).to(dtype)
        return k.to(dtype), v.to(dtype)


class Slots:
    """Positions and valid flags ``[B, C]`` of one kind of ring, and its window."""

    def __init__(self, pos, valid, window) -> None:
        self.pos, self.valid, self.window = pos, valid, window

    @property
    def size(self) -> int:
        return int(self.pos.shape[1])


class LeanState:
    """The decode state of ``B`` rows for a ``LeanDecoder`` (see the module docstring)."""

    def __init__(self, next_pos, stream_len, gla: dict, rings: dict, slots: dict, max_pos: int) -> None:
        self.next_pos, self.stream_len = next_pos, stream_len
        self.gla = gla  # layer index -> [B, H, K, V]
        self.rings = rings  # layer index -> Ring
        self.slots = slots  # "swa" / "full" -> Slots
        self.max_pos = max_pos  # host-side max(next_pos): when to grow (no device sync per step)

    @property
    def batch_size(self) -> int:
        return int(self.next_pos.shape[0])

    # ------------------------------------------------------------------ conversion
    @classmethod
    @torch.inference_mode()
    def from_cache(cls, cache, decoder) -> "LeanState":
        if cache.stream_len is None:
            raise SpikingBrainError("lean decode needs a decode state that has been fed a prompt")
        B = int(cache.stream_len.shape[0])
        dev = cache.next_pos.device
        max_pos = int(cache.next_pos.max())
        gla, rings, slots = {}, {}, {}
        for i, spec in enumerate(decoder.specs):
            lc = cache.layers[i]
            if spec.gla:
                s = lc.linear.state
                gla[i] = (s.float().clone() if s is not None else
                          torch.zeros(B, spec.heads, spec.head_dim, spec.head_dim, device=dev))
            if spec.kind is None:
                continue
            window = decoder.window if spec.kind == "swa" else None
            C = slots_for(max_pos, window)
            ring = Ring.empty(spec.kind, B, spec.kv_heads, spec.head_dim, C, decoder.kv_dtype, dev)
            past = lc.kv.past()
            valid = torch.zeros(B, C, dtype=torch.bool, device=dev)
            pos = torch.zeros(B, C, dtype=torch.long, device=dev)
            if past is not None:
                k, v, kpos, kvalid = past  # k, v [B, Hkv, L, D]
                rows, cols = kvalid.nonzero(as_tuple=True)
                p = kpos[rows, cols]
                ring.put(rows, p % C, k[rows, :, cols].float(), v[rows, :, cols].float())
                pos[rows, p % C] = p
                valid[rows, p % C] = True
            rings[i] = ring
            if spec.kind not in slots:
                slots[spec.kind] = Slots(pos, valid, window)
        return cls(cache.next_pos.clone(), cache.stream_len.clone(), gla, rings, slots, max_pos)

    @torch.inference_mode()
    def to_cache(self, model, decoder):
        """A ``SpikingBrainCache`` holding the same state (windows back in the model's dtype)."""
        from spikingbrain.cache import KVState, SpikingBrainCache

        cache = SpikingBrainCache(model.config)
        dtype = decoder.model_dtype
        w = decoder.window
        for i, spec in enumerate(decoder.specs):
            lc = cache.layers[i]
            if spec.gla:
                lc.linear.set_state(self.gla[i].clone())
            if spec.kind is None:
                continue
            sl = self.slots[spec.kind]
            k, v = self.rings[i].dense(dtype)
            pos, valid = sl.pos.clone(), sl.valid.clone()
            if spec.kind == "swa":
                pad = w - sl.size
                if pad:
                    k = torch.nn.functional.pad(k, (0, 0, 0, pad))
                    v = torch.nn.functional.pad(v, (0, 0, 0, pad))
                    pos = torch.nn.functional.pad(pos, (0, pad))
                    valid = torch.nn.functional.pad(valid, (0, pad), value=False)
                k = k.transpose(-1, -2).contiguous()  # the cache's ring layout
            lc.kv = KVState(w if spec.kind == "swa" else None)
            lc.kv.tensors = {"k": k, "v": v.contiguous(), "pos": pos, "valid": valid}
            lc.sink_kv = decoder.sink_kv(i)
        if decoder.has_sinks:
            cache._sinks_ready = True
        cache.next_pos, cache.stream_len = self.next_pos.clone(), self.stream_len.clone()
        return cache

    # ------------------------------------------------------------------ growth and batching
    @torch.inference_mode()  # every buffer an inference tensor, as from_cache makes them (one compiled graph)
    def ensure_room(self, steps: int = 1) -> None:
        """Grow the rings so positions up to ``max_pos + steps`` have their own slot."""
        for kind, sl in self.slots.items():
            C = slots_for(self.max_pos + steps, sl.window)
            if C != sl.size:
                self._resize(kind, C)

    def _resize(self, kind: str, C: int) -> None:
        sl = self.slots[kind]
        pad = C - sl.size
        sl.pos = torch.nn.functional.pad(sl.pos, (0, pad))
        sl.valid = torch.nn.functional.pad(sl.valid, (0, pad), value=False)
        for i, ring in self.rings.items():
            if ring.kind == kind:
                self.rings[i] = Ring(
                    kind,
                    torch.nn.functional.pad(ring.k, (0, pad)), torch.nn.functional.pad(ring.v, (0, 0, 0, pad)),
                    None if ring.ks is None else torch.nn.functional.pad(ring.ks, (0, pad), value=1.0),
                    None if ring.vs is None else torch.nn.functional.pad(ring.vs, (0, pad), value=1.0))

    @torch.inference_mode()
    def select(self, rows) -> "LeanState":
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.next_pos.device)
        return LeanState(self.next_pos[rows], self.stream_len[rows],
                        {i: s[rows] for i, s in self.gla.items()},
                        {i: r.map(lambda t: t[rows].contiguous()) for i, r in self.rings.items()},
                        {k: Slots(s.pos[rows], s.valid[rows], s.window) for k, s in self.slots.items()},
                        int(self.next_pos[rows].max()) if rows.numel() else 0)

    @staticmethod
    @torch.inference_mode()
    def cat(states: list["LeanState"]) -> "LeanState":
        if len(states) == 1:
            return states[0]
        max_pos = max(s.max_pos for s in states)
        for s in states:  # every part at the largest ring size
            for kind, sl in s.slots.items():
                C = max(t.slots[kind].size for t in states)
                if C != sl.size:
                    s._resize(kind, C)
        first = states[0]
        return LeanState(torch.cat([s.next_pos for s in states]), torch.cat([s.stream_len for s in states]),
                        {i: torch.cat([s.gla[i] for s in states]) for i in first.gla},
                        {i: Ring(r.kind, *(None if t is None else torch.cat([getattr(s.rings[i], n) for s in states])
                                   for n, t in zip(("k", "v", "ks", "vs"), (r.k, r.v, r.ks, r.vs))))
                         for i, r in first.rings.items()},
                        {k: Slots(torch.cat([s.slots[k].pos for s in states]),
                                  torch.cat([s.slots[k].valid for s in states]), sl.window)
                         for k, sl in first.slots.items()},
                        max_pos)

    def nbytes(self) -> int:
        ts = [self.next_pos, self.stream_len, *self.gla.values()]
        ts += [t for r in self.rings.values() for t in r.tensors()]
        ts += [t for s in self.slots.values() for t in (s.pos, s.valid)]
        return sum(t.numel() * t.element_size() for t in ts)
