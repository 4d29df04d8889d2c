"""The flash-linear-attention call contract, checked on CPU.

A stand-in ``fla`` package (put in ``sys.modules``) has the keyword-only signatures of fla 0.6's
``chunk_gla`` / ``fused_recurrent_gla``, checks what fla checks (batch 1 with ``cu_seqlens``, one
initial state per sequence, fp32 states, matching shapes), records every call, and computes its
result with the GLA recurrence written out below. ``on_cuda`` is replaced so the ``fla`` path and
``auto``'s CUDA branch run on CPU tensors: the whole path from the model down to the kernel call
(packed documents, decode steps, dtype casts, version refusal) runs in CI; only the Triton
kernels themselves need a GPU (``test_gla_fla.py``).
"""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from spikingbrain.errors import SpikingBrainError
from spikingbrain.ops import gla, gla_fla
from testutils import assert_close_rel, tiny_model


def recurrence(q, k, v, g, scale, s0):
    """One sequence, fp64: ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``.
    q, k, g ``[T, H, K]``, v ``[T, H, V]``, s0 ``[H, K, V]`` -> o ``[T, H, V]``, S ``[H, K, V]``."""
    S = s0.double().clone()
    out = []
    for t in range(q.shape[0]):
        S = S * g[t].double().exp()[..., None] + k[t].double()[..., None] * v[t].double()[:, None, :]
        out.append(scale * torch.einsum("hk,hkv->hv", q[t].double(), S))
    return torch.stack(out), S


NOT_PASSED = "not passed"  # the stand-in's default for state_v_first: fla's is False


class StandInFla:
    """Records calls; validates and computes like fla would."""

    def __init__(self, version):
        self.version = version
        self.calls = []

    def _run(self, name, q, k, v, gate, scale, initial_state, output_final_state, cu_seqlens, extra):
        B, T, H, K = q.shape
        assert k.shape == q.shape == gate.shape, "q, k, g must have the same shape"
        assert v.shape[:3] == q.shape[:3], "v must be [B, T, H, V]"
        assert q.dtype == k.dtype == v.dtype, "fla's kernels take q, k, v in one dtype"
        if initial_state is not None:
            assert initial_state.dtype == torch.float32, "initial_state must be in float32"
        if cu_seqlens is not None:
            assert B == 1, "batch 1 with cu_seqlens"
            bounds = cu_seqlens.tolist()
            assert bounds[0] == 0 and bounds[-1] == T and bounds == sorted(bounds)
            if initial_state is not None:
                assert initial_state.shape[0] == len(bounds) - 1, "one initial state per sequence"
            seqs = [(0, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            seqs = [(b, 0, T) for b in range(B)]
        self.calls.append(dict(
            fn=name, q=(tuple(q.shape), q.dtype), k=(tuple(k.shape), k.dtype),
            v=(tuple(v.shape), v.dtype), gate=(tuple(gate.shape), gate.dtype), scale=scale,
            initial_state=None if initial_state is None else (tuple(initial_state.shape), initial_state.dtype),
            output_final_state=output_final_state,
            cu_seqlens=None if cu_seqlens is None else (cu_seqlens.tolist(), cu_seqlens.dtype), **extra,
        ))
        V = v.shape[-1]
        o = torch.zeros(B, T, H, V, dtype=torch.float64)
        finals = []
        for n, (row, a, b) in enumerate(seqs):
            s0 = (initial_state[n] if initial_state is not None
                  else torch.zeros(H, K, V, dtype=torch.float64))
            o[row, a:b], S = recurrence(q[row, a:b], k[row, a:b], v[row, a:b], gate[row, a:b], scale, s0)
            finals.append(S)
        final = torch.stack(finals).float() if output_final_state else None
        return o.to(v.dtype), final

    def chunk_gla(self, *, q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                  state_v_first=NOT_PASSED, cu_seqlens=None, cu_seqlens_cpu=None):
        assert state_v_first in (False, NOT_PASSED), "the state layout is [N, H, K, V]"
        return self._run("chunk_gla", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                         {"state_v_first": state_v_first})

    def fused_recurrent_gla(self, *, q, k, v, gk=None, gv=None, scale=None, initial_state=None,
                            output_final_state=False, reverse=False, state_v_first=NOT_PASSED,
                            cu_seqlens=None, **kwargs):
        assert gv is None and not reverse and not kwargs
        assert state_v_first in (False, NOT_PASSED), "the state layout is [N, H, K, V]"
        return self._run("fused_recurrent_gla", q, k, v, gk, scale, initial_state, output_final_state,
                         cu_seqlens, {"state_v_first": state_v_first})


@pytest.fixture
def fake_fla(monkeypatch):
    """Install a stand-in fla (version settable) and treat every tensor as a CUDA tensor."""

    def install(version="0.6.0"):
        stand_in = StandInFla(version)
        root, ops, ops_gla = (types.ModuleType(n) for n in ("fla", "fla.ops", "fla.ops.gla"))
        root.__version__ = version
        root.ops, ops.gla = ops, ops_gla
        ops_gla.chunk_gla, ops_gla.fused_recurrent_gla = stand_in.chunk_gla, stand_in.fused_recurrent_gla
        for name, mod in (("fla", root), ("fla.ops", ops), ("fla.ops.gla", ops_gla)):
            monkeypatch.setitem(sys.modules, name, mod)
        monkeypatch.setattr(gla_fla, "on_cuda", lambda x: True)
        gla_fla.fla_available.cache_clear()
        return stand_in

    yield install
    gla_fla.fla_available.cache_clear()


def inputs(B, T, H=3, K=8, V=6, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) + 2.0)
    s0 = torch.randn(B, H, K, V, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), g, s0


def per_document_reference(q, k, v, g, scale, s0, reset):
    """The recurrence per row and per document; the initial state belongs to each row's first one."""
    B, T, H, K = q.shape
    o = torch.zeros(*v.shape, dtype=torch.float64)
    finals = []
    for b in range(B):
        starts = [0] + [t for t in range(1, T) if reset is not None and bool(reset[b, t])] + [T]
        for i, (a, e) in enumerate(zip(starts[:-1], starts[1:])):
            keep = i == 0 and s0 is not None and not (reset is not None and bool(reset[b, 0]))
            init = s0[b] if keep else torch.zeros(H, K, v.shape[-1])
            o[b, a:e], S = recurrence(q[b, a:e], k[b, a:e], v[b, a:e], g[b, a:e], scale, init)
        finals.append(S)
    return o, torch.stack(finals)


@pytest.mark.parametrize("T,fn", [(1, "fused_recurrent_gla"), (40, "fused_recurrent_gla"), (100, "chunk_gla")])
@pytest.mark.parametrize("with_state", [False, True])
def test_plain_calls(fake_fla, T, fn, with_state):
    fla = fake_fla()
    q, k, v, g, s0 = inputs(2, T, seed=T)
    s0 = s0 if with_state else None
    o, s = gla(q, k, v, g, initial_state=s0, output_final_state=True, mode="fla", scale=0.3)
    (call,) = fla.calls
    assert call["fn"] == fn
    assert call["q"] == call["k"] == ((2, T, 3, 8), torch.float32)  # time-first [B, T, H, K]
    assert call["v"] == ((2, T, 3, 6), torch.float32)
    assert call["gate"] == ((2, T, 3, 8), torch.float32)
    assert call["scale"] == 0.3 and call["output_final_state"] is True and call["cu_seqlens"] is None
    assert call["initial_state"] == (((2, 3, 8, 6), torch.float32) if with_state else None)
    assert call["state_v_first"] is False  # passed explicitly, not left to fla's default
    ref_o, ref_s = per_document_reference(q, k, v, g, 0.3, s0, None)
    assert_close_rel(o, ref_o, 1e-6, "o")
    assert s.dtype == torch.float32
    assert_close_rel(s, ref_s, 1e-6, "final state")


@pytest.mark.parametrize("with_state", [False, True])
def test_packed_documents_become_cu_seqlens(fake_fla, with_state):
    """Row 0 has documents at 0, 30, 77; row 1 at 0 and 50 (a reset at t = 0 drops its initial
    state); row 2 at 0 and 60: one batch-1 call, int32 cu_seqlens over the flattened rows, the
    initial state at each row's first document and zeros elsewhere, each row's final state from
    its last document."""
    fla = fake_fla()
    T = 100
    q, k, v, g, s0 = inputs(3, T, seed=5)
    s0 = s0 if with_state else None
    reset = torch.zeros(3, T, dtype=torch.bool)
    reset[0, 30] = reset[0, 77] = reset[1, 0] = reset[1, 50] = reset[2, 60] = True
    o, s = gla(q, k, v, g, initial_state=s0, output_final_state=True, mode="fla", reset=reset)
    (call,) = fla.calls
    assert call["fn"] == "chunk_gla"
    assert call["cu_seqlens"] == ([0, 30, 77, 100, 150, 200, 260, 300], torch.int32)
    assert call["q"] == ((1, 300, 3, 8), torch.float32) and call["gate"] == ((1, 300, 3, 8), torch.float32)
    assert call["initial_state"] == (((7, 3, 8, 6), torch.float32) if with_state else None)
    assert call["state_v_first"] is False
    ref_o, ref_s = per_document_reference(q, k, v, g, 8 ** -0.5, s0, reset)
    assert_close_rel(o, ref_o, 1e-6, "o")
    assert_close_rel(s, ref_s, 1e-6, "final state (each row's last document)")


def test_low_precision_inputs_are_cast_for_fla(fake_fla):
    """bf16 values with fp32 queries/keys (as a mixed model hands them): q and k follow v's dtype,
    gates and the state are fp32, the output comes back in v's dtype."""
    fla = fake_fla()
    q, k, v, g, s0 = inputs(1, 80, seed=3)
    o, s = gla(q, k, v.bfloat16(), g.bfloat16(), initial_state=s0.bfloat16(),
               output_final_state=True, mode="fla")
    (call,) = fla.calls
    assert call["q"][1] == call["k"][1] == call["v"][1] == torch.bfloat16
    assert call["gate"][1] == torch.float32 and call["initial_state"][1] == torch.float32
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


@pytest.mark.parametrize("version", ["0.1", "0.1.2", "0.2.1", "0.7.0", "1.0.0", "not-a-version"])
def test_unsupported_versions_are_refused(fake_fla, version):
    """Before 0.2 fla read [B, T, H, K] as head-first [B, H, T, K] (silently wrong); 0.2.0/0.2.1
    still had `head_first`; later than the tested range is refused rather than trusted."""
    fla = fake_fla(version)
    q, k, v, g, _ = inputs(1, 70)
    with pytest.raises(SpikingBrainError, match=r"flash-linear-attention .* is not supported.*\[B, T, H, K\]"):
        gla(q, k, v, g, mode="fla")
    assert fla.calls == []
    with pytest.warns(UserWarning, match="not supported"):  # auto: falls back to the chunk path
        o, _ = gla(q, k, v, g, mode="auto")
    assert fla.calls == []
    assert_close_rel(o, gla(q, k, v, g, mode="chunk")[0], 1e-6)


@pytest.mark.parametrize("version", ["0.2.2", "0.3.0", "0.5.2", "0.6.0"])
def test_supported_versions_and_auto_on_cuda(fake_fla, version):
    fla = fake_fla(version)
    q, k, v, g, _ = inputs(1, 70)
    o, _ = gla(q, k, v, g, mode="auto")
    assert [c["fn"] for c in fla.calls] == ["chunk_gla"]
    assert_close_rel(o, gla(q, k, v, g, mode="chunk")[0], 1e-6)


def test_without_fla_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gla_fla, "on_cuda", lambda x: True)
    monkeypatch.setitem(sys.modules, "fla", None)  # `import fla` raises ImportError
    gla_fla.fla_available.cache_clear()
    try:
        q, k, v, g, _ = inputs(1, 8)
        with pytest.raises(SpikingBrainError, match=r"spikingbrain\[gpu\]"):
            gla(q, k, v, g, mode="fla")
        o, _ = gla(q, k, v, g, mode="auto")  # no fla: the PyTorch path
        assert_close_rel(o, gla(q, k, v, g, mode="recurrent")[0], 1e-6)
    finally:
        gla_fla.fla_available.cache_clear()


@pytest.mark.parametrize("mode", ["fla", "auto"])
def test_model_prefill_packed_and_decode_through_fla(fake_fla, mode):
    """A GLA model with every GLA call going to the stand-in: a packed prefill (position_ids
    restart) and cached decode steps give the logits of the PyTorch path, with the calls fla needs:
    varlen chunk_gla for the packed prompt, fused_recurrent_gla with the cache's fp32 state."""
    fla = fake_fla()
    model = tiny_model(["gla", "gla"], strong=True)
    model.set_gla_mode(mode)
    cfg = model.config
    B, T = 2, 70
    ids = torch.randint(3, 500, (B, T), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(30), torch.arange(40)])[None].expand(B, T)  # 2 documents per row
    with torch.no_grad():
        logits = model(ids, position_ids=pos).logits
    H, D = cfg.num_attention_heads, cfg.head_dim
    assert len(fla.calls) == 2  # one per GLA layer
    for call in fla.calls:
        assert call["fn"] == "chunk_gla"
        assert call["cu_seqlens"] == ([0, 30, 70, 100, 140], torch.int32)
        assert call["q"] == ((1, B * T, H, D), torch.float32)
    model.set_gla_mode("chunk")
    with torch.no_grad():
        ref = model(ids, position_ids=pos).logits
    assert_close_rel(logits, ref, 1e-5, "packed prefill")

    # cached decode: a 20-token prompt, then 3 single-token steps
    fla.calls.clear()
    model.set_gla_mode(mode)
    seq = ids[:, :23]
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(seq[:, :20], past_key_values=cache).logits[:, -1]]
        for t in range(20, 23):
            steps.append(model(seq[:, t:t + 1], past_key_values=cache).logits[:, -1])
    fns = [c["fn"] for c in fla.calls]
    assert fns == ["fused_recurrent_gla"] * 8  # (prompt + 3 steps) x 2 layers, all T <= 64
    for call in fla.calls[2:]:
        assert call["q"] == ((B, 1, H, D), torch.float32)
        assert call["initial_state"] == ((B, H, D, D), torch.float32) and call["output_final_state"]
    model.set_gla_mode("recurrent")
    with torch.no_grad():
        full = model(seq, use_cache=False).logits
    assert_close_rel(torch.stack(steps, 1), full[:, 19:23], 1e-5, "decode steps vs one forward")


def test_gpu_extra_declares_the_supported_range():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert f"flash-linear-attention{gla_fla.FLA_VERSIONS}" in project["optional-dependencies"]["gpu"]
