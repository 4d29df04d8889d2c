import random

import pytest

from spikingbrain.serve.detokenize import IncrementalDetokenizer, StopMatcher

TEXTS = ["café naïve über 東京 — ☃ 😀 done", "plain ascii text, with  two spaces\nand a newline",
         "😀😀😀 three emoji then words"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_join_to_the_full_decode_and_never_split_a_character(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # the byte-level tokenizer really splits multi-byte characters over several ids
    if any(ord(c) > 127 for c in text):
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer("hello", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "hello"


def test_incomplete_character_at_the_end_is_flushed(tokenizer):
    ids = tokenizer("ab😀", add_special_tokens=False)["input_ids"][:-1]  # drop the emoji's last byte(s)
    detok = IncrementalDetokenizer(tokenizer)
    shown = "".join(detok.push(i) for i in ids)
    assert shown == "ab"
    assert (shown + detok.flush()) == tokenizer.decode(ids)


def _run_stop(text: str, stops: list[str], rng: random.Random) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out, i = [], 0
    while i < len(text) and not m.stopped:
        n = rng.randint(1, 4)
        piece, stopped = m.feed(text[i:i + n])
        out.append(piece)
        i += n
    if not m.stopped:
        out.append(m.flush())
    return "".join(out), m.stopped


def test_stop_strings_trim_the_output_wherever_the_pieces_split():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cut = min([i for i in (text.find(s) for s in stops) if i >= 0], default=len(text))
        out, stopped = _run_stop(text, stops, rng)
        assert out == text[:cut], (text, stops)
        assert stopped == (cut < len(text))


def test_text_that_may_start_a_stop_string_is_held_back_until_decided():
    m = StopMatcher(["END"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("X more") == ("ENX more", False)
    assert m.feed(" EN") == (" ", False)
    assert m.feed("D tail") == ("", True)
    assert m.text == "hello ENX more "
