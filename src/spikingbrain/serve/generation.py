"""Generating one sequence: chunked prefill, then a decode loop that streams text deltas.

``Sequence`` holds everything about one request except the model state (sampling, the ids so
far, the detokenizer, stop strings, why it finished), so the single-sequence loop here and the
batching engine share one definition of "what the next token and the next text delta are".
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import torch

from spikingbrain.errors import SpikingBrainError
from spikingbrain.serve.adapters import make_adapter
from spikingbrain.serve.detokenize import IncrementalDetokenizer, StopMatcher
from spikingbrain.serve.sampling import SamplingParams, sample_next

DEFAULT_PREFILL_CHUNK = 512


def eos_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's plus the model's generation/config ones."""
    ids: set[int] = set()
    sources = [getattr(tokenizer, "eos_token_id", None)]
    gen = getattr(model, "generation_config", None)
    sources += [getattr(gen, "eos_token_id", None), getattr(getattr(model, "config", None), "eos_token_id", None)]
    for s in sources:
        if isinstance(s, int):
            ids.add(s)
        elif isinstance(s, (list, tuple)):
            ids.update(int(x) for x in s)
    return ids


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for a conversation, ending with the assistant's turn opener. Uses the
    tokenizer's chat template; without one, a plain ``role: content`` transcript.

    Message contents are text, never markup: ``<|im_start|>`` typed by a user becomes the
    characters, not the special token (else a user could forge turns of the conversation). When
    some content contains the text of a special or added token, the template is rendered with
    placeholders in place of the contents, and each content is tokenized on its own with
    ``split_special_tokens``; otherwise the rendered text is tokenized in one piece.
    """
    specials = [t for t in _added_tokens(tokenizer) if t]
    if not any(t in str(m.get("content", "")) for m in messages for t in specials):
        return tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    marks = [f"\x00SBCONTENT{i}\x00" for i in range(len(messages))]
    text = _render(tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks)])
    ids: list[int] = []
    for piece in re.split(r"(\x00SBCONTENT\d+\x00)", text):
        m = re.fullmatch(r"\x00SBCONTENT(\d+)\x00", piece)
        if m:
            content = messages[int(m.group(1))]["content"]
            ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def _render(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises for conversations a template refuses
            raise SpikingBrainError(f"the chat template rejected the conversation: {e}") from None
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _added_tokens(tokenizer) -> list[str]:
    try:
        return list(tokenizer.get_added_vocab())
    except Exception:
        return list(getattr(tokenizer, "all_special_tokens", []))


class Sequence:
    """Decoding bookkeeping of one request.

    ``choose(logits [V]) -> id`` samples; ``push(id) -> str`` records it and returns the text
    that may be shown now. ``finish_reason`` becomes ``"stop"`` (EOS or a stop string) or
    ``"length"`` (max_new_tokens). ``output_ids`` excludes EOS; ``text`` is the final answer
    (stop string trimmed).
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, eos_ids: set[int]) -> None:
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.params = params
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.generator: torch.Generator | None = None  # made on the logits' device at the first draw
        self.output_ids: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stopper = StopMatcher(params.stop)
        self.text = ""
        self.finish_reason: str | None = None
        # with params.logprobs: (token, logprob, top) of every sampled token, EOS included
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self._seen = torch.tensor(self.prompt_ids, dtype=torch.long) if params.repetition_penalty != 1.0 else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def choose(self, logits: torch.Tensor) -> int:
        seen = self._seen if self._seen is not None else torch.empty(0, dtype=torch.long)
        if self.generator is None and self.params.seed is not None:
            self.generator = self.params.make_generator(logits.device)
        token = sample_next(logits, self.params, seen, self.generator)
        if self.logprobs is not None:
            lp = logits.float().log_softmax(-1)
            k = self.params.logprobs
            top = torch.topk(lp, k) if k else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            self.logprobs.append((token, float(lp[token]), pairs))
        return token

    def push(self, token_id: int) -> str:
        if self.finished:
            return ""
        if token_id in self.eos_ids:
            return self._finish("stop", self.detok.flush())
        self.output_ids.append(int(token_id))
        if self._seen is not None:
            self._seen = torch.cat([self._seen, torch.tensor([int(token_id)])])
        out, stopped = self.stopper.feed(self.detok.push(token_id))
        self.text += out
        if stopped:
            self.finish_reason = "stop"
            return out
        if len(self.output_ids) >= self.params.max_new_tokens:
            return out + self._finish("length", self.detok.flush())
        return out

    def _finish(self, reason: str, pending: str) -> str:
        out, stopped = self.stopper.feed(pending)
        if not stopped:
            out += self.stopper.flush()
        self.text += out
        self.finish_reason = reason
        return out


def chunked_prefill(adapter, state, ids: torch.Tensor, chunk_size: int = DEFAULT_PREFILL_CHUNK,
                    on_chunk: Callable[[int], None] | None = None):
    """Feed ``ids [T]`` through ``state`` ``chunk_size`` tokens at a time.

    Activations live for one chunk only, so peak memory is the decode state plus
    O(chunk_size) activations; with a constant-size state (GLA + SWA) a prompt of any length
    fits. Returns ``(logits [V] of the last token, state)``. ``on_chunk(n)`` is told how many
    tokens each chunk had (progress bars).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).view(-1)
    if ids.numel() == 0:
        raise SpikingBrainError("the prompt is empty: nothing to generate from")
    if chunk_size < 1:
        raise SpikingBrainError(f"prefill chunk size must be >= 1, got {chunk_size}")
    logits = None
    for start in range(0, ids.numel(), chunk_size):
        piece = ids[start:start + chunk_size]
        logits, state = adapter.extend(state, piece)
        if on_chunk is not None:
            on_chunk(piece.numel())
    return logits, state


class TextStreamer:
    """Iterate to get text deltas of one generation as they are produced.

    After (or during) iteration: ``sequence`` (ids, text, finish_reason), ``state`` (decode
    state), ``fed_ids`` (the ids that state has consumed), ``prefill_seconds``,
    ``decode_seconds`` and ``tokens_per_second`` (generated tokens after the first, divided by
    the time spent producing them).

    Continuing a conversation: pass the previous ``state`` and its ``fed_ids`` as
    ``state_ids``; when ``prompt_ids`` starts with them only the new suffix is prefilled (with a
    constant-size state, a long chat never re-reads its history). Otherwise prefill starts over.
    """

    def __init__(self, model, tokenizer, prompt_ids, params: SamplingParams,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, adapter=None, state=None,
                 state_ids: list[int] | None = None,
                 on_prefill_chunk: Callable[[int], None] | None = None) -> None:
        self.adapter = adapter or make_adapter(model)
        self.tokenizer = tokenizer
        ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        self.sequence = Sequence(ids, params, tokenizer, eos_token_ids(model, tokenizer))
        self.prefill_chunk = prefill_chunk
        n_seen = len(state_ids) if state_ids else 0
        if state is not None and 0 < n_seen < len(ids) and ids[:n_seen] == list(state_ids):
            self.state, self.fed_ids = state, list(state_ids)
        else:
            self.state, self.fed_ids = self.adapter.new_state(), []
        self.reused_tokens = len(self.fed_ids)  # prompt tokens the given state already holds
        self.on_prefill_chunk = on_prefill_chunk
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    @property
    def tokens_per_second(self) -> float:
        n = len(self.sequence.output_ids) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    def __iter__(self) -> Iterator[str]:
        seq = self.sequence
        new = seq.prompt_ids[len(self.fed_ids):]
        t0 = time.perf_counter()
        logits, self.state = chunked_prefill(self.adapter, self.state, torch.tensor(new),
                                             self.prefill_chunk, self.on_prefill_chunk)
        self.fed_ids = list(seq.prompt_ids)
        self.prefill_seconds = time.perf_counter() - t0
        token = seq.choose(logits)
        delta = seq.push(token)
        if delta:
            yield delta
        t1 = time.perf_counter()
        while not seq.finished:
            logits, self.state = self.adapter.step(self.state, torch.tensor([token]))
            self.fed_ids.append(token)
            token = seq.choose(logits[0])
            delta = seq.push(token)
            self.decode_seconds = time.perf_counter() - t1
            if delta:
                yield delta


def generate_text(model, tokenizer, prompt: str, params: SamplingParams, **kwargs) -> str:
    """Whole answer for a plain-text prompt (convenience for scripts and tests)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    streamer = TextStreamer(model, tokenizer, ids, params, **kwargs)
    for _ in streamer:
        pass
    return streamer.sequence.text
