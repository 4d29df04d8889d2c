"""Inference for users: sampling and streaming generation, a continuous-batching engine, an
OpenAI-compatible HTTP server with a web chat page, and the ``generate`` / ``chat`` / ``serve``
commands.

Layers (each file one job): ``sampling`` (logits -> next token), ``detokenize`` (ids -> text
deltas, stop strings), ``generation`` (one sequence: prefill in chunks, decode loop),
``adapters`` (the four cache operations a model must offer the engine), ``engine`` (continuous
batching in a background thread), ``protocol`` (OpenAI request validation), ``gate``
(Host, API key and Content-Type checks), ``server`` (FastAPI app), ``metrics`` (prometheus_client),
``spikes`` (per-request spike sparsity), ``loading`` (model dir, dtype, int8).
"""
