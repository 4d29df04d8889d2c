"""Run a function on N local processes that form a ``torch.distributed`` group (tests, the
benchmark, the CLI). Under ``torchrun`` none of this is needed: initialise the process group
and call the entry points of ``context.py`` directly.

``spawn("package.module:function", n, *args)`` starts ``n`` processes (``spawn`` start method),
each of which joins a process group (``gloo`` by default) through a free local TCP port, calls
``function(*args)`` and returns its result; the parent gets the results ordered by rank, or a
``SpikingBrainError`` carrying the first failing rank's traceback. The target is named by a
string so that it can live in any importable module (``sys_path`` adds folders to search).
"""
from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import sys
import time
import traceback

import torch

from spikingbrain.errors import SpikingBrainError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(target: str):
    import importlib

    mod, _, name = target.partition(":")
    if not name:
        raise SpikingBrainError(f"target must be 'module:function', got {target!r}")
    return getattr(importlib.import_module(mod), name)


def _entry(target, rank, world, port, backend, threads, sys_path, args, out_q):
    import torch.distributed as dist

    for p in sys_path:
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if threads:
        torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world)
        try:
            result = _resolve(target)(*args)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(result, buf)
        out_q.put((rank, True, buf.getvalue()))
    except BaseException:  # report, then exit non-zero
        out_q.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)


def spawn(target: str, nprocs: int, *args, backend: str = "gloo", threads: int | None = 1,
          sys_path: list[str] | None = None, timeout: float = 600.0) -> list:
    """Run ``target(*args)`` on ``nprocs`` processes of one process group; results by rank."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, daemon=False,
                         args=(target, r, nprocs, port, backend, threads, list(sys_path or []), args, out_q))
             for r in range(nprocs)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    error = None
    deadline = time.monotonic() + timeout
    try:
        while len(results) < nprocs and error is None:
            try:
                rank, ok, payload = out_q.get(timeout=1.0)
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    error = f"timed out after {timeout:.0f} s"
                elif any(p.exitcode not in (None, 0) for p in procs):
                    time.sleep(0.5)  # a late message may still be in the pipe
                    try:
                        rank, ok, payload = out_q.get_nowait()
                    except queue_mod.Empty:
                        codes = [p.exitcode for p in procs]
                        error = f"a process died without reporting (exit codes {codes})"
                        continue
                else:
                    continue
                if error:
                    continue
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failures = {rank: payload}
                grace = time.monotonic() + 3.0  # the others usually fail too: keep their reports
                while time.monotonic() < grace and len(failures) + len(results) < nprocs:
                    try:
                        r, ok2, p2 = out_q.get(timeout=0.2)
                    except queue_mod.Empty:
                        continue
                    if not ok2:
                        failures[r] = p2
                error = "\n".join(f"rank {r} failed:\n{failures[r][-2000:]}" for r in sorted(failures))
    finally:
        for p in procs:
            p.join(timeout=5 if error is None else 1)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    if error is not None:
        raise SpikingBrainError(f"spawn({target}, {nprocs}): {error}")
    return [results[r] for r in range(nprocs)]
