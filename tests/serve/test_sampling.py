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
