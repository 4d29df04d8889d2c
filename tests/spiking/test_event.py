import pytest
import torch

from spikingbrain.spiking import SpikingLinear, dense_matmul, encode, event_matmul, quantize_weight


@pytest.mark.parametrize("scheme", ["ternary", "bitwise-bidirectional", "twos-complement"])
def test_event_matmul_equals_dense(scheme):
    g = torch.Generator().manual_seed(0)
    s = torch.randint(-9, 10, (5, 40), generator=g)
    s[s.abs() < 4] = 0  # sparse
    w = torch.randn(7, 40, generator=g)
    q, scales = quantize_weight(w, group_size=16)
    train = encode(s, scheme)
    integer = event_matmul(train, q, None, scheme)
    assert torch.equal(integer.output, s @ q.long().t())
    assert torch.equal(integer.output, dense_matmul(train, q, None, scheme))
    res = event_matmul(train, q, scales, scheme, group_size=16, chunk=64)  # small chunks: several index_adds
    assert torch.allclose(res.output, dense_matmul(train, q, scales, scheme, group_size=16), rtol=1e-5, atol=1e-4)
    nnz = int(train.ne(0).sum())
    assert res.spikes == nnz and res.accumulates == nnz * 7
    assert nnz < train.numel()  # the point: work scales with spikes, not slots


def test_binary_and_silent_input():
    q, _ = quantize_weight(torch.randn(3, 6))
    s = torch.tensor([[0, 2, 0, 1, 0, 0]])
    assert torch.equal(event_matmul(encode(s, "binary"), q, scheme="binary").output, s @ q.long().t())
    silent = event_matmul(encode(torch.zeros(2, 6), "ternary"), q)
    assert silent.accumulates == 0 and silent.output.abs().sum() == 0


def test_spiking_linear_equals_event_driven_simulation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 9)
    layer = SpikingLinear(lin, k=3.0, group_size=128)
    x = torch.randn(4, 200)
    s, v_th = layer.spikes(x)
    train = encode(s, "bitwise-bidirectional")  # [T, 4, 200]
    res = event_matmul(train, layer.qweight, layer.scales, "bitwise-bidirectional", group_size=128)
    y_event = res.output * v_th + lin.bias.detach()
    assert torch.allclose(layer(x), y_event, rtol=1e-4, atol=1e-4)
