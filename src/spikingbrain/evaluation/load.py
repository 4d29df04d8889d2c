"""How much CPU other processes used while a benchmark measured (Linux ``/proc``).

A timing taken while another process shares the cores is not a measurement of the code: OpenMP
and llama.cpp threads spin and wait for descheduled peers (1.4-2.4x slower was seen here).
``LoadMeter`` samples the machine's busy time (``/proc/stat``) and this process's own CPU time
(``/proc/self/stat``, all its threads) around each timed segment; their difference is what the
rest of the machine used, reported in cores (1.0 = one core busy for the whole segment).

Both counters tick at ``SC_CLK_TCK`` (100 Hz) and are sampled independently, so a segment's
difference is uncertain by a few ticks: in a 0.25 s segment 3 ticks already read as 0.12 cores.
A segment is judged only on the ticks beyond ``SLACK_TICKS``.
"""
from __future__ import annotations

import os
import time

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SLACK_TICKS = 4  # sampling uncertainty of the two tick counters (see the module docstring)


def _machine_busy() -> int | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _own_busy() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(rest[11]) + int(rest[12])  # utime, stime (fields 14 and 15)


class LoadMeter:
    """``with meter.segment(name): ...`` records the other processes' CPU use (cores) during the
    block; ``worst`` is the largest, ``ok(threshold)`` whether every segment stayed below it.
    ``available`` is False where ``/proc`` cannot be read (then nothing is judged)."""

    def __init__(self) -> None:
        self.segments: list[dict] = []
        self.available = _machine_busy() is not None and _own_busy() is not None

    def segment(self, name: str):
        return _Segment(self, name)

    @property
    def worst(self) -> float:
        return max((s["other_cores"] for s in self.segments), default=0.0)

    def ok(self, threshold: float) -> bool:
        return not self.available or self.worst <= threshold

    def summary(self, threshold: float) -> dict:
        total = sum(s["seconds"] for s in self.segments)
        other = sum(s["other_cores"] * s["seconds"] for s in self.segments)
        return {"available": self.available, "threshold_cores": threshold, "valid": self.ok(threshold),
                "worst_other_cores": round(self.worst, 3),
                "mean_other_cores": round(other / total, 3) if total else 0.0,
                "segments_over": [s for s in self.segments if s["other_cores"] > threshold]}


class _Segment:
    def __init__(self, meter: LoadMeter, name: str) -> None:
        self.meter, self.name = meter, name

    def __enter__(self):
        self.t0, self.m0, self.o0 = time.perf_counter(), _machine_busy(), _own_busy()
        return self

    def __exit__(self, *exc):
        if not self.meter.available:
            return False
        seconds = time.perf_counter() - self.t0
        other_ticks = (_machine_busy() - self.m0) - (_own_busy() - self.o0)
        cores = max(0, other_ticks - SLACK_TICKS) / TICKS / seconds if seconds > 0 else 0.0
        self.meter.segments.append({"name": self.name, "seconds": round(seconds, 3), "other_ticks": other_ticks,
                                    "other_cores": round(cores, 3)})
        return False
