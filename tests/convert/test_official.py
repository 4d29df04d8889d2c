"""The released SpikingBrain-7B checkpoint format (``gla_swa``, normal and W8ASpike), written by the
test from the format, loaded by the package and compared with the independent reference forward of
``tests/official_ref.py`` (explicit GLA recurrence, explicit masked window softmax, the official
fake quantization): logits, prefill + step-by-step decode, a left-padded batch, both window
conventions.

Tolerances: the plain format in fp32 at 2e-5 in the logits (|logits| ~ 4, so a few ulps of
accumulated rounding). W8ASpike is compared in fp64 (1e-9): spike counts are rounded, so in fp32 a
1-ulp difference between two correct implementations can move one count by one and the logits by
~1e-2 (seen in 2 of 10 random sequences); fp64 makes such ties practically impossible.
"""
from __future__ import annotations

import json

import pytest
import torch
from official_ref import Reference, official_config, official_weights, write_official
from transformers import AutoModelForCausalLM

import spikingbrain  # noqa: F401  (registers the gla_swa format with the Auto classes)
from spikingbrain import SpikingBrainError, SpikingBrainForCausalLM

CFG = official_config()  # 4 layers (GLA, SWA, GLA, SWA), hidden 128, 4 heads / 2 KV heads, window W = 6
W = CFG["sliding_window"]
KEYS = {"flash-attn": W + 1, "sdpa": W}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    w = official_weights(CFG, seed=1)
    return write_official(tmp_path_factory.mktemp("official"), CFG, w), w


@pytest.fixture(scope="module")
def w8(tmp_path_factory):
    w = official_weights(CFG, seed=2, w8aspike=True)
    return write_official(tmp_path_factory.mktemp("w8aspike"), CFG, w), w


def ids_of(b, t, seed):
    return torch.randint(0, CFG["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


def check(out, ref, tol, what):
    diff = (out - ref).abs().max().item()
    assert diff <= tol, f"{what}: max abs logit difference {diff:.3e} > {tol:.0e}"


CASES = [("plain", "flash-attn", torch.float32, 2e-5), ("plain", "sdpa", torch.float32, 2e-5),
         ("w8", "flash-attn", torch.float64, 1e-9), ("w8", "sdpa", torch.float64, 1e-9)]


def setup(request, kind, convention, dtype, **options):
    path, weights = request.getfixturevalue(kind)
    model = SpikingBrainForCausalLM.from_pretrained(path, dtype=dtype, window_convention=convention, **options)
    ref = Reference(CFG, weights, keys=KEYS[convention], dtype=dtype, w8aspike=kind == "w8",
                    down_proj=options.get("down_proj", "float"))
    return model, ref


@pytest.mark.parametrize("kind,convention,dtype,tol", CASES)
def test_logits_match_reference(request, kind, convention, dtype, tol):
    model, ref = setup(request, kind, convention, dtype)
    assert model.config.sliding_window == KEYS[convention]
    assert model.config.window_convention == convention
    ids = ids_of(2, 72, seed=3)  # beyond the window and beyond one GLA chunk (64)
    with torch.no_grad():
        out = model(ids).logits
    for b in range(2):
        check(out[b], ref.logits(ids[b]), tol, f"{kind}/{convention} row {b}")


@pytest.mark.parametrize("kind,convention,dtype,tol", CASES)
def test_prefill_then_decode_matches_reference(request, kind, convention, dtype, tol):
    model, ref = setup(request, kind, convention, dtype)
    ids = ids_of(1, 30, seed=4)
    full = ref.logits(ids[0])
    cache = model.new_cache()
    with torch.no_grad():
        out = model(ids[:, :9], past_key_values=cache, use_cache=True)
        check(out.logits[0], full[:9], tol, "prefill")
        for t in range(9, 30):  # one token at a time, well past the window
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            check(out.logits[0, -1], full[t], tol, f"decode step at position {t}")


@pytest.mark.parametrize("kind,convention,dtype,tol", CASES)
def test_left_padded_batch_matches_reference_per_row(request, kind, convention, dtype, tol):
    model, ref = setup(request, kind, convention, dtype)
    real = [ids_of(1, 14, seed=5)[0], ids_of(1, 9, seed=6)[0]]  # prompts of different lengths
    new = ids_of(2, 12, seed=7)  # tokens fed one at a time afterwards
    T = max(len(r) for r in real)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(real):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits]
        for t in range(new.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            steps.append(model(new[:, t:t + 1], attention_mask=mask, past_key_values=cache, use_cache=True).logits)
    for b, r in enumerate(real):
        full = ref.logits(torch.cat([r, new[b]]))
        check(steps[0][b, T - len(r):], full[: len(r)], tol, f"row {b} prompt")
        for t in range(new.shape[1]):
            check(steps[t + 1][b, -1], full[len(r) + t], tol, f"row {b} decode step {t}")


def test_window_conventions_differ(plain):
    """Otherwise the tests above could not tell the two conventions apart."""
    path, weights = plain
    ids = ids_of(1, 40, seed=8)[0]
    a = Reference(CFG, weights, keys=W + 1).logits(ids)
    b = Reference(CFG, weights, keys=W).logits(ids)
    assert (a[: W] - b[: W]).abs().max() < 1e-12  # identical while the context fits in both
    assert (a - b).abs().max() > 0.1


def test_w8aspike_down_proj_spiking_option(w8, request):
    model, ref = setup(request, "w8", "flash-attn", torch.float64, down_proj="spiking")
    assert model.config.spiking["exclude"] == []
    ids = ids_of(1, 40, seed=9)
    with torch.no_grad():
        check(model(ids).logits[0], ref.logits(ids[0]), 1e-9, "down_proj spiked")
    float_ref = Reference(CFG, w8[1], keys=W + 1, dtype=torch.float64, w8aspike=True)
    assert (float_ref.logits(ids[0]) - ref.logits(ids[0])).abs().max() > 1e-3  # the option matters


def test_structure_of_loaded_models(plain, w8):
    from spikingbrain.spiking import SpikingLinear
    from spikingbrain.spiking.w8aspike import KVQuantizer, QuerySpiker

    m = AutoModelForCausalLM.from_pretrained(plain[0])
    assert type(m) is SpikingBrainForCausalLM and m.config.model_type == "spikingbrain"
    assert m.config.layer_types == ["gla", "swa", "gla", "swa"] and m.config.spiking is None
    assert m.dtype == torch.float32  # "auto": the checkpoint's dtype (torch_dtype in its config)
    q = AutoModelForCausalLM.from_pretrained(w8[0])
    gla, swa = q.model.layers[0], q.model.layers[1]
    assert isinstance(gla.self_attn.gk_proj, SpikingLinear) and q.config.gla_gate == "full"
    assert type(gla.mlp.down_proj) is torch.nn.Linear  # float and unspiked, as their forward
    assert isinstance(swa.self_attn.q_quantizer, QuerySpiker) and isinstance(swa.self_attn.kv_quantizer, KVQuantizer)
    codes = [m.qweight for m in q.modules() if isinstance(m, SpikingLinear)]
    assert any(c.dtype == torch.int16 for c in codes)  # codes beyond 127 kept (no clamp)


# --------------------------------------------------------------------------- saving and converting
def test_loaded_w8aspike_saves_and_reloads_in_quantized_form(w8, tmp_path):
    m = SpikingBrainForCausalLM.from_pretrained(w8[0], dtype=torch.float64)
    m.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "spikingbrain" and saved["spiking"]["neuron"] == "w8aspike"
    again = SpikingBrainForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    sd, sd2 = m.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
    ids = ids_of(1, 20, seed=10)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, again(ids).logits)


@pytest.mark.parametrize("kind", ["plain", "w8"])
def test_convert_from_official_cli(request, kind, tmp_path, monkeypatch):
    from spikingbrain.cli import main
    from spikingbrain.convert import official

    path, _ = request.getfixturevalue(kind)
    (path / "tokenizer_config.json").write_text("{}")  # copied along, like the real tokenizer files
    monkeypatch.setattr(official, "SHARD_BYTES", 200_000)  # several shards + an index
    out = tmp_path / "native"
    assert main(["convert", "--from-official", str(path), "--out", str(out)]) == 0
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "spikingbrain"
    direct = SpikingBrainForCausalLM.from_pretrained(path)
    converted = SpikingBrainForCausalLM.from_pretrained(out)
    ids = ids_of(2, 20, seed=11)
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, converted(ids).logits)
    assert main(["convert", "--from-official", str(path), "--out", str(out)]) == 2  # not empty: refused


def test_convert_from_official_sdpa_convention(plain, tmp_path):
    from spikingbrain.cli import main

    out = tmp_path / "sdpa"
    assert main(["convert", "--from-official", str(plain[0]), "--out", str(out), "--window-convention", "sdpa"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sliding_window"] == W and cfg["window_convention"] == "sdpa"


# --------------------------------------------------------------------------- bad input
def _copy(src, dst, cfg=None, weights=None):
    return write_official(dst, cfg or CFG, weights or official_weights(CFG, seed=1))


@pytest.mark.parametrize("loader", ["own", "auto"])
def test_truncated_safetensors_is_refused(plain, tmp_path, loader):
    d = _copy(plain[0], tmp_path / "t")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    load = SpikingBrainForCausalLM.from_pretrained if loader == "own" else AutoModelForCausalLM.from_pretrained
    with pytest.raises(SpikingBrainError, match="truncated"):
        load(d)


def test_config_missing_field_is_refused(tmp_path):
    cfg = {k: v for k, v in CFG.items() if k != "rope_theta"}
    d = _copy(None, tmp_path / "c", cfg=cfg)
    with pytest.raises(SpikingBrainError, match="rope_theta"):
        SpikingBrainForCausalLM.from_pretrained(d)


def test_unknown_config_field_is_refused(tmp_path):
    d = _copy(None, tmp_path / "c", cfg={**CFG, "use_output_gate": True})
    with pytest.raises(SpikingBrainError, match="use_output_gate"):
        SpikingBrainForCausalLM.from_pretrained(d)


def test_unknown_model_type_is_refused(tmp_path):
    d = _copy(None, tmp_path / "u", cfg={**CFG, "model_type": "hymeta"})
    with pytest.raises(SpikingBrainError, match="'hymeta'"):
        SpikingBrainForCausalLM.from_pretrained(d)


def test_missing_tensor_is_refused(tmp_path):
    w = official_weights(CFG, seed=1)
    del w["model.layers.2.attn.gk_proj.1.bias"]
    d = _copy(None, tmp_path / "m", weights=w)
    for load in (SpikingBrainForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(SpikingBrainError, match=r"missing 1 tensor.*model\.layers\.2\.attn\.gk_proj\.1\.bias"):
            load(d)


def test_wrong_shape_is_refused(tmp_path):
    w = official_weights(CFG, seed=1)
    w["model.layers.1.attn.k_proj.weight"] = w["model.layers.1.attn.k_proj.weight"][:-1]
    d = _copy(None, tmp_path / "s", weights=w)
    with pytest.raises(SpikingBrainError, match=r"wrong shape.*model\.layers\.1\.attn\.k_proj\.weight: \[63, 128\]"):
        SpikingBrainForCausalLM.from_pretrained(d)


def test_unexpected_tensor_is_refused(tmp_path):
    w = official_weights(CFG, seed=1)
    w["model.layers.0.attn.q_conv1d.weight"] = torch.zeros(128, 1, 4)
    d = _copy(None, tmp_path / "x", weights=w)
    with pytest.raises(SpikingBrainError, match=r"no place for.*q_conv1d"):
        SpikingBrainForCausalLM.from_pretrained(d)


def test_w8aspike_missing_scales_is_refused(tmp_path):
    w = official_weights(CFG, seed=2, w8aspike=True)
    del w["model.layers.3.mlp.up_proj.weight_quantizer.scales"]
    d = _copy(None, tmp_path / "q", weights=w)
    with pytest.raises(SpikingBrainError, match=r"model\.layers\.3\.mlp\.up_proj\.weight_quantizer\.scales"):
        SpikingBrainForCausalLM.from_pretrained(d)


def test_bad_options_are_refused(plain):
    with pytest.raises(SpikingBrainError, match="window_convention"):
        SpikingBrainForCausalLM.from_pretrained(plain[0], window_convention="4096")
    with pytest.raises(SpikingBrainError, match="down_proj"):
        SpikingBrainForCausalLM.from_pretrained(plain[0], down_proj="int4")
