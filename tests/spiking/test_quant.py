import pytest
import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking import Int8KVQuantizer, dequantize_weight, quantize_per_vector, quantize_weight
from spikingbrain.spiking.quant import expand_scales, fake_quantize_weight


def test_int8_group_error_bounded_by_half_step():
    torch.manual_seed(0)
    w = torch.randn(10, 300)
    w[3, 5] = 40.0  # an outlier only widens its own (row, group) step
    q, s = quantize_weight(w, bits=8, group_size=128)
    assert q.dtype == torch.int8 and s.shape == (10, 3)  # 128 + 128 + 44
    assert int(q.abs().max()) == 127
    err = (dequantize_weight(q, s, 128) - w).abs()
    assert bool((err <= expand_scales(s, 300, 128) / 2 + 1e-6).all())
    assert s[3, 0] == pytest.approx(40.0 / 127) and s[3, 1] < 0.05


def test_clipping_ratio_clamps_codes():
    w = torch.tensor([[1.0, -0.5, 0.25, -1.0]])
    q, s = quantize_weight(w, bits=8, group_size=4, alpha=0.5)
    assert s.item() == pytest.approx(0.5 / 127)
    assert q.tolist() == [[127, -127, 64, -127]]


def test_zero_group_and_bits():
    q, s = quantize_weight(torch.zeros(2, 8), group_size=4)
    assert q.abs().sum() == 0 and torch.equal(s, torch.ones(2, 2))
    q4, _ = quantize_weight(torch.randn(4, 16), bits=4, group_size=8)
    assert int(q4.abs().max()) == 7
    with pytest.raises(SpikingBrainError):
        quantize_weight(torch.randn(2, 2), bits=9)


def test_fake_quant_ste_gradient():
    w = torch.randn(3, 8, requires_grad=True)
    fake_quantize_weight(w, 8, 4).sum().backward()
    assert torch.equal(w.grad, torch.ones(3, 8))


def test_kv_per_vector():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 5, 16)
    k[0, 0, 0] *= 100
    codes, scale = quantize_per_vector(k)
    assert codes.dtype == torch.int8 and scale.shape == (2, 3, 5, 1)
    assert torch.equal(codes.abs().amax(-1), torch.full((2, 3, 5), 127, dtype=torch.int8))
    kq, vq = Int8KVQuantizer()(k, k * 2)
    assert bool(((kq - k).abs() <= scale / 2 + 1e-6).all())
    assert torch.allclose(vq, kq * 2, atol=1e-5)
    assert (kq - k)[0, 0, 1].abs().max() < 0.05  # the outlier vector does not spoil its neighbours
