import pytest
import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.serve.sampling import (SamplingParams, apply_repetition_penalty, filter_top_k_top_p,
                                         sample_next)

NO_SEEN = torch.empty(0, dtype=torch.long)


def test_greedy_is_argmax_and_ties_go_to_lowest_id():
    logits = torch.tensor([0.1, 2.0, 2.0, -1.0])
    assert sample_next(logits, SamplingParams(temperature=0), NO_SEEN) == 1


def test_top_k_keeps_k_best():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    kept = filter_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [False, True, False, True]


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = filter_top_k_top_p(probs.log(), top_k=0, top_p=0.8)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    # the most likely token survives even when it alone exceeds top_p
    kept = filter_top_k_top_p(probs.log(), top_k=0, top_p=0.1)
    assert torch.isfinite(kept).tolist() == [True, False, False, False]


def test_top_k_one_at_high_temperature_is_greedy():
    logits = torch.randn(100)
    p = SamplingParams(temperature=5.0, top_k=1, seed=3)
    assert all(sample_next(logits, p, NO_SEEN, p.make_generator()) == int(logits.argmax()) for _ in range(5))


def test_seed_makes_sampling_reproducible_and_different_seeds_differ():
    logits = torch.zeros(1000)

    def draw(seed):
        p = SamplingParams(temperature=1.0, seed=seed)
        g = p.make_generator()
        return [sample_next(logits, p, NO_SEEN, g) for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([0.0, 0.0, torch.log(torch.tensor(2.0))])  # probs 1/4, 1/4, 1/2
    p = SamplingParams(temperature=1.0, seed=0)
    g = p.make_generator()
    draws = torch.tensor([sample_next(logits, p, NO_SEEN, g) for _ in range(2000)])
    assert abs((draws == 2).float().mean().item() - 0.5) < 0.05


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # not in place
    # greedy switches away from a repeated token
    p = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert sample_next(torch.tensor([2.0, 1.0]), p, torch.tensor([0]), None) == 1


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                    dict(repetition_penalty=0), dict(max_new_tokens=0)])
def test_bad_parameters_are_user_errors(kwargs):
    with pytest.raises(SpikingBrainError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(temperature=1e-300), dict(temperature=5e-324), dict(temperature=1e-40),
                                    dict(temperature=1.0, repetition_penalty=1e-300),
                                    dict(temperature=1.0, repetition_penalty=1e300),
                                    dict(temperature=2.0, top_p=1e-300, repetition_penalty=1e-300)])
def test_every_accepted_value_samples_a_valid_token(kwargs):
    """Values inside the accepted ranges once gave inf/NaN probabilities (multinomial raised)."""
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 30
    seen = torch.tensor([int(logits.argmax()), 5, 7])
    p = SamplingParams(seed=0, **kwargs)
    g = p.make_generator()
    tokens = [sample_next(logits, p, seen, g) for _ in range(20)]
    assert all(0 <= t < 300 for t in tokens)
    if kwargs["temperature"] < 1e-5:  # vanishing temperature: greedy
        assert tokens == [int(logits.argmax())] * 20


@pytest.mark.parametrize("kwargs", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                    dict(repetition_penalty=float("nan")), dict(repetition_penalty=float("inf")),
                                    dict(top_p=float("nan")), dict(seed=2 ** 70), dict(seed=-(2 ** 63) - 1)])
def test_non_finite_values_and_huge_seeds_are_user_errors(kwargs):
    with pytest.raises(SpikingBrainError):
        SamplingParams(**kwargs)


def test_nan_logits_raise_a_sampling_error():
    from spikingbrain.serve.sampling import SamplingError

    with pytest.raises(SamplingError):
        sample_next(torch.tensor([0.0, float("nan")]), SamplingParams(temperature=1.0, seed=1), NO_SEEN)


def test_the_generator_lives_on_the_logits_device(monkeypatch, sb_model, tokenizer):
    """A seeded sequence draws with a generator made on its logits' device (a CPU generator
    cannot drive multinomial on CUDA logits). CPU-only machines check the device is passed."""
    from spikingbrain.serve.generation import Sequence

    made = []
    real = torch.Generator

    def recording(*args, **kwargs):
        made.append(kwargs.get("device", args[0] if args else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "Generator", recording)
    seq = Sequence([1, 2], SamplingParams(temperature=1.0, seed=3), tokenizer, set())
    logits = torch.randn(64)
    seq.choose(logits)
    assert [torch.device(d) for d in made] == [logits.device]
    assert seq.generator.device == logits.device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_sampling_on_cuda_logits(tokenizer):
    from spikingbrain.serve.generation import Sequence

    logits = torch.randn(1000, device="cuda")
    draws = []
    for _ in range(2):
        seq = Sequence([1], SamplingParams(temperature=1.0, seed=7), tokenizer, set())
        draws.append([seq.choose(logits) for _ in range(10)])
    assert draws[0] == draws[1]
    assert seq.generator.device.type == "cuda"
