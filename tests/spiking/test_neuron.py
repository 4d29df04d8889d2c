import pytest
import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking import adaptive_spikes, integrate_and_fire, round_half_up, threshold


def test_multi_step_sum_equals_one_step_collapse():
    torch.manual_seed(0)
    x = torch.randn(6, 50) * torch.rand(6, 1) * 10
    x[0, :5] = 0.0
    s, v_th = adaptive_spikes(x, k=3.0)
    train = integrate_and_fire(x / v_th)
    assert train.shape[0] == int(s.abs().max())
    assert set(train.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(train.sum(0).float(), s)


def test_ties_round_half_up_in_both_views():
    below_half = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)).item()
    u = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49, -1.49, 3.0, 0.0, below_half, -1.5000001])
    expected = torch.tensor([1.0, 2.0, 3.0, 0.0, -2.0, 0.0, -1.0, 3.0, 0.0, 0.0, -2.0])
    assert torch.equal(round_half_up(u), expected)
    assert torch.equal(integrate_and_fire(u).sum(0).float(), expected)


def test_fewer_steps_clip_the_count():
    u = torch.tensor([5.2, -4.0, 1.0, 0.2])
    assert integrate_and_fire(u, steps=2).sum(0).tolist() == [2, -2, 1, 0]


def test_unsigned_neuron_rejects_negative_input():
    with pytest.raises(SpikingBrainError, match="negative"):
        integrate_and_fire(torch.tensor([1.0, -2.0]), signed=False)
    assert integrate_and_fire(torch.tensor([2.0, 0.0, -0.5]), signed=False).sum(0).tolist() == [2, 0, 0]


def test_threshold_definition_and_clamp():
    x = torch.tensor([[1.0, -2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1e6, -1e6, 1e6, 1e6]])
    v = threshold(x, k=2.0)
    assert v.shape == (3, 1)
    assert v[0, 0].item() == pytest.approx(0.75)
    assert v[1, 0].item() == pytest.approx(1e-5)
    assert v[2, 0].item() == pytest.approx(1e4)
    s, _ = adaptive_spikes(x[:1], k=2.0)
    assert s.tolist() == [[1.0, -3.0, 4.0, 0.0]]  # 1/0.75=1.33, -2.67, 4


def test_clip_option():
    x = torch.tensor([[10.0, 0.1, 0.1, 0.1, -10.0]])
    s, _ = adaptive_spikes(x, k=3.0)
    assert s.abs().max() > 3
    sc, _ = adaptive_spikes(x, k=3.0, clip=3)
    assert sc.tolist()[0][0] == 3 and sc.tolist()[0][-1] == -3
    with pytest.raises(SpikingBrainError):
        adaptive_spikes(x, clip=0)
    with pytest.raises(SpikingBrainError):
        adaptive_spikes(x, k=0)


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    x = torch.randn(3, 16, requires_grad=True)
    s, v_th = adaptive_spikes(x, k=3.0)
    assert torch.equal(s.detach(), s.detach().round())
    g = torch.randn(3, 16)
    ((s * v_th) * g).sum().backward()
    assert torch.allclose(x.grad, g, atol=1e-6)


def test_bf16_input_counts_exact():
    x = (torch.randn(2, 64) * 5).to(torch.bfloat16)
    s, v = adaptive_spikes(x)
    assert s.dtype == torch.float32
    assert torch.equal(s, round_half_up(x.float() / v))
