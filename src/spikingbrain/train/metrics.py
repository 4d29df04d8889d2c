"""Run metrics: one JSON object per line (``{out}/metrics.jsonl``) and optionally TensorBoard.

Records carry ``"kind"``: ``"train"`` (per logged step: ``loss``, ``ce``, ``kl``, ``aux``,
``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``, ``skipped``), ``"eval"`` (``loss``, ``ppl``,
``tokens``), ``"start"``/``"resume"``/``"end"`` events. After a resume, records for steps past
the checkpoint are written again; the last record of a step is the one that counts.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, path: str | Path | None, tensorboard_dir: str | Path | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(path) if (path and enabled) else None
        self.tb = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                print("log.tensorboard: tensorboard is not installed; metrics go to the JSONL log only",
                      file=sys.stderr)

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """Records of ``path`` (optionally of one kind), the last per (kind, step)."""
    last: dict[tuple[str, int], dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec["kind"] == kind:
                last[(rec["kind"], rec["step"])] = rec
    return sorted(last.values(), key=lambda r: (r["step"], r["kind"]))
