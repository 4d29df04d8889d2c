"""SFT loss mask: only assistant turns (content + end-of-turn marker) are targets."""
import pytest

from spikingbrain.errors import SpikingBrainError
from spikingbrain.train.encode import IGNORE, DocumentEncoder, encode_chat
from spikingbrain.train.tokenizer import byte_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green, or red."},
]


def test_only_assistant_tokens_are_labelled():
    tok = byte_tokenizer()
    ids, labels = encode_chat(tok, CHAT)
    assert len(ids) == len(labels)
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    assert tok.decode(kept) == "Blue.<|im_end|>\nGreen, or red.<|im_end|>\n"
    # the user's and system's words are never targets
    assert "colour" not in tok.decode(kept) and "brief" not in tok.decode(kept)


def test_sft_needs_messages_and_cpt_renders_chats_as_text():
    tok = byte_tokenizer()
    with pytest.raises(SpikingBrainError, match="messages"):
        DocumentEncoder(tok, "sft")({"text": "plain"})
    ids, labels = DocumentEncoder(tok, "cpt")({"messages": CHAT})
    assert ids == labels and ids[-1] == tok.eos_token_id


def test_non_prefix_template_is_rejected():
    tok = byte_tokenizer()
    # a template that prints the number of messages first: renderings are not prefixes
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(SpikingBrainError, match="prefixes"):
        encode_chat(tok, CHAT)
