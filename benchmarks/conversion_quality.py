"""Quality of a converted default teacher against the teacher itself, measured in one run.

- held-out text (the shipped valid split) at a 2k context: top-1 agreement, KL(teacher || model)
  in nats/token, perplexity of both and their ratio;
- chat (the shipped held-out instructions): fidelity = teacher-forced top-1 agreement on the
  teacher's own greedy answers, and empty answers among the model's and the teacher's own
  greedy answers;
- passkey retrieval at 1k / 2k / 4k tokens, 3 depths x 3 seeds, model and teacher;
- key recall on retrieval windows (``convert/retrieval_data.py``, the kind the late conversion
  stages train on, here cut from the held-out prose): the share of keys whose every token is the
  greedy next token (teacher-forced), model and teacher. In-distribution, unlike the passkey.

The model: the shipped delta (default), ``--delta FILE``, or ``--model DIR`` (e.g. the output of
``spikingbrain demo --from-scratch``). Writes JSON (command, hardware, date, figures, the
issue's targets and whether each is met).

    python3 benchmarks/conversion_quality.py [--delta FILE | --model DIR] [--tokens 16384]
        [--lengths 1024,2048,4096] [--out benchmarks/results/conversion_quality.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

TARGETS = {"top1": 0.80, "kl": 0.15, "ppl_ratio": 1.15, "chat_fidelity": 0.80, "empty": 0}


def key_recall(model, tok, windows) -> dict:
    """Keys recalled in retrieval windows ``[(ids, answer rows)]``: every token of the key is the
    model's greedy next token (``all``), or at least its first one (``first``)."""
    first = every = n = 0
    for ids, answer in windows:
        with torch.no_grad():
            pred = model(input_ids=ids[None]).logits[0].argmax(-1)
        hit = (pred[:-1] == ids[1:]).tolist()
        rows = (answer[:-1] > 0).nonzero().flatten().tolist()
        runs = []
        for r in rows:  # consecutive answer rows: one key
            if runs and r == runs[-1][-1] + 1:
                runs[-1].append(r)
            else:
                runs.append([r])
        n += len(runs)
        first += sum(hit[run[0]] for run in runs)
        every += sum(all(hit[r] for r in run) for run in runs)
    return {"keys": n, "first": first / max(1, n), "all": every / max(1, n)}


def load_student(args, teacher, tok):
    from spikingbrain.convert.delta import convert_with_delta, shipped_delta_path

    if args.model:
        from spikingbrain.serve.loading import load_model

        model, _, path = load_model(args.model, progress=False)
        return model, {"model_dir": str(path)}
    path = Path(args.delta) if args.delta else shipped_delta_path()
    student, meta = convert_with_delta(teacher, path, tok, sliding_window=args.sliding_window)
    return student, {"delta": str(path), "delta_bytes": path.stat().st_size,
                     **{k: meta.get(k) for k in ("command", "provenance", "teacher_fingerprint", "stages")}}


def passkey_summary(rows: list[dict]) -> dict:
    out = {}
    for n in sorted({r["length"] for r in rows}):
        hits = [r["correct"] for r in rows if r["length"] == n]
        out[str(n)] = {"correct": sum(hits), "trials": len(hits)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--delta", default=None)
    src.add_argument("--model", default=None)
    p.add_argument("--sliding-window", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--chat", type=int, default=25, help="held-out instructions")
    p.add_argument("--chat-tokens", type=int, default=24, help="greedy tokens per answer for the empty count")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--retrieval", type=int, default=12, help="held-out retrieval windows (0: skip)")
    p.add_argument("--retrieval-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher-cache", default=None, metavar="FILE",
                   help="reuse the teacher's passkey rows and empty-answer count from FILE when it was made with the "
                        "same settings (else compute them and write FILE); the --teacher-only run makes it")
    p.add_argument("--teacher-only", action="store_true", help="only the teacher's part (writes --teacher-cache)")
    p.add_argument("--out", default="benchmarks/results/conversion_quality.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from spikingbrain.convert.chat_data import load_chat
    from spikingbrain.convert.teacher import load_teacher
    from spikingbrain.evaluation.agreement import teacher_agreement
    from spikingbrain.evaluation.bench import run_info
    from spikingbrain.evaluation.chat_fidelity import chat_fidelity
    from spikingbrain.evaluation.passkey import passkey_sweep
    from spikingbrain.evaluation.texts import shipped_texts

    info = run_info("conversion_quality", "conversion_quality.py", argv, threads=args.threads)
    t0 = time.time()
    teacher, tok = load_teacher()
    teacher.eval()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    depths = [float(x) for x in args.depths.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    examples = load_chat("valid")[:args.chat]
    key = {"lengths": lengths, "depths": depths, "seeds": seeds, "chat": args.chat, "chat_tokens": args.chat_tokens}
    cache = Path(args.teacher_cache) if args.teacher_cache else None
    tc = json.loads(cache.read_text()) if cache is not None and cache.is_file() else None
    if tc is None or tc.get("key") != key:
        from spikingbrain.demo import chat_answers

        t = time.time()
        with torch.no_grad():
            answers = chat_answers(teacher, tok, [ex["messages"][0]["content"] for ex in examples], args.chat_tokens)
            rows_t = passkey_sweep(teacher, tok, lengths, depths, seeds) if lengths else []
        tc = {**info, "key": key, "teacher_empty": sum(1 for a in answers if not a.strip()), "rows_teacher": rows_t,
              "seconds": round(time.time() - t, 1)}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(tc, indent=1) + "\n", encoding="utf-8")
    if args.teacher_only:
        print(f"teacher: passkey {passkey_summary(tc['rows_teacher'])}, empty answers {tc['teacher_empty']}")
        return 0
    student, source = load_student(args, teacher, tok)
    student.eval()
    res = {**info, "model": source}
    with torch.inference_mode():
        t = time.time()
        q = teacher_agreement(student, teacher, tok, shipped_texts("valid"), context_length=args.context,
                              max_tokens=args.tokens)
        q["ppl_ratio"] = q["model_ppl"] / q["teacher_ppl"]
        q["seconds"] = round(time.time() - t, 1)
        res["heldout"] = q
        print("held-out:", json.dumps(q), flush=True)
    with torch.no_grad():
        t = time.time()
        c = chat_fidelity(student, teacher, tok, examples, args.chat_tokens, keep_answers=len(examples))
        c["teacher_empty"] = tc["teacher_empty"]
        c["seconds"] = round(time.time() - t, 1)
        res["chat"] = c
        print("chat:", json.dumps({k: v for k, v in c.items() if k != "answers"}), flush=True)
        t = time.time()
        rows_m = passkey_sweep(student, tok, lengths, depths, seeds) if lengths else []
        rows_t = tc["rows_teacher"]
        res["passkey"] = {"model": passkey_summary(rows_m), "teacher": passkey_summary(rows_t),
                          "rows_model": rows_m, "rows_teacher": rows_t, "seconds": round(time.time() - t, 1),
                          "teacher_measured": {k: tc[k] for k in ("date", "command", "seconds")}}
        print("passkey:", json.dumps({k: res["passkey"][k] for k in ("model", "teacher")}), flush=True)
        if args.retrieval:
            from spikingbrain.convert.retrieval_data import retrieval_window
            from spikingbrain.demo import shipped_ids

            t = time.time()
            valid = shipped_ids(tok, "valid")
            wins = [retrieval_window(tok, valid, args.retrieval_len, 10**6 + i) for i in range(args.retrieval)]
            res["retrieval"] = {"windows": args.retrieval, "tokens": args.retrieval_len,
                                "model": key_recall(student, tok, wins), "teacher": key_recall(teacher, tok, wins)}
            res["retrieval"]["seconds"] = round(time.time() - t, 1)
            print("retrieval:", json.dumps(res["retrieval"]), flush=True)
    pk_ok = all(res["passkey"]["model"][n]["correct"] >= res["passkey"]["teacher"][n]["correct"]
                for n in res["passkey"]["model"])
    res["targets"] = {
        "required": TARGETS,
        "met": {"top1": q["top1"] >= TARGETS["top1"], "kl": q["kl"] <= TARGETS["kl"],
                "ppl_ratio": q["ppl_ratio"] <= TARGETS["ppl_ratio"],
                "chat_fidelity": c["fidelity"] >= TARGETS["chat_fidelity"], "empty": c["empty"] == 0,
                "passkey_at_least_teacher": pk_ok},
    }
    res["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {out} ({res['seconds']:.0f} s); targets met: {res['targets']['met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
