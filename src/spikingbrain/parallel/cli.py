"""``spikingbrain cp-prefill``: prefill a long prompt with context parallelism, generate on one rank.

    spikingbrain cp-prefill MODEL_DIR --prompt-file long.txt --nproc 4 [--max-new-tokens 64] [--check]
    spikingbrain cp-prefill --preset tiny --random-tokens 4096 --nproc 2 --check     (random weights)
    torchrun --nproc_per_node 4 -m spikingbrain.cli cp-prefill MODEL_DIR --prompt-file long.txt

Without ``torchrun`` the command starts ``--nproc`` local processes itself (gloo, CPU). Every
rank loads the model and embeds only its shard of the prompt; rank 0 receives the decode state
and continues greedily. ``--check`` also prefills on one process and reports the largest
difference of the last-token logits and whether the greedy continuations agree.
"""
from __future__ import annotations

import os
import sys
import time

from spikingbrain.errors import SpikingBrainError


def register(sub) -> None:
    p = sub.add_parser(
        "cp-prefill",
        help="prefill a long prompt split over N processes (context parallelism), then generate on one",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help="model directory (or use --preset)")
    p.add_argument("--preset", default=None, help="a SpikingBrainConfig preset with random weights instead of MODEL")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    src.add_argument("--random-tokens", type=int, metavar="T", help="a prompt of T random token ids")
    p.add_argument("--nproc", type=int, default=2, help="processes to split the prompt over (ignored under torchrun)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--check", action="store_true", help="compare with a single-process prefill")
    p.set_defaults(func=cmd_cp_prefill)


def _job(opts: dict) -> dict:
    """Runs on every rank (the process group is up)."""
    import torch

    from spikingbrain.hf_compat import output_cache
    from spikingbrain.parallel import CommStats, context_parallel_prefill, group_rank_world

    rank, world = group_rank_world()
    model, tokenizer = _load(opts)
    ids = _prompt_ids(opts, tokenizer, model.config.vocab_size)
    stats = CommStats()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    t0 = time.perf_counter()
    out = context_parallel_prefill(model, ids, cache_rank=0, stats=stats)
    seconds = time.perf_counter() - t0
    res = {"rank": rank, "world": world, "tokens": ids.shape[1], "prefill_s": seconds,
           "shard": (out.start, out.end), "bytes": stats.by_kind()}
    if rank != 0:
        return res
    gen = _greedy(model, out.cache, out.last_logits, opts["max_new_tokens"])
    res["generated"] = gen
    res["text"] = tokenizer.decode(gen) if tokenizer is not None else None
    if opts["check"]:
        with torch.no_grad():
            t1 = time.perf_counter()
            ref = model(ids, use_cache=True, logits_to_keep=1)
            res["single_prefill_s"] = time.perf_counter() - t1
        res["max_logit_diff"] = float((ref.logits[:, -1] - out.last_logits).abs().max())
        res["same_continuation"] = _greedy(model, output_cache(ref), ref.logits[:, -1],
                                           opts["max_new_tokens"]) == gen
    return res


def _greedy(model, cache, logits, n: int) -> list[int]:
    import torch

    from spikingbrain.hf_compat import cache_kwargs

    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(int(nxt[0, 0]))
            logits = model(nxt, use_cache=True, **cache_kwargs(cache)).logits[:, -1]
    return out


def _load(opts: dict):
    import torch

    if opts["preset"] is not None:
        from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

        torch.manual_seed(0)
        return SpikingBrainForCausalLM(SpikingBrainConfig.from_preset(opts["preset"])).eval(), None
    from spikingbrain.serve.loading import load_model

    model, tokenizer, _ = load_model(opts["model"])
    return model.eval(), tokenizer


def _prompt_ids(opts: dict, tokenizer, vocab: int):
    import torch

    if opts["random_tokens"] is not None:
        return torch.randint(0, vocab, (1, opts["random_tokens"]), generator=torch.Generator().manual_seed(0))
    if tokenizer is None:
        raise SpikingBrainError("--preset has no tokenizer: use --random-tokens")
    text = opts["prompt"]
    if opts["prompt_file"] is not None:
        with open(opts["prompt_file"], encoding="utf-8") as f:
            text = f.read()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


def cmd_cp_prefill(args) -> int:
    if (args.model is None) == (args.preset is None):
        raise SpikingBrainError("give a MODEL directory or --preset")
    if args.prompt is None and args.prompt_file is None and args.random_tokens is None:
        raise SpikingBrainError("give --prompt, --prompt-file or --random-tokens")
    if args.nproc < 1 or args.max_new_tokens < 0:
        raise SpikingBrainError("--nproc must be >= 1 and --max-new-tokens >= 0")
    opts = {k: getattr(args, k) for k in ("model", "preset", "prompt", "prompt_file", "random_tokens",
                                          "max_new_tokens", "check")}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        torch.set_num_threads(args.threads)
        try:
            res = _job(opts)
        finally:
            dist.destroy_process_group()
        if res["rank"] == 0:
            _report([res])
        return 0
    if args.nproc == 1:
        _report([_job(opts)])
        return 0
    from spikingbrain.parallel.launch import spawn

    _report(spawn("spikingbrain.parallel.cli:_job", args.nproc, opts, threads=args.threads))
    return 0


def _report(results: list[dict]) -> None:
    r0 = results[0]
    sent = max(sum(r["bytes"].values()) for r in results)
    print(f"prefill of {r0['tokens']} tokens on {r0['world']} process(es): {r0['prefill_s']:.3f} s "
          f"({r0['tokens'] / r0['prefill_s']:,.0f} tok/s); most bytes sent by one rank: {sent / 2**20:.3f} MiB")
    if r0.get("text") is not None:
        sys.stdout.write(r0["text"] + "\n")
    else:
        print(f"generated ids: {r0['generated']}")
    if "max_logit_diff" in r0:
        print(f"check: single-process prefill {r0['single_prefill_s']:.3f} s, max |logit diff| "
              f"{r0['max_logit_diff']:.2e}, same greedy continuation: {r0['same_continuation']}")
