import math
import re

import pytest
import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.evaluation.passkey import (
    INTRO,
    greedy_continuation,
    key_score,
    make_passkey_prompt,
    passkey,
    passkey_sweep,
    passkey_table,
    score_answer,
)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_key_sits_at_the_asked_depth(tokenizer, depth):
    length = 400
    p = make_passkey_prompt(tokenizer, length, depth, seed=3)
    ids = p.input_ids
    assert abs(len(ids) - length) <= 6
    assert re.fullmatch(r"\d{5}", p.answer) and p.text.count(p.answer) == 2
    # The needle starts at the reported token, found independently in the token ids.
    assert tokenizer.decode(ids[p.needle_token:p.needle_token + 24]).lstrip().startswith(f"The pass key is {p.answer}")
    assert not tokenizer.decode(ids[:p.needle_token]).rstrip().endswith("The")
    # Its position, as a share of the filler's tokens, is the requested depth.
    intro = len(tokenizer(INTRO)["input_ids"])
    needle = len(tokenizer(" The pass key is 12345. Remember it. 12345 is the pass key. ")["input_ids"])
    question = len(tokenizer("\n\nWhat is the pass key? The pass key is")["input_ids"])
    filler = len(ids) - intro - needle - question
    assert abs((p.needle_token - intro) / filler - depth) < 0.03
    assert p.text.endswith("The pass key is")


def test_prompt_is_deterministic_and_seeded(tokenizer):
    a = make_passkey_prompt(tokenizer, 300, 0.5, seed=7)
    b = make_passkey_prompt(tokenizer, 300, 0.5, seed=7)
    c = make_passkey_prompt(tokenizer, 300, 0.5, seed=8)
    assert a == b
    assert a.answer != c.answer and a.text != c.text


def test_user_filler_text(tokenizer):
    p = make_passkey_prompt(tokenizer, 200, 0.5, filler_texts=["The grass is green. The sky is blue."])
    body = p.text[len(INTRO):p.needle_char]
    assert set(body.split()) <= {"The", "grass", "is", "green.", "sky", "blue."}
    assert abs(len(p.input_ids) - 200) <= 6


def test_multi_key(tokenizer):
    p = make_passkey_prompt(tokenizer, 600, 0.3, seed=1, num_keys=4)
    assert len(p.keys) == 4 and len(set(p.keys.values())) == 4
    assert p.keys[p.name] == p.answer
    for name, key in p.keys.items():
        assert p.text.count(f"The pass key for {name} is {key}.") == 1
    assert p.text.endswith(f"What is the pass key for {p.name}? The pass key for {p.name} is")
    assert tokenizer.decode(p.input_ids[p.needle_token:p.needle_token + 30]).lstrip().startswith(
        f"The pass key for {p.name} is {p.answer}")


def test_bad_arguments(tokenizer):
    with pytest.raises(SpikingBrainError, match="depth"):
        make_passkey_prompt(tokenizer, 300, 1.5)
    with pytest.raises(SpikingBrainError, match="too short"):
        make_passkey_prompt(tokenizer, 20, 0.5)
    with pytest.raises(SpikingBrainError, match="num_keys"):
        make_passkey_prompt(tokenizer, 300, 0.5, num_keys=0)


@pytest.mark.parametrize("generated,expected", [
    (" 12345.", True), ("12345", True), (" is 12345 and 99999", True), ("\n12345 is the pass key", True),
    (" 1234", False), (" 123456", False), (" 12 345", False), (" 54321", False), (" none", False), ("", False),
])
def test_scorer_is_exact(generated, expected):
    assert score_answer(generated, "12345") is expected


class FakeModel:
    """A 'model' whose generate() appends fixed text: the scorer sees exactly what it outputs."""

    def __init__(self, tokenizer, output: str):
        self.new = tokenizer(output, add_special_tokens=False)["input_ids"]
        self.calls = []

    def generate(self, input_ids, **kwargs):
        self.calls.append(kwargs)
        return torch.cat([input_ids, torch.tensor([self.new])], dim=1)


def test_passkey_with_fake_model(tokenizer):
    key = make_passkey_prompt(tokenizer, 300, 0.5, seed=4).answer
    assert passkey(FakeModel(tokenizer, f" {key}. Remember"), tokenizer, 300, 0.5, seed=4)
    assert not passkey(FakeModel(tokenizer, f" {key[:-1]}"), tokenizer, 300, 0.5, seed=4)
    assert not passkey(FakeModel(tokenizer, f" {key}0"), tokenizer, 300, 0.5, seed=4)
    fake = FakeModel(tokenizer, f" {key}")
    assert not passkey(fake, tokenizer, 300, 0.5, seed=5)  # another seed, another key
    assert fake.calls[0]["do_sample"] is False and fake.calls[0]["max_new_tokens"] == 8


def test_chunked_prefill_matches_one_shot_generation(tokenizer, llama, spiking):
    p = make_passkey_prompt(tokenizer, 160, 0.5, seed=2)
    for model in (llama, spiking):
        one = greedy_continuation(model, tokenizer, p.input_ids, prefill_chunk=None)
        chunked = greedy_continuation(model, tokenizer, p.input_ids, prefill_chunk=48)
        assert one == chunked and len(one) > 0


def test_sweep_and_table(tokenizer):
    fake = FakeModel(tokenizer, " 00000")
    rows = passkey_sweep(fake, tokenizer, [200, 250], [0.0, 1.0], seeds=[0, 1])
    assert len(rows) == 8 and not any(r["correct"] for r in rows)
    rows[0]["correct"] = True  # length 200, depth 0, seed 0
    table = passkey_table(rows).splitlines()
    assert table[0] == "| length | 0% | 100% | mean |"
    assert table[2] == "| 200 | 0.5000 | 0.0000 | 0.2500 |"
    assert table[3] == "| 250 | 0.0000 | 0.0000 | 0.0000 |"


class OracleModel(torch.nn.Module):
    """Logits ``bias`` everywhere, plus ``lift`` on the token that really comes next (it reads
    ahead in its input): a teacher-forced scorer aligned one position off sees no lift."""

    def __init__(self, vocab: int, lift: float, bias: torch.Tensor | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.lift = vocab, lift
        self.bias = torch.zeros(vocab) if bias is None else bias
        self.seen = []

    def get_input_embeddings(self):
        return torch.nn.Embedding(self.vocab, 1)

    def forward(self, input_ids):
        self.seen.append(input_ids)
        logits = self.bias.expand(*input_ids.shape, self.vocab).clone()
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        logits.scatter_add_(2, nxt[..., None], torch.full((*nxt.shape, 1), self.lift))
        return type("Out", (), {"logits": logits})()


def test_key_score_reads_the_keys_tokens_teacher_forced(tokenizer):
    p = make_passkey_prompt(tokenizer, 300, 0.5, seed=4)
    V = len(tokenizer)
    flat = key_score(OracleModel(V, 0.0), tokenizer, p)  # uniform: log(1/V) per key token
    n = len(flat["ranks"])
    full = tokenizer(p.text + " " + p.answer)["input_ids"]
    assert tokenizer.decode(full[-n:]).strip() == p.answer
    assert flat["logprob"] == pytest.approx(-n * math.log(V), rel=1e-5) and flat["ranks"] == [0] * n
    oracle = OracleModel(V, 20.0)
    sharp = key_score(oracle, tokenizer, p)  # the true next token lifted: only an aligned scorer sees it
    assert sharp["logprob"] == pytest.approx(-n * math.log(1 + (V - 1) * math.exp(-20.0)), abs=1e-4)
    assert sharp["ranks"] == [0] * n and sharp["top"] == tokenizer.decode([full[-n]])
    assert oracle.seen[0].tolist() == [full]
    bias = torch.zeros(V)
    bias[tokenizer.eos_token_id] = 5.0  # another token preferred: every key token ranks behind it
    wrong = key_score(OracleModel(V, 0.0, bias), tokenizer, p)
    assert wrong["ranks"] == [1] * n and wrong["top"] == tokenizer.eos_token


def test_the_passkey_scores_summary_counts_each_key_position():
    """``benchmarks/passkey_scores.py``'s summary: per length, trials recalled and, per key
    position, the trials whose token there is the greedy choice (rank 0)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "passkey_scores.py"
    spec = importlib.util.spec_from_file_location("passkey_scores", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [{"length": 1024, "logprob": -1.0, "ranks": [0, 0, 0]},
            {"length": 1024, "logprob": -3.0, "ranks": [2, 0, 1]},
            {"length": 2048, "logprob": -5.0, "ranks": [1, 0]}]
    got = mod.summary(rows)
    assert got["1024"] == {"logprob": -2.0, "recalled": 1, "token_top1": round(4 / 6, 3),
                           "position_top1": [1, 2, 1], "trials": 2}
    assert got["2048"]["position_top1"] == [0, 1] and got["2048"]["recalled"] == 0
