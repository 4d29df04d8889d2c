"""Continuous batching: requests join and leave a running batch between decode steps.

One background thread owns the model. Each loop iteration it
1. admits waiting requests (up to ``max_batch`` sequences in flight; at most ``max_waiting``
   more may queue, ``submit`` raises ``QueueFull`` beyond that),
2. prefills prompts within a token budget (below),
3. moves requests whose prefill finished into the batch (``adapter.cat``),
4. runs one decode step for the whole batch (``adapter.step``) and samples each row with its
   own parameters and generator,
5. drops finished and cancelled rows (``adapter.select``).

Scheduling policy (why: one long prompt must not stall everyone's stream): while sequences are
decoding, one iteration prefills about ``prefill_budget`` prompt tokens minus one per decoding
row (never less than a quarter of the budget), so a decode step is never delayed by more than a
short prefill: first every prompt that fits in what is left, closest to done first (a short
prompt starts at the next step even while an 8k-token one is being read), then one chunk of the
oldest unfinished prompt, at least a quarter of the budget (it always progresses). With nothing
decoding, whole prompts up to ``prefill_chunk`` tokens go in at once, and the partial chunk (of
the prompt closest to done) is ``prefill_budget`` tokens: a long prompt is read in budget-sized
chunks even alone, so a request arriving meanwhile waits for one short chunk, not a 512-token one
(measured on 2 cores at 4.6k tokens of context: 64 tokens 0.21 s, 512 tokens 1.2 s, so reading
an 8k prompt alone is ~35% slower this way).

Failure isolation: an error while prefilling or sampling one sequence (NaN logits, a broken
tokenizer) fails that sequence alone with an ``error`` event; only an error of the batched
forward itself fails the rows in that forward.

Results go back through a per-request callback, called on the engine thread with an
``Event``; the server turns it into an asyncio queue, the CLI into a ``queue.Queue``. Greedy
outputs do not depend on what else is in the batch: every row's state is its own, and the
model computes every row's positions and masks from its cache.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.serve.adapters import make_adapter
from spikingbrain.serve.generation import DEFAULT_PREFILL_CHUNK, Sequence, eos_token_ids
from spikingbrain.serve.sampling import SamplingParams

log = logging.getLogger("spikingbrain.serve")

DEFAULT_PREFILL_BUDGET = 128  # benchmarks/serve_load.py: best p99 TTFT of {64, 128, 256} on 2 cores
DEFAULT_MAX_WAITING = 64
ECHO_CHUNK = 64  # prompt-logprob requests keep [chunk, vocab] log-probabilities: keep it small
SHUTDOWN_MESSAGE = "the server is shutting down"
SLOW_STEP_S = 1.0  # an engine iteration longer than this is logged


class QueueFull(SpikingBrainError):
    """Too many requests are waiting; ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(SpikingBrainError):
    """The engine takes no new requests (draining or stopped)."""


@dataclass
class Event:
    """``kind``: ``"delta"`` (``text``; ``info`` may hold the running ``spike_sparsity``), ``"done"``
    (``info``: finish_reason, prompt_tokens, completion_tokens, text, ttft_s, decode_s,
    tokens_per_second, spike_sparsity, and with logprobs asked ``output_logprobs`` /
    ``prompt_logprobs``) or ``"error"`` (``text``: message)."""

    kind: str
    text: str = ""
    info: dict = field(default_factory=dict)


class RequestHandle:
    """What ``Engine.submit`` returns: ``cancel()`` stops the request at the next step."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> None:
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_event = on_event
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Job:
    handle: RequestHandle
    seq: Sequence
    state: object = None
    fed: int = 0  # prompt tokens prefilled so far
    last_token: int = -1
    decode_started: float = 0.0
    spikes: list = field(default_factory=list)  # per-step sparsity figures of this row
    prompt_logprobs: list | None = None  # [(token, logprob, top)] for prompt tokens 1..n-1
    last_lp: torch.Tensor | None = None  # log-probs after the last prompt token fed so far

    @property
    def remaining(self) -> int:
        return len(self.seq.prompt_ids) - self.fed


class Engine:
    """Serve many generation requests on one model with continuous batching."""

    def __init__(self, model, tokenizer, max_batch: int = 16, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 metrics=None, spike_probe=None, prefill_budget: int = DEFAULT_PREFILL_BUDGET,
                 max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                            ("prefill_budget", prefill_budget), ("max_waiting", max_waiting)):
            if value < 1:
                raise SpikingBrainError(f"{name} must be >= 1, got {value}")
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = make_adapter(model)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.spike_probe = spike_probe
        self._ids = itertools.count(1)
        self._waiting: deque[_Job] = deque()
        self._prefilling: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._batch = None  # adapter state of the rows in self._running, in order
        self._cond = threading.Condition()
        self._stop = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._state_bytes = 0

    # ------------------------------------------------------------------ public API
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="spikingbrain-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain(self, grace_s: float) -> None:
        """Graceful shutdown: refuse new requests (``ShuttingDown``), fail the queued ones now,
        let running ones go on for ``grace_s`` seconds, then fail what is left with
        ``SHUTDOWN_MESSAGE`` (streams end with an error event instead of being cut)."""
        with self._cond:
            if self._drain_deadline is not None:
                return
            self._drain_deadline = time.monotonic() + max(0.0, grace_s)
            queued = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in queued:
            self._emit(job, Event("error", text=SHUTDOWN_MESSAGE))

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def idle(self) -> bool:
        with self._cond:
            return not (self._waiting or self._prefilling or self._running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> RequestHandle:
        if not prompt_ids:
            raise SpikingBrainError("the prompt is empty: nothing to generate from")
        handle = RequestHandle(next(self._ids), list(prompt_ids), params, on_event)
        job = _Job(handle, Sequence(handle.prompt_ids, params, self.tokenizer, self.eos_ids))
        if params.prompt_logprobs is not None:
            job.prompt_logprobs = []
        with self._cond:
            if self._stop or self._drain_deadline is not None:
                raise ShuttingDown(SHUTDOWN_MESSAGE)
            free = max(0, self.max_batch - len(self._running) - len(self._prefilling))  # not admitted yet
            if len(self._waiting) >= self.max_waiting + free:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; try again later",
                                retry_after=1 + len(self._waiting) // self.max_batch)
            self._waiting.append(job)
            self._cond.notify_all()
        return handle

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None) -> dict:
        """Blocking convenience: submit and wait; returns the ``done`` info (raises on error)."""
        q: queue.Queue[Event] = queue.Queue()
        self.submit(prompt_ids, params, q.put)
        while True:
            ev = q.get(timeout=timeout)
            if ev.kind == "done":
                return ev.info
            if ev.kind == "error":
                raise RuntimeError(ev.text)

    def snapshot(self) -> dict:
        """Counts for /metrics: ``waiting``, ``running`` (decoding + prefilling), ``state_bytes``."""
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._running) + len(self._prefilling),
                    "state_bytes": self._state_bytes}

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stop and not (self._waiting or self._prefilling or self._running):
                    self._cond.wait()
                if self._stop:
                    break
                while self._waiting and len(self._running) + len(self._prefilling) < self.max_batch:
                    self._prefilling.append(self._waiting.popleft())
                overdue = self._drain_deadline is not None and time.monotonic() >= self._drain_deadline
            if overdue:
                self._fail_all(SHUTDOWN_MESSAGE)
                continue
            t0 = time.perf_counter()
            joined: list[_Job] = []
            try:
                self._drop_cancelled()
                t1 = time.perf_counter()
                joined = self._prefill_within_budget()
                t2 = time.perf_counter()
                if joined:
                    self._join(joined)
                t3 = time.perf_counter()
                if self._running:
                    self._decode_step()
            except Exception as e:  # the batched forward failed: fail its rows, then go on
                log.exception("engine step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
                t1 = t2 = t3 = t0
            self._update_state_bytes()
            took = time.perf_counter() - t0
            if took > SLOW_STEP_S:  # what stalls streams, for whoever tunes --prefill-budget
                log.warning("slow engine step: %.2f s (drop %.2f, prefill %.2f, join %d %.2f, decode %d rows %.2f)",
                            took, t1 - t0, t2 - t1, len(joined), t3 - t2,
                            len(self._running), time.perf_counter() - t3)
        self._fail_all(SHUTDOWN_MESSAGE)

    def _emit(self, job: _Job, ev: Event) -> None:
        try:
            job.handle.on_event(ev)
        except Exception:  # a consumer that went away must not stop the engine
            log.exception("request %s: event callback failed", job.handle.id)

    def _fail(self, job: _Job, what: str, e: Exception) -> None:
        log.warning("request %s: %s failed: %s: %s", job.handle.id, what, type(e).__name__, e)
        if self.metrics is not None:
            self.metrics.count("failed")
        self._emit(job, Event("error", text=f"{what} failed: {type(e).__name__}: {e}"))

    def _finish(self, job: _Job) -> None:
        h, seq = job.handle, job.seq
        now = time.perf_counter()
        decode_s = now - job.decode_started if job.decode_started else 0.0
        n = len(seq.output_ids)
        info = {
            "finish_reason": seq.finish_reason, "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": n, "text": seq.text,
            "ttft_s": (h.first_token_at or now) - h.submitted, "latency_s": now - h.submitted,
            "decode_s": decode_s, "tokens_per_second": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            "spike_sparsity": (sum(job.spikes) / len(job.spikes)) if job.spikes else None,
        }
        if seq.logprobs is not None:
            info["output_logprobs"] = seq.logprobs
        if job.prompt_logprobs is not None:
            info["prompt_logprobs"] = job.prompt_logprobs
        if self.metrics is not None:
            self.metrics.observe_request(info)
        self._emit(job, Event("done", info=info))

    def _sample(self, job: _Job, logits: torch.Tensor) -> bool:
        """Sample and record the next token of ``job``; True when the job is over (finished, or
        failed: the error goes to this job only)."""
        try:
            token = job.seq.choose(logits)
            if job.handle.first_token_at is None:
                job.handle.first_token_at = time.perf_counter()
                job.decode_started = job.handle.first_token_at
                wait = job.decode_started - job.handle.submitted
                if wait > 2 * SLOW_STEP_S and len(job.seq.prompt_ids) <= self.prefill_budget:
                    log.warning("request %s: first token after %.2f s for a %d-token prompt",
                                job.handle.id, wait, len(job.seq.prompt_ids))
            job.last_token = token
            delta = job.seq.push(token)
        except Exception as e:
            self._fail(job, "sampling", e)
            return True
        if delta:
            info = {"spike_sparsity": sum(job.spikes) / len(job.spikes)} if job.spikes else {}
            self._emit(job, Event("delta", text=delta, info=info))
        if job.seq.finished:
            self._finish(job)
            return True
        return False

    def _drop_cancelled(self) -> None:
        with self._cond:
            for dq in (self._waiting, self._prefilling):
                for job in [j for j in dq if j.handle.cancelled.is_set()]:
                    dq.remove(job)
                    self._cancelled(job)
        keep = [i for i, j in enumerate(self._running) if not j.handle.cancelled.is_set()]
        if len(keep) < len(self._running):
            for j in self._running:
                if j.handle.cancelled.is_set():
                    self._cancelled(j)
            self._keep_rows(keep)

    def _cancelled(self, job: _Job) -> None:
        if self.metrics is not None:
            self.metrics.count("cancelled")
        self._emit(job, Event("error", text="cancelled"))

    def _keep_rows(self, keep: list[int]) -> None:
        self._running = [self._running[i] for i in keep]
        self._batch = self.adapter.select(self._batch, keep) if keep else None

    def _plan_prefill(self, jobs: list[_Job]) -> list[tuple[_Job, int]]:
        """``(job, tokens)`` to prefill this iteration (the policy in the module docstring):
        every prompt that fits in what is left of the budget, closest to done first, then one
        partial chunk (each partial chunk is a forward of its own, so one per step at most)."""
        if not jobs:
            return []
        if self._running:
            budget = max(self.prefill_budget - len(self._running), max(1, self.prefill_budget // 4))
            floor = max(1, budget // 4)  # what the oldest prompt always gets
        else:  # nobody waits on a decode step: whole prompts up to a full chunk
            budget, floor = self.prefill_chunk, self.prefill_budget
        plan, left = [], budget
        for j in sorted(jobs, key=lambda j: j.remaining):
            if j.remaining > left:
                break
            plan.append((j, j.remaining))
            left -= j.remaining
        planned = {id(j) for j, _ in plan}
        rest = [j for j in jobs if id(j) not in planned]
        if rest:
            # with decodes running the oldest progresses (no starvation); alone, the closest to done
            j = rest[0] if self._running else min(rest, key=lambda j: j.remaining)
            # never more than the budget: a request arriving meanwhile waits for this chunk
            plan.append((j, min(j.remaining, max(min(left, self.prefill_budget), floor))))
        return plan

    def _prefill_within_budget(self) -> list[_Job]:
        """Prefill this iteration's share of every prompt; returns the jobs now ready to decode."""
        with self._cond:
            jobs = list(self._prefilling)
        ready = []
        for job, n in self._plan_prefill(jobs):
            if self._prefill(job, n):
                ready.append(job)
        return ready

    def _prefill(self, job: _Job, n: int) -> bool:
        """Feed ``n`` more prompt tokens of ``job`` (in chunks); True once it is ready to decode.
        A failure ends this job only."""
        logits = None
        try:
            if job.state is None:
                job.state = self.adapter.new_state()
            end = job.fed + n
            while job.fed < end:
                step = min(end - job.fed, ECHO_CHUNK if job.prompt_logprobs is not None else self.prefill_chunk)
                ids = torch.tensor(job.seq.prompt_ids[job.fed:job.fed + step], dtype=torch.long)
                if job.prompt_logprobs is None:
                    logits, job.state = self.adapter.extend(job.state, ids)
                else:
                    rows, job.state = self.adapter.extend(job.state, ids, all_logits=True)
                    self._record_prompt_logprobs(job, ids, rows)
                    logits = rows[-1]
                job.fed += ids.numel()
        except Exception as e:
            with self._cond:
                self._prefilling.remove(job)
            self._fail(job, "prefill", e)
            return False
        if job.remaining > 0:
            return False
        over = self._sample(job, logits)
        if over:  # else it stays counted in _prefilling until _join moves it (no free slot appears)
            with self._cond:
                self._prefilling.remove(job)
        return not over

    def _record_prompt_logprobs(self, job: _Job, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Log-probability of each prompt token given the ones before it (echo + logprobs)."""
        lp = rows.float().log_softmax(-1)
        before = lp[:-1] if job.last_lp is None else torch.cat([job.last_lp[None], lp[:-1]])
        targets = ids[1:] if job.last_lp is None else ids
        k = job.seq.params.prompt_logprobs
        for row, tok in zip(before, targets.tolist()):
            job.prompt_logprobs.append(_entry(row, tok, k))
        job.last_lp = lp[-1]

    def _join(self, jobs: list[_Job]) -> None:
        states = ([self._batch] if self._batch is not None else []) + [j.state for j in jobs]
        self._batch = self.adapter.cat(states)
        with self._cond:
            for j in jobs:
                j.state = None  # the batch owns it now
                j.last_lp = None
                self._prefilling.remove(j)
                self._running.append(j)

    def _decode_step(self) -> None:
        tokens = torch.tensor([j.last_token for j in self._running], dtype=torch.long)
        if self.spike_probe is not None:
            self.spike_probe.reset()
        logits, self._batch = self.adapter.step(self._batch, tokens)
        rows = self.spike_probe.rows(len(self._running)) if self.spike_probe is not None else None
        if self.metrics is not None:
            self.metrics.observe_step(len(self._running))
        keep = []
        for i, job in enumerate(self._running):
            if rows is not None and rows[i] is not None:
                job.spikes.append(rows[i])
            if not self._sample(job, logits[i]):
                keep.append(i)
        if len(keep) < len(self._running):
            self._keep_rows(keep)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            jobs = list(self._waiting) + list(self._prefilling) + list(self._running)
            self._waiting.clear()
            self._prefilling.clear()
        self._running, self._batch = [], None
        for job in jobs:
            self._emit(job, Event("error", text=message))

    def _update_state_bytes(self) -> None:
        n = self.adapter.nbytes(self._batch) if self._batch is not None else 0
        with self._cond:
            prefilling = list(self._prefilling)
        for job in prefilling:
            if job.state is not None:
                n += self.adapter.nbytes(job.state)
        self._state_bytes = n
        if self.metrics is not None:
            self.metrics.set_state_bytes(n)


def _entry(lp_row: torch.Tensor, token: int, k: int) -> tuple[int, float, list[tuple[int, float]]]:
    """``(token, its log-prob, [(id, log-prob)] of the k most likely)`` from a log-prob row."""
    top = torch.topk(lp_row, k) if k > 0 else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return int(token), float(lp_row[token]), pairs
