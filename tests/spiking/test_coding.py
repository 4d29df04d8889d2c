import pytest
import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.spiking import SCHEMES, decode, encode, spike_events, time_steps
from spikingbrain.spiking.coding import row_time_steps


def _signed_counts():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(-20, 21, (4, 9), generator=g)
    s[0, :4] = 0
    s[1, 0], s[1, 1], s[2, 2] = 100_000, -100_000, -(2**20)
    return s


@pytest.mark.parametrize("scheme", ["ternary", "bitwise-bidirectional", "twos-complement"])
def test_signed_identity(scheme):
    s = _signed_counts() if scheme != "ternary" else torch.randint(-300, 301, (3, 5, 7))
    train = encode(s, scheme)
    assert train.dtype == torch.int8 and set(train.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(decode(train, scheme), s)
    assert torch.equal(spike_events(s, scheme), train.ne(0).sum(0))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_nonnegative_identity_and_padding(scheme):
    s = torch.tensor([[0, 1, 2, 3], [7, 8, 100, 0]])
    train = encode(s, scheme)
    assert torch.equal(decode(train, scheme), s)
    padded = encode(s, scheme, T=train.shape[0] + 3)
    assert torch.equal(decode(padded, scheme), s)
    assert torch.equal(spike_events(s, scheme, T=train.shape[0] + 3), padded.ne(0).sum(0))


def test_float_integer_counts_accepted():
    s = torch.tensor([1.0, -3.0, 0.0])
    assert decode(encode(s, "ternary"), "ternary").tolist() == [1, -3, 0]


@pytest.mark.parametrize("scheme", ["binary", "bitwise"])
def test_unsigned_schemes_reject_negatives(scheme):
    with pytest.raises(SpikingBrainError, match="non-negative"):
        encode(torch.tensor([1, -1]), scheme)


def test_minimal_time_steps():
    s = torch.tensor([0, 5, -7])
    assert time_steps(s, "ternary") == 7
    assert time_steps(s, "bitwise-bidirectional") == 3  # 7 = 111
    assert time_steps(s, "twos-complement") == 4  # -8..7
    assert time_steps(torch.tensor([0, 5]), "binary") == 5
    assert time_steps(torch.tensor([0, 5]), "bitwise") == 3
    assert time_steps(torch.tensor([-8]), "twos-complement") == 4
    assert time_steps(torch.tensor([8]), "twos-complement") == 5
    assert time_steps(torch.tensor([-1]), "twos-complement") == 1
    for scheme in SCHEMES:
        assert time_steps(torch.zeros(3, dtype=torch.long), scheme) == 0
        assert encode(torch.zeros(3), scheme).shape == (0, 3)
        assert decode(encode(torch.zeros(3), scheme), scheme).tolist() == [0, 0, 0]


def test_known_trains():
    assert encode(torch.tensor([-3]), "ternary").flatten().tolist() == [-1, -1, -1]
    assert encode(torch.tensor([6]), "bitwise").flatten().tolist() == [1, 1, 0]
    assert encode(torch.tensor([-6]), "bitwise-bidirectional").flatten().tolist() == [-1, -1, 0]
    assert encode(torch.tensor([-3]), "twos-complement").flatten().tolist() == [-1, 0, 1]  # 101 = -4 + 1


def test_row_time_steps_match_per_row_minimum():
    s = _signed_counts()
    for scheme in ("ternary", "bitwise-bidirectional", "twos-complement"):
        rows = row_time_steps(s, scheme)
        assert rows.tolist() == [time_steps(r, scheme) for r in s]


def test_bad_inputs():
    with pytest.raises(SpikingBrainError, match="integers"):
        encode(torch.tensor([0.5]), "ternary")
    with pytest.raises(SpikingBrainError, match="unknown"):
        encode(torch.tensor([1]), "quaternary")
    with pytest.raises(SpikingBrainError, match="at least"):
        encode(torch.tensor([9]), "bitwise", T=3)
    with pytest.raises(SpikingBrainError, match="slots"):
        encode(torch.tensor([10**9]), "ternary")
