"""llama.cpp decode timing through llama-cpp-python's low-level API (``pip install -e .[bench]``).

``Runner(gguf, seqs, context, ...)`` holds one llama.cpp context with ``seqs`` sequences (ids
``0..seqs-1``), each prefilled with ``context`` random tokens (a real prefill: llama.cpp has no
other way to reach a context), then ``step()`` decodes one token of every sequence in one
``llama_decode`` call, the way a batching server does. One sequence is the single-stream case.
"""
from __future__ import annotations

import ctypes
import time

import llama_cpp


@llama_cpp.llama_log_callback
def _no_log(level, text, user_data):  # llama.cpp logs every graph build to stderr otherwise
    pass


llama_cpp.llama_log_set(_no_log, ctypes.c_void_p(0))


def build_info() -> dict:
    return {"llama_cpp_python": llama_cpp.__version__,
            "ggml_version": _text(llama_cpp.llama_version()) if hasattr(llama_cpp, "llama_version") else None,
            "system_info": _text(llama_cpp.llama_print_system_info())}


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def gguf_quantization(path: str) -> dict:
    """Tensor types of the GGUF (e.g. ``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``) and its file type."""
    from collections import Counter

    from gguf import GGUFReader

    r = GGUFReader(path)
    types = Counter(t.tensor_type.name for t in r.tensors)
    return {"tensor_types": dict(types), "main": types.most_common(1)[0][0]}


class Runner:
    def __init__(self, gguf: str, seqs: int, context: int, threads: int, flash_attn: bool, extra: int = 64,
                 seed: int = 0) -> None:
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(gguf.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = seqs * (context + extra)
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = seqs
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.seqs, self.pos = seqs, [0] * seqs
        self.batch = llama_cpp.llama_batch_init(max(512, seqs), 0, seqs)
        import random

        rng = random.Random(seed)
        t0 = time.perf_counter()
        for s in range(seqs):
            ids = [rng.randrange(10, 1000) for _ in range(context)]
            for i in range(0, context, 512):
                self._decode([(tok, s) for tok in ids[i:i + 512]])
        self.prefill_seconds = time.perf_counter() - t0

    def _decode(self, items: list[tuple[int, int]]) -> None:
        """One ``llama_decode`` of ``(token, seq)`` pairs; logits for each sequence's last token."""
        b = self.batch
        b.n_tokens = len(items)
        last = {s: i for i, (_, s) in enumerate(items)}
        for i, (tok, s) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = self.pos[s]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = 1 if last[s] == i else 0
            self.pos[s] += 1
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def step(self, token: int = 42) -> float:
        """Decode one token of every sequence; seconds taken."""
        t0 = time.perf_counter()
        self._decode([(token, s) for s in range(self.seqs)])
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            self.ctx = None
