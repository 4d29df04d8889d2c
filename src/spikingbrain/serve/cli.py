"""`spikingbrain generate`, `spikingbrain chat` and `spikingbrain serve`."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from spikingbrain.errors import SpikingBrainError

API_KEY_ENV = "SPIKINGBRAIN_API_KEY"
LEAN_DEFAULT_MAX_EXTRA = 2 << 30  # the lean step is on by default while its weights add at most this


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="model directory (default: ./spikingbrain-demo/model from `spikingbrain demo`)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights/activations dtype (bf16 halves memory; fast on CPUs with AVX512-BF16/AMX)")
    p.add_argument("--int8", action="store_true", help="CPU fast path: int8 linears (dynamic quantization), LM head included; the fastest decode on CPU")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                   help="feed long prompts N tokens at a time (bounded memory)")
    g = p.add_argument_group("decode step (SpikingBrain models)")
    g.add_argument("--lean", dest="lean", action="store_true", default=None,
                   help="decode with the lean one-token step (default, unless its packed weights would add more "
                        "than 2 GiB of memory: a large model with --int8)")
    g.add_argument("--no-lean", dest="lean", action="store_false",
                   help="decode with the model's own forward instead of the lean one-token step")
    g.add_argument("--int4", action="store_true",
                   help="lean step with int4 weights (groups of 32; prefill keeps the loaded weights)")
    g.add_argument("--kv", choices=["fp32", "bf16", "int8"], default=None,
                   help="dtype of the lean step's attention window (default: the model's dtype; bf16 with --int8)")
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the lean step (the first step then compiles, minutes on 2 cores, cached "
                        "on disk); default for serve")
    g.add_argument("--no-compile", dest="compile", action="store_false", help="run the lean step eagerly")


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (removed from the output); repeatable")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streaming it to stdout")
    _model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file (any length)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    _sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model in the terminal (/exit to quit, /reset to start over)")
    _model_args(p)
    p.add_argument("--system", default=None, help="system message")
    _sampling_args(p, temperature=0.7)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but / and /health (or set ${API_KEY_ENV})")
    p.add_argument("--allowed-hosts", default=None, metavar="H1,H2",
                   help="Host header values accepted (default: localhost, 127.0.0.1, ::1 and the --host address; "
                        "'*' accepts any: only behind a proxy that checks it)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond --max-batch; more get 429")
    p.add_argument("--prefill-budget", type=int, default=128, metavar="N",
                   help="prompt tokens read per engine step; long prompts are read in chunks this size, so they cannot stall streams")
    p.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: the model's max_position_embeddings)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="S", help="a request body must arrive within S seconds")
    p.add_argument("--shutdown-grace", type=float, default=5.0, metavar="S",
                   help="on SIGTERM, in-flight requests get S seconds to finish before they are ended")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)


def _params(args):
    from spikingbrain.serve.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, stop=list(args.stop))


def _load(args):
    from spikingbrain.serve.loading import load_model

    if args.prefill_chunk < 1:
        raise SpikingBrainError("--prefill-chunk must be >= 1")
    model, tokenizer, path = load_model(args.model, dtype=args.dtype, int8=args.int8)
    if args.lean is False:
        if args.int4 or args.kv:
            raise SpikingBrainError("--int4 and --kv set the lean step; do not combine them with --no-lean")
        return model, tokenizer, path
    from spikingbrain.decode.adapter import enable_lean

    compile_default = args.func is cmd_serve  # a long-lived server pays the compile once
    forced = args.lean or args.int4 or args.kv
    why = enable_lean(model, weights="int4" if args.int4 else None, kv=args.kv,
                      compile=compile_default if args.compile is None else args.compile,
                      max_extra_bytes=None if forced else LEAN_DEFAULT_MAX_EXTRA)
    if why is not None:
        if args.int4 or args.kv:
            raise SpikingBrainError(f"--int4/--kv need the lean decode step, which this model cannot use: {why}")
        print(f"note: decoding with the model's own step ({why})", file=sys.stderr)
    return model, tokenizer, path


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from spikingbrain.serve.generation import TextStreamer, chat_prompt_ids

    params = _params(args)
    model, tokenizer, _ = _load(args)
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpikingBrainError(f"cannot read --prompt-file: {e}") from None
    else:
        text = args.prompt
    if args.chat:
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SpikingBrainError("the prompt is empty")
    bar = tqdm(total=len(ids), unit="tok", desc="prefill", file=sys.stderr,
               disable=len(ids) <= 4 * args.prefill_chunk)
    streamer = TextStreamer(model, tokenizer, ids, params, prefill_chunk=args.prefill_chunk, on_prefill_chunk=bar.update)
    first = True
    for delta in streamer:
        if first:  # the prompt is in: end the progress bar before the answer starts
            bar.close()
            first = False
        sys.stdout.write(delta)
        sys.stdout.flush()
    bar.close()
    sys.stdout.write("\n")
    seq = streamer.sequence
    print(f"[{len(ids)} prompt tokens in {streamer.prefill_seconds:.2f} s, {len(seq.output_ids)} generated at "
          f"{streamer.tokens_per_second:.1f} tok/s, finish={seq.finish_reason}, decode state "
          f"{streamer.adapter.nbytes(streamer.state) / 2**20:.2f} MiB]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from spikingbrain.serve.generation import TextStreamer, chat_prompt_ids

    params = _params(args)
    model, tokenizer, path = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    state, state_ids = None, None
    print(f"chatting with {path} (/exit to quit, /reset to start over)", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            messages, state, state_ids = list(system), None, None
            print("[conversation reset]", file=sys.stderr)
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": line})
        ids = chat_prompt_ids(tokenizer, messages)
        streamer = TextStreamer(model, tokenizer, ids, params, prefill_chunk=args.prefill_chunk,
                                state=state, state_ids=state_ids)
        sys.stdout.write("assistant> ")
        try:
            for delta in streamer:
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this answer, keep the chat
            sys.stdout.write(" [interrupted]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": streamer.sequence.text})
        state, state_ids = streamer.state, streamer.fed_ids
        print(f"[{streamer.tokens_per_second:.1f} tok/s]", file=sys.stderr)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    from spikingbrain.serve.protocol import Limits
    from spikingbrain.serve.server import create_app, serve
    from spikingbrain.serve.spikes import make_spike_probe

    for name in ("port", "max_batch", "max_waiting", "prefill_budget", "max_tokens_cap", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise SpikingBrainError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise SpikingBrainError("--max-prompt-tokens must be >= 1")
    if not args.body_timeout > 0 or not args.shutdown_grace >= 0:
        raise SpikingBrainError("--body-timeout must be > 0 and --shutdown-grace >= 0")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        raise SpikingBrainError("the API key is empty (--api-key \"\" or an empty $" + API_KEY_ENV + "): "
                                "give a real key, or leave both unset to serve without one")
    if not _is_loopback(args.host) and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    hosts = _allowed_hosts(args.allowed_hosts, args.host)
    model, tokenizer, path = _load(args)
    limits = Limits(args.max_request_bytes, args.max_prompt_tokens, args.max_tokens_cap, args.body_timeout)
    app = create_app(
        model, tokenizer, model_name=args.model_name or path.resolve().name, api_key=api_key, limits=limits,
        max_batch=args.max_batch, prefill_chunk=args.prefill_chunk, spike_probe=make_spike_probe(model),
        prefill_budget=args.prefill_budget, max_waiting=args.max_waiting, allowed_hosts=hosts,
    )
    print(f"serving {path} on http://{args.host}:{args.port}/ (OpenAI API under /v1; prompts up to "
          f"{limits.max_prompt_tokens} tokens; Host allowed: {', '.join(hosts)})", file=sys.stderr)
    serve(app, host=args.host, port=args.port, log_level=args.log_level, shutdown_grace_s=args.shutdown_grace)
    return 0


def _allowed_hosts(flag: str | None, bind: str) -> list[str]:
    from spikingbrain.serve.gate import LOOPBACK_HOSTS

    if flag is not None:
        hosts = [h.strip() for h in flag.split(",") if h.strip()]
        if not hosts:
            raise SpikingBrainError("--allowed-hosts is empty")
        return hosts
    hosts = list(LOOPBACK_HOSTS)
    if bind not in ("0.0.0.0", "::", "") and bind.lower() not in hosts:
        hosts.append(bind)
    return hosts
