"""`spikingbrain serve` under load and under attack, on loopback, for a fixed time.

One run measures, against one server process:
1. idle: short chat requests one after another (nothing else running): time to first token (TTFT);
2. load, for ``--duration`` seconds: ``--clients`` clients sending short streaming chat requests
   back to back (the figure of merit: their TTFT), one client sending medium prompts
   (``--medium-tokens``), one abandoning requests (streams closed after two chunks, non-streaming
   requests whose client times out), one sending hostile bodies (JSON nested 5000 deep, NaN,
   lone surrogates, ``text/plain``, a foreign ``Host``, temperature 1e-300), and one
   ``--long-tokens``-token prompt arriving every ``--long-every`` seconds.

Recorded: p50/p99 TTFT of the short requests idle and under load and their ratio (same run),
generated tokens/s under load (innocent requests), failures per kind (an innocent request that
does not get a complete answer is a failure; hostile ones must get their 4xx), and the server's
RSS (start, peak). TTFT is measured by the client: request sent -> first content chunk.
Target (issue 16): p99 under load <= 3x idle, zero failed innocent requests.

The model: ``--model DIR``, or by default the embedded teacher (SmolLM2-135M-Instruct) converted
with ``spikingbrain convert --teacher default`` into a temporary directory (random-free, cheap on
2 cores, max_position_embeddings 8192, so an 8k prompt fits).

Usage (a few minutes; record under /work/bin/quiet):
    PYTHONPATH=src python3 benchmarks/serve_load.py [--model DIR] [--duration 120] \\
        [--out benchmarks/results/serve_load.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from spikingbrain.evaluation.bench import cpu_name
from spikingbrain.parallel.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Name a river.", "What is two plus two?", "Say hello.", "Give me a colour.", "Name a tree.",
             "What day follows Monday?", "Name a planet.", "Say a short word."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: convert the embedded teacher)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=4, help="concurrent short-request clients")
    p.add_argument("--short-max-tokens", type=int, default=16)
    p.add_argument("--medium-tokens", type=int, default=512)
    p.add_argument("--long-tokens", type=int, default=8000)
    p.add_argument("--long-every", type=float, default=30.0)
    p.add_argument("--idle-requests", type=int, default=20)
    p.add_argument("--int8", action="store_true", help="serve with --int8")
    p.add_argument("--serve-args", default="", help="extra `spikingbrain serve` flags (quoted)")
    p.add_argument("--server-log", default=None, help="keep the server's log here")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


class Client:
    """Raw http.client requests to the loopback server (one connection per request)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def conn(self, timeout=600):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def stream_chat(self, messages, max_tokens, abandon_after=None):
        """-> (ttft_s or None, completion tokens, ok, detail)."""
        body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
        c = self.conn()
        t0 = time.perf_counter()
        try:
            c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                return None, 0, False, f"status {r.status}: {r.read()[:200]!r}"
            ttft, tokens, done, chunks = None, 0, False, 0
            for raw in r:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev:
                    return ttft, tokens, False, f"error event: {ev['error']['message']}"
                chunks += 1
                for ch in ev.get("choices", []):  # first text, or the end of an empty answer
                    if (ch.get("delta", {}).get("content") or ch.get("finish_reason")) and ttft is None:
                        ttft = time.perf_counter() - t0
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                if abandon_after is not None and chunks >= abandon_after:
                    return ttft, 0, True, "abandoned"
            return ttft, tokens, done, "" if done else "stream ended without [DONE]"
        except (OSError, http.client.HTTPException, ValueError) as e:
            return None, 0, False, f"{type(e).__name__}: {e}"
        finally:
            c.close()

    def completion_ids(self, ids, max_tokens):
        body = json.dumps({"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
        c = self.conn()
        t0 = time.perf_counter()
        try:
            c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                return None, 0, False, f"status {r.status}: {r.read()[:200]!r}"
            ttft, tokens, done = None, 0, False
            for raw in r:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line[6:] == b"[DONE]":
                    done = True
                    break
                ev = json.loads(line[6:])
                if "error" in ev:
                    return ttft, tokens, False, f"error event: {ev['error']['message']}"
                if ttft is None and any(ch.get("text") or ch.get("finish_reason") for ch in ev.get("choices", [])):
                    ttft = time.perf_counter() - t0
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
            return ttft, tokens, done, ""
        except (OSError, http.client.HTTPException, ValueError) as e:
            return None, 0, False, f"{type(e).__name__}: {e}"
        finally:
            c.close()

    def raw(self, method, path, body: bytes, headers: dict, timeout=60):
        c = self.conn(timeout)
        try:
            c.request(method, path, body, headers)
            r = c.getresponse()
            r.read()
            return r.status
        except (OSError, http.client.HTTPException) as e:
            return f"{type(e).__name__}"
        finally:
            c.close()


HOSTILE = [
    ("deep-json", b"[" * 5000 + b"]" * 5000, {"Content-Type": "application/json"}, 400),
    ("nan", b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}', {"Content-Type": "application/json"}, 400),
    ("surrogate", b'{"messages":[{"role":"user","content":"\\ud800"}]}', {"Content-Type": "application/json"}, 400),
    ("huge-seed", b'{"messages":[{"role":"user","content":"hi"}],"seed":1180591620717411303424}',
     {"Content-Type": "application/json"}, 400),
    ("text-plain", b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}', {"Content-Type": "text/plain"}, 415),
    ("foreign-host", b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}',
     {"Content-Type": "application/json", "Host": "evil.example"}, 400),
    ("tools", b'{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f"}}]}',
     {"Content-Type": "application/json"}, 400),
    ("tiny-temperature", b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"temperature":1e-300}',
     {"Content-Type": "application/json"}, 200),
]


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def prepare_model(args, tmp: Path) -> tuple[Path, str]:
    if args.model:
        return Path(args.model), f"given: {args.model}"
    out = tmp / "model"
    subprocess.run([sys.executable, "-m", "spikingbrain.cli", "convert", "--teacher", "default", "--out", str(out)],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return out, "embedded SmolLM2-135M-Instruct converted by `spikingbrain convert --teacher default` (layout 7b)"


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model, model_desc = prepare_model(args, tmp)
        import spikingbrain  # noqa: F401  (registers the model type with the Auto classes)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        text = (ROOT / "src/spikingbrain/data/valid.jsonl").read_text("utf-8")
        corpus = tok(" ".join(json.loads(x)["text"] for x in text.splitlines() if x.strip()),
                     add_special_tokens=False)["input_ids"]
        while len(corpus) < args.long_tokens + 100:
            corpus = corpus + corpus

        port = free_port()
        cmd = [sys.executable, "-m", "spikingbrain.cli", "serve", str(model), "--port", str(port), "--log-level", "warning"]
        cmd += (["--int8"] if args.int8 else []) + args.serve_args.split()
        log = Path(args.server_log) if args.server_log else tmp / "server.log"
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                                stdout=log.open("w"), stderr=subprocess.STDOUT)
        client = Client(port)
        try:
            deadline = time.time() + 600
            while client.raw("GET", "/health", b"", {}, timeout=2) != 200:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            rss_start = rss_kib(proc.pid)
            for q in QUESTIONS[:2]:  # warm-up, untimed
                client.stream_chat([{"role": "user", "content": q}], args.short_max_tokens)

            idle = []
            for i in range(args.idle_requests):
                ttft, _, ok, detail = client.stream_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                                         args.short_max_tokens)
                if not ok or ttft is None:
                    raise SystemExit(f"idle request failed: {detail}")
                idle.append(ttft)

            stop = threading.Event()
            lock = threading.Lock()
            rec = {"short_ttft": [], "short_ok": 0, "short_fail": [], "medium_ok": 0, "medium_fail": [],
                   "long": [], "long_fail": [], "tokens": 0, "abandoned": 0, "abandon_other": [],
                   "hostile": {name: [] for name, *_ in HOSTILE}, "rss_peak": rss_start}

            def short_client(k):
                i = k
                while not stop.is_set():
                    q = QUESTIONS[i % len(QUESTIONS)] + " " * (i % 3)
                    i += args.clients
                    ttft, n, ok, detail = client.stream_chat([{"role": "user", "content": q}], args.short_max_tokens)
                    with lock:
                        if ok and ttft is not None:
                            rec["short_ok"] += 1
                            rec["short_ttft"].append(ttft)
                            rec["tokens"] += n
                        else:
                            rec["short_fail"].append(detail)

            def medium_client():
                while not stop.is_set():
                    start = rng.randrange(0, len(corpus) - args.medium_tokens)
                    _, n, ok, detail = client.completion_ids(corpus[start:start + args.medium_tokens], 32)
                    with lock:
                        if ok:
                            rec["medium_ok"] += 1
                            rec["tokens"] += n
                        else:
                            rec["medium_fail"].append(detail)

            def abandoner():
                while not stop.is_set():
                    _, _, ok, detail = client.stream_chat([{"role": "user", "content": "Tell me a long story."}], 500,
                                                          abandon_after=2)
                    c = client.conn(timeout=0.5)
                    try:
                        c.request("POST", "/v1/chat/completions",
                                  json.dumps({"messages": [{"role": "user", "content": "Talk."}], "max_tokens": 500}),
                                  {"Content-Type": "application/json"})
                        c.getresponse().read()
                        gone = False
                    except (socket.timeout, TimeoutError):
                        gone = True
                    except (OSError, http.client.HTTPException):
                        gone = True
                    finally:
                        c.close()
                    with lock:
                        rec["abandoned"] += int(ok) + int(gone)
                        if not ok:
                            rec["abandon_other"].append(detail)
                    stop.wait(0.5)

            def attacker():
                while not stop.is_set():
                    for name, body, headers, want in HOSTILE:
                        got = client.raw("POST", "/v1/chat/completions", body, headers)
                        with lock:
                            rec["hostile"][name].append(got == want)
                    stop.wait(1.0)

            def long_sender():
                t_next = time.time()
                threads = []
                while not stop.is_set():
                    if time.time() >= t_next:
                        start = rng.randrange(0, len(corpus) - args.long_tokens)

                        def one(ids=corpus[start:start + args.long_tokens]):
                            ttft, n, ok, detail = client.completion_ids(ids, 8)
                            with lock:
                                if ok:
                                    rec["long"].append(ttft)
                                    rec["tokens"] += n
                                else:
                                    rec["long_fail"].append(detail)

                        th = threading.Thread(target=one)
                        th.start()
                        threads.append(th)
                        t_next += args.long_every
                    stop.wait(0.2)
                for th in threads:
                    th.join(600)

            def rss_sampler():
                while not stop.is_set():
                    with lock:
                        rec["rss_peak"] = max(rec["rss_peak"], rss_kib(proc.pid))
                    stop.wait(1.0)

            workers = [threading.Thread(target=short_client, args=(k,)) for k in range(args.clients)]
            workers += [threading.Thread(target=f) for f in (medium_client, abandoner, attacker, long_sender, rss_sampler)]
            t0 = time.time()
            for w in workers:
                w.start()
            stop.wait(args.duration)
            stop.set()
            for w in workers:
                w.join(900)
            elapsed = time.time() - t0
            rss_end = rss_kib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    load = rec["short_ttft"]
    innocent_failed = len(rec["short_fail"]) + len(rec["medium_fail"]) + len(rec["long_fail"])
    result = {
        "benchmark": "serve_load",
        "command": shlex.join([Path(sys.executable).name] + sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": f"{os.cpu_count()} CPU cores ({cpu_name()}, {platform.machine()}), Python {platform.python_version()}",
        "torch": _torch_version(),
        "model": model_desc,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "server_log")},
        "metric": "TTFT = client send -> first content chunk (or the finish of an empty answer) of a streaming chat "
                  "request (short prompt, greedy)",
        "idle": {"n": len(idle), "p50_ttft_s": pct(idle, 50), "p99_ttft_s": pct(idle, 99)},
        "under_load": {"n": len(load), "p50_ttft_s": pct(load, 50), "p99_ttft_s": pct(load, 99),
                       "max_ttft_s": max(load) if load else None},
        "rows": [
            {"phase": "idle (one request at a time)", "short_requests": len(idle), "p50_ttft_s": pct(idle, 50),
             "p99_ttft_s": pct(idle, 99), "innocent_failed": 0},
            {"phase": "under load", "short_requests": len(load), "p50_ttft_s": pct(load, 50), "p99_ttft_s": pct(load, 99),
             "innocent_failed": innocent_failed},
        ],
        "ratio_p99_load_over_idle": (pct(load, 99) / pct(idle, 99)) if load and idle else None,
        "ratio_p50_load_over_idle": (pct(load, 50) / pct(idle, 50)) if load and idle else None,
        "load_seconds": round(elapsed, 1),
        "generated_tokens_per_second": rec["tokens"] / elapsed,
        "innocent": {"short_ok": rec["short_ok"], "medium_ok": rec["medium_ok"], "long_ok": len(rec["long"]),
                     "failed": innocent_failed,
                     "failures": (rec["short_fail"] + rec["medium_fail"] + rec["long_fail"])[:20]},
        "long_prompt_ttft_s": rec["long"],
        "abandoned_requests": rec["abandoned"],
        "hostile": {name: {"sent": len(v), "answered_as_expected": sum(v)} for name, v in rec["hostile"].items()},
        "rss_mib": {"start": rss_start / 1024, "peak": rec["rss_peak"] / 1024, "end": rss_end / 1024},
        "target": {"p99_ratio_max": 3.0, "innocent_failed": 0},
    }
    result["target"]["met"] = bool(result["ratio_p99_load_over_idle"] is not None
                                   and result["ratio_p99_load_over_idle"] <= 3.0 and innocent_failed == 0)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    raise SystemExit(main())
