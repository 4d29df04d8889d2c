"""Continuous batching: requests join and leave a running batch between decode steps.

One background thread owns the model. Each loop iteration it
1. admits waiting requests (up to ``max_batch`` sequences in flight),
2. feeds one prefill chunk of one new request (round robin), so a long prompt delays the
   running batch by one chunk per step instead of by its whole prefill,
3. moves requests whose prefill finished into the batch (``adapter.cat``),
4. runs one decode step for the whole batch (``adapter.step``) and samples each row with its
   own parameters and generator,
5. drops finished and cancelled rows (``adapter.select``).

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


@dataclass
class Event:
    """``kind``: ``"delta"`` (``text``; ``info`` may hold the running ``spike_sparsity``), ``"done"`` (``info``: finish_reason, prompt_tokens,
    completion_tokens, text, ttft_s, decode_s, tokens_per_second, spike_sparsity) or ``"error"``
    (``text``: message)."""

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
    spikes: list = field(default_factory=list)  # per-step sparsity figures this row saw


class Engine:
    """Serve many generation requests on one model with continuous batching."""

    def __init__(self, model, tokenizer, max_batch: int = 16, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 metrics=None, spike_probe=None) -> None:
        if max_batch < 1:
            raise SpikingBrainError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = make_adapter(model)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self.spike_probe = spike_probe
        self._ids = itertools.count(1)
        self._waiting: deque[_Job] = deque()
        self._prefilling: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._batch = None  # adapter state of the rows in self._running, in order
        self._cond = threading.Condition()
        self._stop = False
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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> RequestHandle:
        if not prompt_ids:
            raise SpikingBrainError("the prompt is empty: nothing to generate from")
        handle = RequestHandle(next(self._ids), list(prompt_ids), params, on_event)
        job = _Job(handle, Sequence(handle.prompt_ids, params, self.tokenizer, self.eos_ids))
        with self._cond:
            if self._stop:
                raise SpikingBrainError("the engine is shut down")
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
            try:
                self._drop_cancelled()
                joined = self._prefill_one_chunk()
                if joined is not None:
                    self._join(joined)
                if self._running:
                    self._decode_step()
            except Exception as e:  # keep serving: fail what was in flight, then go on
                log.exception("engine step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
            self._update_state_bytes()
        self._fail_all("the server is shutting down")

    def _emit(self, job: _Job, ev: Event) -> None:
        try:
            job.handle.on_event(ev)
        except Exception:  # a consumer that went away must not stop the engine
            log.exception("request %s: event callback failed", job.handle.id)

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
        if self.metrics is not None:
            self.metrics.observe_request(info)
        self._emit(job, Event("done", info=info))

    def _push(self, job: _Job, token: int) -> bool:
        """Record a sampled token for ``job``; returns True when the job is finished."""
        if job.handle.first_token_at is None:
            job.handle.first_token_at = time.perf_counter()
            job.decode_started = job.handle.first_token_at
        job.last_token = token
        delta = job.seq.push(token)
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

    def _prefill_one_chunk(self) -> _Job | None:
        """One chunk of the oldest prefilling request; returns it once its prompt is in."""
        with self._cond:
            if not self._prefilling:
                return None
            job = self._prefilling[0]
        try:
            if job.state is None:
                job.state = self.adapter.new_state()
            ids = torch.tensor(job.seq.prompt_ids[job.fed:job.fed + self.prefill_chunk], dtype=torch.long)
            logits, job.state = self.adapter.extend(job.state, ids)
            job.fed += ids.numel()
        except Exception as e:
            log.exception("request %s: prefill failed", job.handle.id)
            with self._cond:
                self._prefilling.remove(job)
            self._emit(job, Event("error", text=f"prefill failed: {type(e).__name__}: {e}"))
            return None
        with self._cond:
            self._prefilling.rotate(-1)  # round robin between long prompts
            if job.fed < len(job.seq.prompt_ids):
                return None
            self._prefilling.remove(job)
        if self._push(job, job.seq.choose(logits)):
            return None
        return job

    def _join(self, job: _Job) -> None:
        states = ([self._batch] if self._batch is not None else []) + [job.state]
        self._batch = self.adapter.cat(states)
        job.state = None  # the batch owns it now
        self._running.append(job)

    def _decode_step(self) -> None:
        tokens = torch.tensor([j.last_token for j in self._running], dtype=torch.long)
        if self.spike_probe is not None:
            self.spike_probe.reset()
        logits, self._batch = self.adapter.step(self._batch, tokens)
        sparsity = self.spike_probe.sparsity() if self.spike_probe is not None else None
        if self.metrics is not None:
            self.metrics.observe_step(len(self._running))
        keep = []
        for i, job in enumerate(self._running):
            if sparsity is not None:
                job.spikes.append(sparsity)
            if not self._push(job, job.seq.choose(logits[i])):
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
