"""spikingbrain.ops.windowed_attention against masked full softmax attention: exactly ``w`` keys
per query (itself included), GQA, cached past keys in ring-buffer order, padding, documents,
sink keys; and long inputs are processed in blocks (no T x T mask)."""
import pytest
import torch

import spikingbrain.ops.sliding_window as sw
from spikingbrain.ops import windowed_attention
from testutils import assert_close_rel

D = 8
TOL = 1e-12  # fp64; measured <= 2e-16


def reference(q, k, v, allowed, sink_k=None, sink_v=None):
    """Softmax attention with an explicit boolean ``allowed [B, T, L]`` (GQA by repetition)."""
    H, Hkv = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    if sink_k is not None:
        B, T = q.shape[0], q.shape[2]
        S = sink_k.shape[2]
        k = torch.cat([sink_k.expand(B, -1, -1, -1).repeat_interleave(H // Hkv, 1), k], 2)
        v = torch.cat([sink_v.expand(B, -1, -1, -1).repeat_interleave(H // Hkv, 1), v], 2)
        allowed = torch.cat([torch.ones(B, T, S, dtype=torch.bool), allowed], 2)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return s.softmax(-1) @ v


def window_mask(T, w):
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None]
    return (j <= i) & (j > i - w)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("w", [1, 3, 16, 64])
@pytest.mark.parametrize("frac", [0.05, 0.5, 1.0, 1.02, 2.0, 2.98])
@pytest.mark.parametrize("block_size", [None, 7])
def test_equals_masked_softmax(w, frac, block_size):
    """T < 3w, GQA (4 query heads, 2 KV heads), default blocks and tiny blocks."""
    T = max(1, int(frac * w))
    B, H, Hkv = 2, 4, 2
    q, k, v = rand(B, H, T, D, seed=1), rand(B, Hkv, T, D, seed=2), rand(B, Hkv, T, D, seed=3)
    pos = torch.arange(T)[None].expand(B, T)
    o = windowed_attention(q, k, v, q_pos=pos, k_pos=pos, window=w, block_size=block_size)
    allowed = window_mask(T, w)[None].expand(B, T, T)
    assert int(allowed[0].sum(1).max()) == min(w, T)  # the reference sees exactly w keys
    assert_close_rel(o, reference(q, k, v, allowed), TOL, f"w={w} T={T}")


@pytest.mark.parametrize("w,T", [(16, 300), (5, 260), (64, 700)])
def test_long_inputs_blocked(w, T):
    """Longer than the default block (max(256, w)): the blocked path."""
    q, k, v = rand(1, 2, T, D, seed=4), rand(1, 1, T, D, seed=5), rand(1, 1, T, D, seed=6)
    pos = torch.arange(T)[None]
    o = windowed_attention(q, k, v, q_pos=pos, k_pos=pos, window=w)
    assert_close_rel(o, reference(q, k, v, window_mask(T, w)[None]), TOL)


def test_window_none_is_causal():
    T = 40
    q, k, v = rand(2, 4, T, D, seed=7), rand(2, 2, T, D, seed=8), rand(2, 2, T, D, seed=9)
    pos = torch.arange(T)[None].expand(2, T)
    o = windowed_attention(q, k, v, q_pos=pos, k_pos=pos, window=None)
    assert_close_rel(o, reference(q, k, v, window_mask(T, T)[None].expand(2, T, T)), TOL)


@pytest.mark.parametrize("T,block_size", [(1, None), (10, None), (37, None), (37, 8)])
def test_past_keys_from_a_ring_buffer(T, block_size):
    """Queries ``P .. P+T-1`` of a longer stream; the past is the last ``w`` keys stored in
    ring-buffer order (slot = position % w), so keys are not sorted by position."""
    w, P = 12, 30
    N = P + T
    B, H, Hkv = 2, 4, 2
    q, k, v = rand(B, H, N, D, seed=10), rand(B, Hkv, N, D, seed=11), rand(B, Hkv, N, D, seed=12)
    past_pos = torch.arange(P - w, P)
    slots = past_pos % w
    ring = torch.empty(w, dtype=torch.long)
    ring[slots] = past_pos  # ring[s] = position stored in slot s
    k_all = torch.cat([k[:, :, ring], k[:, :, P:]], 2)
    v_all = torch.cat([v[:, :, ring], v[:, :, P:]], 2)
    k_pos = torch.cat([ring, torch.arange(P, N)])[None].expand(B, -1)
    q_pos = torch.arange(P, N)[None].expand(B, -1)
    o = windowed_attention(q[:, :, P:], k_all, v_all, q_pos=q_pos, k_pos=k_pos, window=w,
                           k_valid=torch.ones(B, w + T, dtype=torch.bool), block_size=block_size)
    ref = reference(q, k, v, window_mask(N, w)[None].expand(B, N, N))[:, :, P:]
    assert_close_rel(o, ref, TOL)


def test_padding_documents_and_sinks():
    """Left padding (invalid keys), two packed documents in row 0, and sink keys every query
    sees; padded queries still get finite outputs (they see their own key)."""
    T, w, B, H, Hkv, S = 30, 8, 2, 4, 2, 3
    q, k, v = rand(B, H, T, D, seed=13), rand(B, Hkv, T, D, seed=14), rand(B, Hkv, T, D, seed=15)
    sink_k, sink_v = rand(1, Hkv, S, D, seed=16), rand(1, Hkv, S, D, seed=17)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :6] = False
    pos = torch.arange(T)[None].repeat(B, 1)
    pos[1] = (valid[1].long().cumsum(0) - valid[1].long())
    seg = torch.zeros(B, T, dtype=torch.long)
    seg[0, 17:] = 1
    pos[0, 17:] = torch.arange(T - 17)
    o = windowed_attention(q, k, v, q_pos=pos, k_pos=pos, window=w, k_valid=valid, q_seg=seg,
                           k_seg=seg, sink_k=sink_k, sink_v=sink_v)
    assert torch.isfinite(o).all()
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                allowed[b, i, j] = (j <= i and j > i - w and seg[b, i] == seg[b, j] and bool(valid[b, j]))
    ref = reference(q, k, v, allowed, sink_k, sink_v)
    assert_close_rel(o[1][:, valid[1]], ref[1][:, valid[1]], TOL, "row 1 real tokens")
    assert_close_rel(o[0], ref[0], TOL, "row 0 (two documents)")
    # a query at a document start sees the sinks and itself only
    i = 17
    assert_close_rel(o[0, :, i], reference(q[:1, :, i:i + 1], k[:1, :, i:i + 1], v[:1, :, i:i + 1],
                                           torch.ones(1, 1, 1, dtype=torch.bool), sink_k, sink_v)[0, :, 0], TOL)


def test_long_input_uses_blocks_not_a_dense_mask(monkeypatch):
    """T = 65536, w = 64: every dense piece is at most ``block x (block + w - 1)`` (a T x T
    boolean mask alone would be 4 GiB), and queries around block boundaries, at the start and at
    the end equal the reference over their own ``w`` keys. (Speed is for benchmarks/.)"""
    T, w = 65536, 64
    q = torch.randn(1, 2, T, 16)
    k, v = torch.randn(1, 1, T, 16), torch.randn(1, 1, T, 16)
    pos = torch.arange(T)[None]
    shapes = []
    real_dense = sw._dense

    def spy(q_, k_, *args, **kw):
        shapes.append((q_.shape[2], k_.shape[2]))
        # fail before a dense T x T piece is computed (it would exhaust memory, not fail)
        assert q_.shape[2] * k_.shape[2] <= 256 * (256 + w - 1), f"dense piece {shapes[-1]}"
        return real_dense(q_, k_, *args, **kw)

    monkeypatch.setattr(sw, "_dense", spy)
    o = windowed_attention(q, k, v, q_pos=pos, k_pos=pos, window=w)
    assert o.shape == (1, 2, T, 16) and torch.isfinite(o).all()
    assert shapes, "expected the blocked path"
    assert sum(s[0] for s in shapes) == T
    assert max(s[0] * s[1] for s in shapes) <= 256 * (256 + w - 1)
    block_ends = torch.tensor([n for n, _ in shapes]).cumsum(0).tolist()
    edges = block_ends[:3] + block_ends[-2:-1]  # the first block boundaries and the last one
    checked = sorted({0, 1, w - 1, w, T - 1} | {b + d for b in edges for d in (-1, 0, 1)})
    for i in checked:
        lo = max(0, i - w + 1)
        ref = reference(q[:, :, i:i + 1].double(), k[:, :, lo:i + 1].double(), v[:, :, lo:i + 1].double(),
                        torch.ones(1, 1, i + 1 - lo, dtype=torch.bool))
        assert_close_rel(o[:, :, i:i + 1], ref, 1e-5, f"query {i}")


@pytest.mark.parametrize("block_size", [5, 7, 16])
def test_padding_inside_the_sequence_blocked_equals_dense(block_size):
    """Padding in the middle of a row (e.g. an attention mask with holes): positions skip the
    pads, so a query's window reaches further back in index than ``w``; the blocked path must
    pick keys by position, like the dense one."""
    T, w, B, H, Hkv = 40, 6, 2, 4, 2
    q, k, v = rand(B, H, T, D, seed=20), rand(B, Hkv, T, D, seed=21), rand(B, Hkv, T, D, seed=22)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 12:21] = False  # 9 pads, more than a window
    valid[1, :3] = False
    pos = valid.long().cumsum(1) - valid.long()
    o = windowed_attention(q, k, v, q_pos=pos, k_pos=pos, window=w, k_valid=valid, block_size=block_size)
    dense = windowed_attention(q, k, v, q_pos=pos, k_pos=pos, window=w, k_valid=valid, block_size=T)
    allowed = (pos[:, None, :] <= pos[:, :, None]) & (pos[:, None, :] > pos[:, :, None] - w) & valid[:, None, :]
    ref = reference(q, k, v, allowed)
    for b in range(B):
        assert_close_rel(dense[b][:, valid[b]], ref[b][:, valid[b]], TOL, f"dense row {b}")
        assert_close_rel(o[b][:, valid[b]], ref[b][:, valid[b]], TOL, f"blocked row {b}")


@pytest.mark.parametrize("block_size", [5, 7, 16])
def test_padding_with_documents_blocked_equals_dense(block_size):
    """Holes in packed documents, padding carrying arbitrary position ids (0 here): a block's
    first key is found by counting real keys, whatever the documents and the pads' positions."""
    T, w, B, H, Hkv = 48, 6, 2, 4, 2
    q, k, v = rand(B, H, T, D, seed=23), rand(B, Hkv, T, D, seed=24), rand(B, Hkv, T, D, seed=25)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 14:23] = False  # a hole longer than the window, inside the second document
    valid[1, 30:33] = False
    seg = torch.zeros(B, T, dtype=torch.long)
    seg[0, 9:] = 1
    seg[1, 20:] = 1
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for s in seg[b].unique():
            where = valid[b] & (seg[b] == s)
            pos[b, where] = torch.arange(int(where.sum()))
    o = windowed_attention(q, k, v, q_pos=pos, k_pos=pos, window=w, k_valid=valid, q_seg=seg, k_seg=seg,
                           block_size=block_size)
    allowed = ((pos[:, None, :] <= pos[:, :, None]) & (pos[:, None, :] > pos[:, :, None] - w) & valid[:, None, :]
               & (seg[:, None, :] == seg[:, :, None]) & torch.ones(T, T, dtype=torch.bool).tril())
    ref = reference(q, k, v, allowed)
    for b in range(B):
        assert_close_rel(o[b][:, valid[b]], ref[b][:, valid[b]], TOL, f"row {b}")


def test_position_gaps_in_a_short_chunk():
    """Positions with gaps (explicit position ids): a chunk no longer than the window still
    masks by position (keys more than ``w - 1`` positions back are out)."""
    T, w, H = 10, 10, 2
    q, k, v = rand(1, H, T, D, seed=26), rand(1, H, T, D, seed=27), rand(1, H, T, D, seed=28)
    pos = torch.tensor([[0, 1, 2, 5, 6, 9, 10, 11, 12, 20]])
    o = windowed_attention(q, k, v, q_pos=pos, k_pos=pos, window=w)
    allowed = (pos[:, None, :] <= pos[:, :, None]) & (pos[:, None, :] > pos[:, :, None] - w)
    assert_close_rel(o, reference(q, k, v, allowed), TOL)
