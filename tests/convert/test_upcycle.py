"""MoE upcycling: experts are scaled copies of the dense FFN, logits stay close, configs round-trip."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spikingbrain.convert.upcycle import default_moe_layers, upcycle_alpha, upcycle_moe
from spikingbrain.errors import SpikingBrainError
from spikingbrain.layers.moe import MoE, moe_aux_loss

# Relative logits error ||logits_moe - logits_dense|| / ||logits_dense|| measured for the tiny
# Llama below (FFN weights std 0.1, so the FFNs matter: zeroing them moves the logits by ~100%),
# 16 experts, top-1, 1 shared, all 4 layers upcycled, seeds 0-2: 0.018-0.021 with the alpha
# scaling and 0.074-0.078 without it (plain copies). We assert < 0.03 and < half the unscaled one.
REL_ERROR_BOUND = 0.03


def tiny_llama(seed=0, std=0.1):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=std)
    return LlamaForCausalLM(cfg).eval()


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_alpha_matches_spec():
    assert upcycle_alpha(16, 1, 1) == pytest.approx((1 / (1 + 1 / 16)) ** (1 / 3))
    assert round(upcycle_alpha(16, 1, 1), 2) == 0.98
    assert upcycle_alpha(8, 2, 0, norm_topk_prob=True) == pytest.approx(1.0)


def test_default_layers_follow_the_76b_pattern():
    moe = default_moe_layers(28)
    assert len(moe) == 21
    assert [i + 1 for i in range(28) if i not in moe] == [1, 2, 3, 5, 7, 9, 11]
    assert default_moe_layers(4) == [3]


def test_experts_are_scaled_copies_and_router_is_seeded():
    dense = tiny_llama()
    model = upcycle_moe(copy.deepcopy(dense), num_experts=4, top_k=1, num_shared_experts=1, layers=[1, 3])
    alpha = upcycle_alpha(4, 1, 1)
    assert not isinstance(model.model.layers[0].mlp, MoE)
    for i in (1, 3):
        moe = model.model.layers[i].mlp
        assert isinstance(moe, MoE) and len(moe.experts) == 4 and len(moe.shared_experts) == 1
        for expert in list(moe.experts) + list(moe.shared_experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                w = getattr(expert, name).weight
                assert w.requires_grad
                torch.testing.assert_close(w, getattr(dense.model.layers[i].mlp, name).weight * alpha)
        assert 0.01 < moe.router.weight.std().item() < 0.03
    same = upcycle_moe(copy.deepcopy(dense), num_experts=4, layers=[1, 3])
    other = upcycle_moe(copy.deepcopy(dense), num_experts=4, layers=[1, 3], seed=1)
    r = lambda m: m.model.layers[3].mlp.router.weight  # noqa: E731
    assert torch.equal(r(model), r(same)) and not torch.equal(r(model), r(other))


@pytest.mark.parametrize("seed", [0, 1])
def test_upcycled_logits_stay_close_to_dense(seed):
    dense = tiny_llama(seed)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = dense(ids).logits
        no_ffn = copy.deepcopy(dense)
        for layer in no_ffn.model.layers:
            layer.mlp.down_proj.weight.zero_()
        ffn_effect = rel_error(no_ffn(ids).logits, ref)

        model = upcycle_moe(copy.deepcopy(dense), layers=range(4))
        err = rel_error(model(ids).logits, ref)

        alpha = upcycle_alpha(16, 1, 1)
        for layer in model.model.layers:  # undo the scaling: plain copies of the dense FFN
            for expert in list(layer.mlp.experts) + list(layer.mlp.shared_experts):
                for lin in (expert.gate_proj, expert.up_proj, expert.down_proj):
                    lin.weight.div_(alpha)
        unscaled = rel_error(model(ids).logits, ref)
    assert ffn_effect > 0.5  # the FFNs matter, so "close" is a real statement
    assert err < REL_ERROR_BOUND
    assert err < 0.5 * unscaled


def test_upcycled_model_trains_router():
    model = upcycle_moe(tiny_llama(), num_experts=4, layers=[2, 3]).train()
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, labels=ids)
    loss = out.loss + moe_aux_loss(model)
    loss.backward()
    assert model.model.layers[2].mlp.router.weight.grad.abs().max() > 0
    assert moe_aux_loss(model).item() > 0


def test_bad_requests_raise_clear_errors():
    model = upcycle_moe(tiny_llama(), num_experts=4, layers=[3])
    with pytest.raises(SpikingBrainError, match="not a dense SwiGLU"):
        upcycle_moe(model, num_experts=4, layers=[3])
    with pytest.raises(SpikingBrainError, match="out of range"):
        upcycle_moe(model, num_experts=4, layers=[7])
    with pytest.raises(SpikingBrainError, match="top_k"):
        upcycle_moe(model, num_experts=4, top_k=5, layers=[0])
    with pytest.raises(SpikingBrainError, match="router"):
        upcycle_moe(model, num_experts=4, router="relu", layers=[0])
    with pytest.raises(SpikingBrainError, match="model.model.layers"):
        upcycle_moe(torch.nn.Linear(2, 2))


def test_spikingbrain_model_upcycles_and_reloads(tmp_path):
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(0)
    config = SpikingBrainConfig.from_preset("tiny", initializer_range=0.1)
    dense = SpikingBrainForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 24))
    model = upcycle_moe(copy.deepcopy(dense), num_experts=4, top_k=2, num_shared_experts=1, layers=[1, 3])
    assert model.config.mlp_layer_types == ["dense", "moe", "dense", "moe"]
    assert (model.config.num_experts, model.config.num_experts_per_tok, model.config.num_shared_experts) == (4, 2, 1)
    assert model.config.router_type == "softmax"
    with torch.no_grad():
        ref, logits = dense(ids).logits, model(ids).logits
    assert rel_error(logits, ref) < REL_ERROR_BOUND

    model.save_pretrained(tmp_path)
    reloaded = SpikingBrainForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.model.layers[1].mlp, MoE)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits)
        out = reloaded(ids, labels=ids)
    # the model adds the MoE auxiliary loss to the language-model loss when labels are given
    ce = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(out.loss, ce + moe_aux_loss(reloaded))


def test_upcycled_spikingbrain_trains_identically_with_activation_checkpointing():
    """The aux loss is a side output of each MoE; under (non-reentrant) checkpointing its graph
    must still reach the router."""
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(0)
    model = SpikingBrainForCausalLM(SpikingBrainConfig.from_preset("tiny"))
    model = upcycle_moe(model, num_experts=4, layers=[1, 3]).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))

    def router_grad():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return model.model.layers[3].mlp.router.weight.grad.clone()

    plain = router_grad()
    model.activation_checkpointing_enable()
    torch.testing.assert_close(router_grad(), plain)
    assert plain.abs().max() > 0
