"""Server metrics in the Prometheus text format (version 0.0.4), without a client library.

Definitions:
- ``spikingbrain_requests_total{endpoint,status}``: HTTP requests answered, by HTTP status.
- ``spikingbrain_prompt_tokens_total`` / ``spikingbrain_completion_tokens_total``: tokens of
  finished generations (completion tokens exclude the end-of-sequence token).
- ``spikingbrain_request_latency_seconds``: histogram, submit -> last token, finished generations.
- ``spikingbrain_time_to_first_token_seconds``: histogram, submit -> first generated token.
- ``spikingbrain_decode_steps_total`` and ``spikingbrain_decode_batch_size`` (histogram of
  sequences per batched decode step).
- ``spikingbrain_decode_state_bytes``: gauge, bytes of decode state held by the engine now
  (batch + prompts being prefilled); constant per sequence for GLA/SWA models.
- ``spikingbrain_requests_running`` / ``_waiting``: gauges read from the engine.
- ``spikingbrain_generations_cancelled_total``: client went away or asked to stop.
"""
from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _Histogram:
    def __init__(self, buckets) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.total += 1
        self.sum += x
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.total}"]
        return out


class Metrics:
    """Thread-safe counters updated by the server (HTTP side) and the engine thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.counters: dict[str, float] = defaultdict(float)
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.ttft = _Histogram(LATENCY_BUCKETS)
        self.batch = _Histogram(BATCH_BUCKETS)
        self.state_bytes = 0

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, int(status))] += 1

    def count(self, name: str, n: float = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def observe_request(self, info: dict) -> None:
        with self._lock:
            self.counters["prompt_tokens"] += info["prompt_tokens"]
            self.counters["completion_tokens"] += info["completion_tokens"]
            self.latency.observe(info["latency_s"])
            self.ttft.observe(info["ttft_s"])

    def observe_step(self, batch_size: int) -> None:
        with self._lock:
            self.counters["decode_steps"] += 1
            self.batch.observe(batch_size)

    def set_state_bytes(self, n: int) -> None:
        self.state_bytes = int(n)

    def render(self, engine_snapshot: dict | None = None) -> str:
        p = "spikingbrain_"
        with self._lock:
            lines = [f"# HELP {p}requests_total HTTP requests answered.", f"# TYPE {p}requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'{p}requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            for key, help_ in (("prompt_tokens", "Prompt tokens of finished generations."),
                               ("completion_tokens", "Generated tokens of finished generations."),
                               ("decode_steps", "Batched decode steps run."),
                               ("cancelled", "Generations cancelled (client disconnected).")):
                name = f"{p}generations_cancelled_total" if key == "cancelled" else f"{p}{key}_total"
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {int(self.counters[key])}"]
            for hist, name, help_ in ((self.latency, "request_latency_seconds", "Submit to last token."),
                                      (self.ttft, "time_to_first_token_seconds", "Submit to first token."),
                                      (self.batch, "decode_batch_size", "Sequences per decode step.")):
                lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} histogram"] + hist.lines(p + name)
            state = self.state_bytes
        snap = engine_snapshot or {}
        gauges = (("decode_state_bytes", "Bytes of decode state held now.", snap.get("state_bytes", state)),
                  ("requests_running", "Sequences prefilling or decoding.", snap.get("running", 0)),
                  ("requests_waiting", "Requests queued for a batch slot.", snap.get("waiting", 0)))
        for name, help_, value in gauges:
            lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} gauge", f"{p}{name} {int(value)}"]
        return "\n".join(lines) + "\n"
