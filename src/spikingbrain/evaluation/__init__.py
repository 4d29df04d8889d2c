"""Evaluation: perplexity / bits per byte, teacher agreement, pass key retrieval, lm-eval tasks.

Every function takes any Hugging Face causal LM (``model(input_ids).logits``) and its tokenizer.
"""
from spikingbrain.evaluation.agreement import teacher_agreement
from spikingbrain.evaluation.harness import local_tasks, run_lm_eval
from spikingbrain.evaluation.passkey import (
    make_passkey_prompt,
    passkey,
    passkey_sweep,
    passkey_table,
    run_passkey,
    score_answer,
)
from spikingbrain.evaluation.perplexity import perplexity
from spikingbrain.evaluation.report import markdown_table, side_by_side
from spikingbrain.evaluation.texts import build_stream, read_texts, shipped_texts

__all__ = [
    "build_stream",
    "local_tasks",
    "make_passkey_prompt",
    "markdown_table",
    "passkey",
    "passkey_sweep",
    "passkey_table",
    "perplexity",
    "read_texts",
    "run_lm_eval",
    "run_passkey",
    "score_answer",
    "shipped_texts",
    "side_by_side",
    "teacher_agreement",
]
