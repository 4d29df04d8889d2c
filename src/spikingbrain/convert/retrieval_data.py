"""Retrieval windows for the conversion: facts hidden early in prose, asked and answered at the end.

The GLA layers replace half of the teacher's attention, and the converted student lost the
teacher's ability to pull an exact token from far back (passkey: it continues the filler prose
and never starts the number). A distillation window of plain prose almost never asks for that;
a retrieval window does, several times:

    <prose ... "The code of the green locker is 4817." ... prose ... "Kate's ticket number is
    92.">  ...prose...
    Question: What is the code of the green locker?
    Answer: The code of the green locker is 4817.
    Question: ...

(or, for a share of the questions, bare: "...prose...\n\nWhat is Kate's ticket number? Kate's
ticket number is 92."; and, for a share of the facts, a number named by a bare noun: "The lucky
number is 58213." ... "What is the lucky number? The lucky number is 58213.")

Everything is generated from the shipped prose with a seeded RNG (no teacher call, nothing to
ship); the templates, subjects and key shapes are deliberately not the passkey benchmark's
(``evaluation/passkey.py``), so the benchmark stays a held-out test.

The window comes with ``answer`` weights: 1 on the logit rows that predict a key's tokens, 0
elsewhere (``train.distill`` gives those rows extra weight, and a cross-entropy on the true key:
the 135M teacher itself misses some of these lookups, and the student should not learn its misses).
"""
from __future__ import annotations

import random

import torch

from spikingbrain.errors import SpikingBrainError

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "grey", "brown", "silver", "golden"]
THINGS = ["locker", "safe", "door", "box", "gate", "cabinet", "trunk", "drawer", "vault", "chest"]
PEOPLE = ["Kate", "Robert", "Hannah", "Thomas", "Emily", "George", "Laura", "Arthur", "Sophie", "Walter",
          "Agnes", "Martin", "Lucy", "Frank", "Mabel", "Oscar", "Ruth", "Edwin", "Norah", "Simon"]
PERSONAL = ["ticket number", "room number", "phone extension", "account number", "seat number", "badge number"]
WORDS = ["lantern", "harbor", "violet", "granite", "meadow", "falcon", "copper", "willow", "saffron", "ember",
         "juniper", "quartz", "thistle", "marble", "cinder", "orchid"]

# (fact, question, answer lead-in): the answer is the lead-in followed by " <key>."
OBJECT_TEMPLATES = [
    ("The code of the {c} {t} is {k}.", "What is the code of the {c} {t}?", "The code of the {c} {t} is"),
    ("Remember that the {c} {t} opens with the number {k}.", "Which number opens the {c} {t}?",
     "The {c} {t} opens with the number"),
    ("Note: the combination for the {c} {t} is {k}.", "What is the combination for the {c} {t}?",
     "The combination for the {c} {t} is"),
]
PERSON_TEMPLATES = [
    ("{p}'s {f} is {k}.", "What is {p}'s {f}?", "{p}'s {f} is"),
    ("For the record, the {f} of {p} is {k}.", "What is the {f} of {p}?", "The {f} of {p} is"),
]
WORD_TEMPLATES = [
    ("The secret word for the {c} {t} is {k}.", "What is the secret word for the {c} {t}?",
     "The secret word for the {c} {t} is"),
]
# numbers named by a bare noun, always asked bare: the shape of a passkey question ("What is the
# X? The X is") that the templates above lack (students trained on them answered their own questions
# and still went on with prose after "The pass key is"); "pass key" itself stays out
NUMBERS = ["lucky number", "door code", "secret number", "access code", "magic number", "winning number",
           "serial number", "security code", "entry code", "reference number", "order number", "key code"]
NUMBER_TEMPLATES = [
    ("The {n} is {k}.", "What is the {n}?", "The {n} is"),
    ("Keep this in mind: the {n} is {k}.", "What is the {n}?", "The {n} is"),
    ("The {n} is {k}. Write it down.", "Do you know the {n}?", "The {n} is"),
]


def _key(rng: random.Random, word: bool) -> str:
    if word:
        return rng.choice(WORDS)
    return str(rng.randrange(10 ** (n := rng.randint(2, 6)) // 10, 10 ** n))


def _facts(rng: random.Random, n: int, numbers: float = 0.0) -> list[tuple[str, str, str, str, bool]]:
    """``n`` facts with distinct subjects and keys: ``(fact, question, lead-in, key, named
    number)``; a ``numbers`` share of them named numbers (``NUMBER_TEMPLATES``; ``numbers=0``
    draws nothing extra from ``rng``)."""
    out, subjects, keys = [], set(), set()
    while len(out) < n:
        named = numbers > 0 and rng.random() < numbers
        kind = rng.random()
        if named:
            fact, q, lead = rng.choice(NUMBER_TEMPLATES)
            fill = {"n": rng.choice(NUMBERS)}
            subject, word = ("n", fill["n"]), False
        elif kind < 0.45:
            fact, q, lead = rng.choice(OBJECT_TEMPLATES)
            fill = {"c": rng.choice(COLORS), "t": rng.choice(THINGS)}
            subject, word = ("o", fill["c"], fill["t"]), False
        elif kind < 0.85:
            fact, q, lead = rng.choice(PERSON_TEMPLATES)
            fill = {"p": rng.choice(PEOPLE), "f": rng.choice(PERSONAL)}
            subject, word = ("p", fill["p"], fill["f"]), False
        else:
            fact, q, lead = rng.choice(WORD_TEMPLATES)
            fill = {"c": rng.choice(COLORS), "t": rng.choice(THINGS)}
            subject, word = ("o", fill["c"], fill["t"]), True
        key = str(rng.randrange(1000, 10 ** 6)) if named else _key(rng, word)
        if subject in subjects or key in keys:
            continue
        subjects.add(subject)
        keys.add(key)
        out.append((fact.format(k=key, **fill), q.format(**fill), lead.format(**fill), key, named))
    return out


def retrieval_window(tokenizer, prose: torch.Tensor, T: int, seed: int,
                     plain: float = 0.0, numbers: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One window of ``T`` tokens: prose from a random offset of ``prose`` (token ids) with 2-4
    facts inserted in its first 80%, then a question/answer section asking every fact in a
    shuffled order. Returns ``(ids [T], answer [T])``; ``answer[t] = 1`` where the logits of row
    ``t`` predict a token of a key. A function of ``seed`` and ``plain`` alone.

    ``plain``: the probability that a question is asked bare, ``"<question> <lead-in> <key>."``,
    instead of after ``Question:`` / ``Answer:`` labels. Students trained on labelled questions
    only learnt to answer after ``Answer:`` and not a bare question (passkey, BENCHMARKS.md).
    ``plain=0`` draws nothing extra from the RNG: the windows are those made before it existed.

    ``numbers``: the probability that a fact is a named number (``NUMBER_TEMPLATES``: "The lucky
    number is 58213."), always asked bare; ``numbers=0`` keeps the windows made before it existed."""
    if not 0.0 <= plain <= 1.0 or not 0.0 <= numbers <= 1.0:
        raise SpikingBrainError(f"retrieval windows: plain and numbers must be in [0, 1], got {plain}, {numbers}")
    rng = random.Random(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    facts = _facts(rng, rng.randint(2, 4), numbers)
    qa, qa_answer = [], []
    order = list(range(len(facts)))
    rng.shuffle(order)
    for i in order:
        _, question, lead, key, named = facts[i]
        bare = named or (plain > 0 and rng.random() < plain)
        head = enc(f"\n\n{question} {lead}" if bare else f"\n\nQuestion: {question}\nAnswer: {lead}")
        key_ids, tail = enc(f" {key}"), enc(".")
        qa += head + key_ids + tail
        qa_answer += [0] * len(head) + [1] * len(key_ids) + [0] * len(tail)
    fact_ids = [enc(f" {f[0]} ") for f in facts]
    body = T - len(qa) - sum(len(f) for f in fact_ids)
    if body < 16:
        raise SpikingBrainError(f"retrieval windows need more than {T} tokens (the facts and questions take {T - body})")
    if prose.numel() < body + 1:
        raise SpikingBrainError(f"need at least {body + 1} tokens of prose for a retrieval window, got {prose.numel()}")
    start = rng.randrange(prose.numel() - body)
    text = prose[start:start + body].tolist()
    spots = sorted(rng.randrange(0, max(1, int(0.8 * body))) for _ in facts)
    ids: list[int] = []
    prev = 0
    for spot, f in zip(spots, fact_ids):
        ids += text[prev:spot] + f
        prev = spot
    ids += text[prev:] + qa
    answer = [0] * (T - len(qa)) + qa_answer
    rows = torch.tensor(answer[1:] + [0], dtype=torch.float32)  # row t predicts token t + 1
    return torch.tensor(ids, dtype=torch.long), rows
