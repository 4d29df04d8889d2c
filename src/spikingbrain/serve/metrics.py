"""Server metrics, produced by ``prometheus_client`` (one registry per app, so two servers in one
process do not mix their counts).

Definitions:
- ``spikingbrain_requests_total{endpoint,status}``: HTTP requests answered, by HTTP status.
  ``endpoint`` is a route template (``/v1/chat/completions``) or ``other``: never the raw path,
  so a client cannot add label values (or text) to the scrape.
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
- ``spikingbrain_generations_failed_total``: one sequence's prefill or sampling failed.
- ``spikingbrain_requests_rejected_total{reason}``: refused before generation (``queue_full``,
  ``shutting_down``).
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Thread-safe (prometheus_client's own locks); updated by the server and the engine thread."""

    def __init__(self, engine_snapshot: Callable[[], dict] | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "spikingbrain_"
        self.requests = Counter(p + "requests", "HTTP requests answered.", ["endpoint", "status"], registry=r)
        self.rejected = Counter(p + "requests_rejected", "Requests refused before generation.", ["reason"], registry=r)
        self._counters = {
            "prompt_tokens": Counter(p + "prompt_tokens", "Prompt tokens of finished generations.", registry=r),
            "completion_tokens": Counter(p + "completion_tokens", "Generated tokens of finished generations.", registry=r),
            "decode_steps": Counter(p + "decode_steps", "Batched decode steps run.", registry=r),
            "cancelled": Counter(p + "generations_cancelled", "Generations cancelled (client went away).", registry=r),
            "failed": Counter(p + "generations_failed", "Generations failed alone (prefill or sampling).", registry=r),
        }
        self.latency = Histogram(p + "request_latency_seconds", "Submit to last token.", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Submit to first token.", buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram(p + "decode_batch_size", "Sequences per decode step.", buckets=BATCH_BUCKETS, registry=r)
        self.state_bytes = Gauge(p + "decode_state_bytes", "Bytes of decode state held now.", registry=r)
        self._snapshot = engine_snapshot or (lambda: {})
        Gauge(p + "requests_running", "Sequences prefilling or decoding.", registry=r).set_function(
            lambda: self._snapshot().get("running", 0))
        Gauge(p + "requests_waiting", "Requests queued for a batch slot.", registry=r).set_function(
            lambda: self._snapshot().get("waiting", 0))

    def bind(self, engine_snapshot: Callable[[], dict]) -> None:
        self._snapshot = engine_snapshot

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(int(status))).inc()

    def count(self, name: str, n: float = 1) -> None:
        self._counters[name].inc(n)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def observe_request(self, info: dict) -> None:
        self._counters["prompt_tokens"].inc(info["prompt_tokens"])
        self._counters["completion_tokens"].inc(info["completion_tokens"])
        self.latency.observe(info["latency_s"])
        self.ttft.observe(info["ttft_s"])

    def observe_step(self, batch_size: int) -> None:
        self._counters["decode_steps"].inc()
        self.batch.observe(batch_size)

    def set_state_bytes(self, n: int) -> None:
        self.state_bytes.set(int(n))

    def render(self) -> bytes:
        return generate_latest(self.registry)
