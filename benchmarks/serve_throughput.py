"""Serving throughput: `spikingbrain serve` against vLLM (with the spikingbrain-vllm plugin) on
the same model and machine, in one run.

Metric: generated tokens per second over the whole load (sum of the completions' token counts /
wall time from the first request sent to the last answer received) at 1, 4 and 16 concurrent
clients. Each client sends its requests one after another to ``/v1/completions``: greedy, the
same prompts (the starts of the shipped held-out texts, ``--prompt-tokens`` tokens as ids) and
``--max-tokens`` for both servers, so both generate the same continuations. Each server gets one
untimed warm-up request; both run with the same threads (``--threads``).

Servers: ``spikingbrain serve`` (this package, fp32, and with ``--int8`` its int8 fast path) and
vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``, run with the Python of
the plugin's own environment, ``--vllm-python``), fp32, prefix caching off (the plugin's rule).

Usage (a few minutes on 2 cores; record it under /work/bin/quiet or on a quiet machine):
    PYTHONPATH=src python3 benchmarks/serve_throughput.py --model DIR \
        --vllm-python ~/.cache/spikingbrain/vllm-venv/bin/python [--concurrency 1,4,16] \
        [--int8] [--out benchmarks/results/serve_throughput_cpu.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a SpikingBrain model directory (both servers load it)")
    p.add_argument("--vllm-python", default=str(Path.home() / ".cache/spikingbrain/vllm-venv/bin/python"),
                   help="python of the plugin's environment (plugins/vllm/ci.sh creates it)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--int8", action="store_true", help="also run `spikingbrain serve --int8`")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_up(base: str, proc: subprocess.Popen, log: Path, timeout: float) -> float:
    start = time.time()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=2):
                return time.time() - start
        except OSError:
            if time.time() - start > timeout:
                proc.kill()
                raise SystemExit(f"server not up after {timeout} s; log {log}")
            time.sleep(1)


def prompts(tokenizer_dir: str, n: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    import spikingbrain  # noqa: F401  (registers the config type the tokenizer loader reads)

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [json.loads(line)["text"] for line in (ROOT / "src/spikingbrain/data/valid.jsonl").read_text().splitlines()]
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise SystemExit(f"not enough held-out texts with {length} tokens")


def run_load(base: str, model_name: str, work: list[list[int]], clients: int, max_tokens: int) -> dict:
    """``clients`` threads; each takes the next prompt from the shared list until none is left."""
    lock = threading.Lock()
    queue = list(work)
    tokens = []
    errors = []

    def client():
        while True:
            with lock:
                if not queue:
                    return
                ids = queue.pop(0)
            try:
                r = post(base + "/v1/completions", {"model": model_name, "prompt": ids, "max_tokens": max_tokens,
                                                    "temperature": 0.0})
                with lock:
                    tokens.append(r["usage"]["completion_tokens"])
            except Exception as e:  # counted and reported, never silently dropped
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    return {"requests": len(work), "completion_tokens": sum(tokens), "seconds": round(seconds, 3),
            "tokens_per_s": round(sum(tokens) / seconds, 2)}


def main(argv=None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    n = max(levels) * args.requests_per_client
    work = prompts(args.model, n, args.prompt_tokens)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    servers = [("spikingbrain serve fp32", [sys.executable, "-m", "spikingbrain.cli", "serve", args.model,
                                            "--max-batch", str(max(levels))])]
    if args.int8:
        servers.append(("spikingbrain serve int8", servers[0][1] + ["--int8"]))
    servers.append(("vLLM fp32", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
                                  "--dtype", "float32", "--max-num-seqs", str(max(levels)), "--max-model-len",
                                  str(args.prompt_tokens + args.max_tokens + 64), "--kv-cache-memory-bytes",
                                  str(2 * 2**30), "--no-enable-prefix-caching", "--disable-log-stats"]))
    from spikingbrain.parallel.launch import free_port

    rows = []
    for name, cmd in servers:
        port = free_port()
        log = Path(tempfile.mkstemp(prefix="serve-bench-", suffix=".log")[1])
        with log.open("w") as fh:
            proc = subprocess.Popen(cmd + ["--host", "127.0.0.1", "--port", str(port)], stdout=fh,
                                    stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            startup = wait_up(base, proc, log, args.startup_timeout)
            with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
                model_name = json.loads(r.read())["data"][0]["id"]
            run_load(base, model_name, work[:1], 1, args.max_tokens)  # warm-up, untimed
            for c in levels:
                r = run_load(base, model_name, work[: c * args.requests_per_client], c, args.max_tokens)
                rows.append({"server": name, "concurrency": c, **r, "startup_s": round(startup, 1)})
                print(f"{name:>24}  concurrency {c:>2}: {r['tokens_per_s']:8.2f} tok/s "
                      f"({r['completion_tokens']} tokens, {r['requests']} requests, {r['seconds']:.1f} s)", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    ratios = []
    for c in levels:
        by = {r["server"]: r["tokens_per_s"] for r in rows if r["concurrency"] == c}
        for ours in [s for s in by if s.startswith("spikingbrain")]:
            ratios.append({"concurrency": c, "ratio": f"vLLM fp32 / {ours}", "value": round(by["vLLM fp32"] / by[ours], 3)})
    for r in ratios:
        print(f"concurrency {r['concurrency']:>2}: {r['ratio']} = {r['value']:.2f}x")
    vllm_version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"],
                                  capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1:]
    import torch

    from spikingbrain.evaluation.bench import cpu_name

    result = {
        "benchmark": "serve_throughput", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, {args.threads} threads",
        "torch": torch.__version__, "vllm": vllm_version[0] if vllm_version else "unknown",
        "command": "python3 benchmarks/serve_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client, "rows": rows, "ratios": ratios,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
