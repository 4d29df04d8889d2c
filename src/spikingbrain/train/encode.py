"""Documents -> token ids and labels.

- ``cpt``: the tokenizer's ids for the text (its own BOS if it adds one) followed by EOS;
  labels = ids. A chat document is rendered through the chat template and treated as text.
- ``sft``: the chat template's ids; labels are -100 everywhere except on assistant tokens
  (the assistant's content and the template's end-of-turn marker after it).

Assistant spans are found by rendering the conversation prefix by prefix: the assistant turn
``i`` occupies the characters between ``render(messages[:i], add_generation_prompt=True)`` and
``render(messages[:i+1])``. This needs a template whose renderings are prefixes of each other
(ChatML and most others); any other template is rejected with a clear error.
"""
from __future__ import annotations

from spikingbrain.errors import SpikingBrainError

IGNORE = -100


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """``(text, [(start, end) character spans of assistant turns])``."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise SpikingBrainError("objective sft needs a tokenizer with a chat template")
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise SpikingBrainError(
                "the tokenizer's chat template does not render conversations as prefixes of each "
                "other, so assistant turns cannot be located for the SFT loss mask"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` with labels -100 outside assistant turns."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for j, (a, _) in enumerate(enc["offset_mapping"]):
        if any(s <= a < e for s, e in spans):
            labels[j] = ids[j]
    return ids, labels


def encode_text(tokenizer, text: str, eos_id: int) -> list[int]:
    ids = list(tokenizer(text)["input_ids"])
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
    return ids


class DocumentEncoder:
    """Callable ``doc -> (ids, labels)`` for one objective."""

    def __init__(self, tokenizer, objective: str, text_field: str = "text", messages_field: str = "messages"):
        if tokenizer.eos_token_id is None:
            raise SpikingBrainError("the tokenizer has no EOS token (needed to separate packed documents)")
        self.tok, self.objective = tokenizer, objective
        self.text_field, self.messages_field = text_field, messages_field
        self.eos_id = int(tokenizer.eos_token_id)

    def __call__(self, doc: dict) -> tuple[list[int], list[int]]:
        msgs = doc.get(self.messages_field)
        if self.objective == "sft":
            if not msgs:
                raise SpikingBrainError(
                    f"objective sft needs chat documents with a {self.messages_field!r} field; got {str(doc)[:120]}"
                )
            return encode_chat(self.tok, msgs)
        text = doc.get(self.text_field)
        if text is None and msgs:
            text = _render(self.tok, msgs)
        if text is None:
            raise SpikingBrainError(f"a document has no {self.text_field!r} field: {str(doc)[:120]}")
        ids = encode_text(self.tok, text, self.eos_id)
        return ids, list(ids)
