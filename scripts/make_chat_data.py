"""Make the shipped chat data: instructions answered greedily by the default teacher itself.

The conversion never saw the chat template, so the converted model learnt to end its turn right
after ``<|im_start|>assistant\\n``. This script writes the data that fixes it at the root:
instructions (hand-written below, plus topic x task combinations generated here; nothing copied
from elsewhere) answered by SmolLM2-135M-Instruct greedily, so the student learns the teacher's
own chat behaviour. Held-out instructions use topics and phrasings that never occur in train.

    python3 scripts/make_chat_data.py [--train 550] [--valid 25] [--max-new-tokens 96] [--batch 32]

Writes ``src/spikingbrain/data/chat_{train,valid}.jsonl`` (``{"id", "messages", "finished"}``),
appending: a killed run continues where it stopped, and a larger ``--train`` adds instructions
after the shipped ones (recipes pin how many they use: ``ConversionRecipe.chat_examples`` and
``Stage.chat_examples``). The shipped files are this command's defaults: 550 + 25 (the first 64
training answers were made first; the other 486 were appended later by the same command; the
teacher answers ~120 instructions a minute in batches of 32 on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HAND_TRAIN = [
    "What is the capital of France?", "Give me three tips for staying healthy.", "Write one sentence about the sea.",
    "How many days are there in a leap year?", "What is the boiling point of water in Celsius?",
    "Name three primary colors.", "Translate 'good morning' into French.", "What is 12 times 7?",
    "Write a haiku about autumn leaves.", "Explain what a noun is.", "Who wrote Romeo and Juliet?",
    "Give me a synonym for 'happy'.", "What does a thermometer measure?", "List the days of the week.",
    "How do I make a cup of tea?", "Why is the sky blue?", "What is the largest planet in our solar system?",
    "Suggest a name for a pet cat.", "Write a short thank-you note to a teacher.", "What is 100 divided by 4?",
    "Give me an example of a mammal that lives in the ocean.", "What is the opposite of 'cold'?",
    "Describe a rainbow in two sentences.", "How many legs does a spider have?", "What is the chemical symbol for gold?",
    "Tell me a fun fact about elephants.", "Write a two-line poem about the moon.", "What is the plural of 'mouse'?",
    "How can I improve my handwriting?", "Summarize the story of Cinderella in three sentences.",
    "What are the three states of matter?", "Give me a tip for saving money.", "What is the square root of 81?",
    "Write an opening line for a mystery story.", "What is photosynthesis?", "Name a famous painting.",
    "How do bees make honey?", "What should I pack for a beach trip?", "Explain gravity to a child.",
    "What is the freezing point of water in Fahrenheit?", "Give me three words that rhyme with 'cat'.",
    "What language is spoken in Brazil?", "Write a motivational quote.", "How do I tie a shoelace?",
    "What is the difference between weather and climate?", "Recommend a good habit to start the day.",
    "What is an adjective? Give an example.", "How long does it take the Earth to orbit the Sun?",
    "Write a short dialogue between a cat and a dog.", "What is the main ingredient of guacamole?",
]
HAND_VALID = [
    "What is the capital of Japan?", "Give me two tips for sleeping better.", "Write one sentence about the forest.",
    "How many minutes are there in an hour?", "Name three fruits that are red.", "What is 9 plus 16?",
    "Write a haiku about snow.", "Who painted the Mona Lisa?", "Why do we have seasons?",
    "Give me a synonym for 'big'.",
]
TOPICS_TRAIN = [
    "the ocean", "volcanoes", "honeybees", "the water cycle", "friendship", "the moon", "rainforests", "bicycles",
    "chess", "the human heart", "electricity", "coffee", "the Roman Empire", "penguins", "recycling", "music",
    "gardening", "the internet", "dinosaurs", "clouds", "libraries", "the Sahara desert", "trains", "vitamins",
    "kindness", "mountains", "the alphabet", "bread", "owls", "the solar system", "exercise", "maps", "rivers",
    "honesty", "computers", "the printing press", "whales", "winter", "time management", "birds",
    "earthquakes", "tea", "the Great Wall of China", "sleep", "photography", "bridges", "cooking pasta",
    "the brain", "lightning", "reading books",
]
TOPICS_VALID = ["deserts", "butterflies", "the telephone", "rain", "glaciers", "ancient Egypt", "jazz", "soap",
                "the stars", "apples", "teamwork", "wind energy", "sharks", "candles", "the calendar"]
TASKS_TRAIN = [
    "What is {t}?", "Tell me an interesting fact about {t}.", "Explain {t} in simple terms.",
    "Write a short poem about {t}.", "Give me three facts about {t}.", "Why is {t} important?",
    "Write one sentence about {t}.", "Describe {t} to a ten-year-old.", "What are the benefits of {t}?",
    "Write a short story opening about {t}.",
]
TASKS_VALID = ["Tell me something surprising about {t}.", "In two sentences, what should everyone know about {t}?",
               "Write a four-line rhyme about {t}."]


def instructions(n_train: int, n_valid: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic instruction lists; train and valid share no instruction, no generated topic
    and no generated phrasing."""
    rng = random.Random(seed)
    combos = [task.format(t=t) for t in TOPICS_TRAIN for task in TASKS_TRAIN]
    rng.shuffle(combos)
    train = (HAND_TRAIN + combos)[:n_train]
    vcombos = [task.format(t=t) for t in TOPICS_VALID for task in TASKS_VALID]
    rng.shuffle(vcombos)
    valid = (HAND_VALID + vcombos)[:n_valid]
    assert not set(train) & set(valid)
    return train, valid


def _done_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def answer_all(teacher, tok, items: list[tuple[str, str]], path: Path, max_new_tokens: int, batch: int) -> None:
    """Greedy teacher answers for ``items`` (id, instruction) not yet in ``path``, appended a
    batch at a time (each line complete: a killed run leaves whole lines)."""
    import torch

    done = _done_ids(path)
    todo = [it for it in items if it[0] not in done]
    tok.padding_side = "left"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for b in range(0, len(todo), batch):
        chunk = todo[b:b + batch]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for _, q in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.time()
        with torch.no_grad():
            out = teacher.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                   eos_token_id=end)
        lines = []
        for (qid, q), row in zip(chunk, out[:, enc.input_ids.shape[1]:].tolist()):
            finished = end in row
            row = row[:row.index(end)] if finished else row
            answer = tok.decode(row, skip_special_tokens=True).strip()
            lines.append(json.dumps({"id": qid, "messages": [{"role": "user", "content": q},
                                                              {"role": "assistant", "content": answer}],
                                     "finished": finished}, ensure_ascii=False))
        with path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{path.name}: {len(done) + b + len(chunk)}/{len(items)} ({time.time() - t0:.0f} s/batch)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=550)
    p.add_argument("--valid", type=int, default=25)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parents[1] / "src" / "spikingbrain" / "data"))
    args = p.parse_args(argv)

    import torch

    from spikingbrain.convert.teacher import load_teacher

    torch.manual_seed(0)
    train, valid = instructions(args.train, args.valid)
    teacher, tok = load_teacher()
    out = Path(args.out_dir)
    answer_all(teacher, tok, [(f"valid-{i:04d}", q) for i, q in enumerate(valid)], out / "chat_valid.jsonl",
               args.max_new_tokens, args.batch)
    answer_all(teacher, tok, [(f"train-{i:04d}", q) for i, q in enumerate(train)], out / "chat_train.jsonl",
               args.max_new_tokens, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
