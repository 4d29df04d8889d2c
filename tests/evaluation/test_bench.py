"""`spikingbrain bench`, its plots and the BENCHMARKS.md generator, on small synthetic JSON files
(the benchmark scripts themselves are only dry-run here, except a tiny decode/train run marked slow)."""
import importlib.util
import json
from pathlib import Path

import pytest

from spikingbrain.cli import main
from spikingbrain.evaluation import bench, bench_report

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
META = {"date": "2026-01-02T03:04:05+00:00", "hardware": "Test CPU (x86_64), 2 cores, 1 thread", "torch": "2.13.0+cpu"}


def synthetic_results(d: Path) -> dict[str, dict]:
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "prefill_cpu.json": {**META, "benchmark": "prefill", "dtype": "torch.float32", "window": 4096,
                             "command": "python3 benchmarks/prefill.py --lengths 1024,4096,16384 --threads 1",
                             "rows": [
                                 {"length": 1024, "transformer_s": 1.0, "spikingbrain_s": 1.25, "pure_gla_s": 1.0,
                                  "speedup_vs_transformer": 0.8, "sb_over_pure_gla": 1.25},
                                 {"length": 4096, "transformer_s": 8.0, "spikingbrain_s": 5.0, "pure_gla_s": 4.0,
                                  "speedup_vs_transformer": 1.6, "sb_over_pure_gla": 1.25},
                                 {"length": 16384, "spikingbrain_s": 20.0, "pure_gla_s": 16.0, "sb_over_pure_gla": 1.25},
                             ]},
        "decode_cpu.json": {**META, "benchmark": "decode", "command": "python3 benchmarks/decode.py --contexts 1024,16384",
                            "model": "m", "teacher": "default",
                            "rows": [{"context": 1024, "teacher_ms": 10.0, "sb_fp32_ms": 20.0, "teacher_over_sb_fp32": 0.5},
                                     {"context": 16384, "teacher_ms": 40.0, "sb_fp32_ms": 20.0, "teacher_over_sb_fp32": 2.0}]},
        "memory.json": {**META, "benchmark": "memory", "command": "spikingbrain bench --only memory",
                        "rows": [{"model": "toy", "dtype": "float32", "context": c, "transformer_bytes": 1000 * c,
                                  "spikingbrain_bytes": 4_000_000, "transformer_over_spikingbrain": c / 4000}
                                 for c in (1024, 4096, 16384)]},
        "train_cpu.json": {**META, "benchmark": "train", "command": "python3 benchmarks/train_throughput.py --steps 3",
                           "device": "cpu", "shape": {"hidden": 256, "seq_len": 1024}, "dtype": "torch.float32",
                           "spikingbrain": {"params": 5e6, "step_s": 0.5, "tokens_per_s": 4096.0, "flops_per_token": 3e7,
                                            "mfu": None, "peak_mem_gib": None},
                           "llama": {"params": 5e6, "step_s": 0.4, "tokens_per_s": 5120.0, "flops_per_token": 3.1e7,
                                     "mfu": 0.25, "peak_mem_gib": 1.5},
                           "ratio_tokens_per_s": 0.8},
        # no benchmark/date keys (the name comes from the file, the date from its time)
        "moe.json": {"command": "python3 benchmarks/moe.py --hidden 64",
                     "config": {"hidden": 64, "intermediate": 32, "experts": 4, "top_k": 1, "shared": 1,
                                "torch": "2.13.0+cpu", "platform": "Linux-test", "cuda": None},
                     "results": [{"device": "cpu", "dtype": "float32", "tokens": 16, "mode": "forward", "module": m,
                                  "seconds": s, "tokens_per_s": 16 / s, "ratio_vs_dense": 0.01 / s,
                                  "load_max_over_mean": 1.5} for m, s in (("dense", 0.01), ("moe-loop", 0.02))]},
    }
    for name, data in files.items():
        (d / name).write_text(json.dumps(data))
    return files


def section(md: str, title: str) -> str:
    start = md.index(f"## {title}")
    end = md.find("\n## ", start + 1)
    return md[start:end if end > 0 else None]


def table_rows(text: str) -> list[str]:
    lines = [l for l in text.splitlines() if l.startswith("| ")]
    return lines[1:]  # without the header (the |---| line does not start with "| ")


def test_markdown_from_synthetic_json(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    files = synthetic_results(results)
    md = bench_report.render_markdown(results, link_base=tmp_path)

    pre = section(md, "Prefill time vs prompt length")
    assert len(table_rows(pre)) == len(files["prefill_cpu.json"]["rows"])
    assert "| 4096 | 8 | 5 | 4 | 1.6x | 1.25x |" in pre
    assert "| 16384 | - | 20 | 16 | - | 1.25x |" in pre  # Transformer skipped at the longest length
    assert "- command: `python3 benchmarks/prefill.py --lengths 1024,4096,16384 --threads 1`" in pre
    assert "- hardware: Test CPU (x86_64), 2 cores, 1 thread" in pre and "- torch: 2.13.0+cpu" in pre
    assert "- date: 2026-01-02T03:04:05+00:00" in pre
    assert "At 4096 tokens SpikingBrain prefills 1.6x faster" in pre
    assert "Transformer 1.50" in pre  # log-log slope of 1 -> 8 s over 1024 -> 4096 tokens

    dec = section(md, "Decode speed vs context")
    assert len(table_rows(dec)) == 2 and "| 16384 | 40 | 20 | 2x | 50 |" in dec
    assert "teacher's ms/token changes 4x, SpikingBrain's 1x" in dec

    mem = section(md, "Decode-state memory vs context")
    assert len(table_rows(mem)) == 3 and "SpikingBrain state constant at 3.81 MiB" in mem

    tr = section(md, "Training throughput and MFU")
    assert len(table_rows(tr)) == 2 and "| llama | 5 | 400 | 5,120 | 0.031 | 25.0% | 1.5 |" in tr
    assert "tokens/s SpikingBrain / Llama: 0.8x" in tr

    moe = section(md, "MoE FFN vs dense FFN")
    assert len(table_rows(moe)) == 2 and "(file time)" in moe and "- command: `python3 benchmarks/moe.py --hidden 64`" in moe
    assert "best MoE dispatch moe-loop at 0.5x" in moe
    # sections in the fixed order
    assert md.index("## Prefill") < md.index("## Decode speed") < md.index("## Decode-state") < md.index("## Training")


def test_a_result_without_its_command_is_refused(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_benchmarks_md", ROOT / "scripts" / "make_benchmarks_md.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = tmp_path / "benchmarks" / "results"
    files = synthetic_results(results)
    data = dict(files["train_cpu.json"])
    del data["command"]
    (results / "train_cpu.json").write_text(json.dumps(data))
    out = tmp_path / "BENCHMARKS.md"
    assert script.main(["--results", str(results), "--out", str(out), "--no-plots"]) == 2
    assert "train_cpu.json" in capsys.readouterr().err and not out.exists()
    with pytest.raises(bench_report.SpikingBrainError, match="train_cpu.json .* record no command"):
        bench_report.render_markdown(results)


def test_plots_are_png_and_linked(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    synthetic_results(results)
    plots = bench_report.make_plots(results)
    assert sorted(p.name for p in plots) == ["decode_cpu.png", "memory.png", "prefill_cpu.png"]
    import matplotlib.image

    for p in plots:
        assert p.read_bytes()[:8] == PNG_MAGIC
        h, w = matplotlib.image.imread(p).shape[:2]
        assert h > 100 and w > 100
    md = bench_report.render_markdown(results, link_base=tmp_path)
    for name in ("prefill_cpu", "decode_cpu", "memory"):
        assert f"](benchmarks/results/{name}.png)" in md


def test_make_benchmarks_md_keeps_notes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_benchmarks_md", ROOT / "scripts" / "make_benchmarks_md.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = tmp_path / "benchmarks" / "results"
    notes = tmp_path / "benchmarks" / "notes"
    synthetic_results(results)
    notes.mkdir()
    (notes / "prefill.md").write_text("Prefill analysis: **linear** beyond the window.\n")
    out = tmp_path / "BENCHMARKS.md"
    args = ["--results", str(results), "--notes", str(notes), "--out", str(out)]
    assert script.main(args) == 0
    md = out.read_text()
    assert "Prefill analysis: **linear** beyond the window." in section(md, "Prefill time vs prompt length")
    assert (results / "prefill_cpu.png").read_bytes()[:8] == PNG_MAGIC
    assert script.main(args + ["--check"]) == 0
    # notes written straight into BENCHMARKS.md survive too (no notes file for decode)
    edited = md.replace("<!-- notes:decode (hand-written; kept when regenerated) -->\n",
                        "<!-- notes:decode (hand-written; kept when regenerated) -->\nDecode: flat, as designed.\n")
    out.write_text(edited)
    (results / "decode_cpu.json").write_text((results / "decode_cpu.json").read_text().replace("40.0", "41.0"))
    assert script.main(args + ["--check"]) == 1
    assert script.main(args) == 0
    md2 = out.read_text()
    assert "Decode: flat, as designed." in section(md2, "Decode speed vs context")
    assert "| 16384 | 41 |" in md2 and "Prefill analysis" in md2


def test_bench_memory_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["bench", "--only", "memory", "--quick", "--out-dir", str(out)]) == 0
    data = json.loads((out / "memory.json").read_text())
    assert data["command"] == f"spikingbrain bench --quick --only memory --out-dir {out}"
    assert data["hardware"] and data["date"] and data["torch"]
    rows = data["rows"]
    assert [r["context"] for r in rows] == bench.MEMORY_CONTEXTS["quick"] * len(bench.MEMORY_MODELS)
    for name, details in data["models"].items():
        mine = [r for r in rows if r["model"] == name]
        assert details["spikingbrain_constant"] and len({r["spikingbrain_bytes"] for r in mine}) == 1
        assert mine[-1]["transformer_bytes"] == mine[0]["transformer_bytes"] * mine[-1]["context"] // mine[0]["context"]
    small = [r for r in rows if r["model"].startswith("SmolLM2")]
    # DynamicCache: 30 layers x (K + V) x 3 KV heads x 64 dims x L x 4 bytes
    assert small[0]["transformer_bytes"] == 30 * 2 * 3 * 64 * 1024 * 4
    # 15 GLA states [9, 64, 64] fp32 + 15 SWA windows (K, V [3, 4096, 64] fp32, positions int64, validity bool)
    assert small[0]["spikingbrain_bytes"] == 15 * 9 * 64 * 64 * 4 + 15 * (2 * 3 * 4096 * 64 * 4 + 4096 * 9)
    assert (out / "memory.png").read_bytes()[:8] == PNG_MAGIC
    assert "memory             ok" in capsys.readouterr().out


def test_bench_user_errors(tmp_path, capsys):
    assert main(["bench", "--only", "prefill,warp-drive", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark(s) warp-drive" in err and "prefill, decode, train, moe, memory" in err
    assert main(["bench", "--args", "nope=--x 1", "--dry-run"]) == 2
    assert "bad --args" in capsys.readouterr().err
    assert main(["bench", "--only", "prefill", "--benchmarks-dir", str(tmp_path / "none"), "--dry-run"]) == 2
    assert "benchmark scripts not found" in capsys.readouterr().err


def test_bench_dry_run_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--only", "all", "--quick", "--threads", "1", "--args", "prefill=--repeats 2",
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(bench.BENCHMARKS)
    by_name = {line.split("]")[0][1:]: line for line in printed}
    pre = by_name["prefill"]
    assert "benchmarks/prefill.py --lengths 256,1024 --repeats 1 --device cpu --threads 1 --repeats 2" in pre
    assert pre.endswith(f"--out bench-results/quick/prefill_cpu.json  -> {tmp_path}/bench-results/quick/prefill_cpu.json")
    assert "--json bench-results/quick/train_cpu.json" in by_name["train"] and "--devices cpu" in by_name["moe"]
    assert "spiking_sweep.py" in by_name["spiking"] and "--model" in by_name["spiking"]
    assert by_name["memory"].startswith("[memory] in-process")
    assert not (tmp_path / "bench-results").exists()  # a dry run writes nothing


def test_default_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert bench.default_out_dir() == ROOT / "benchmarks" / "results"
    monkeypatch.chdir(tmp_path)
    assert bench.default_out_dir() == tmp_path.resolve() / "bench-results"


@pytest.mark.slow
def test_bench_decode_and_train_tiny(tmp_path, llama_dir, tokenizer, spiking):
    sb_dir = tmp_path / "sb"
    spiking.save_pretrained(sb_dir)
    tokenizer.save_pretrained(sb_dir)
    out = tmp_path / "res"
    rc = main(["bench", "--only", "decode,train", "--out-dir", str(out), "--threads", "1", "--model", str(sb_dir),
               "--args", f"decode=--teacher {llama_dir} --contexts 16,64 --tokens 2 --warmup 1 --rounds 1 --no-compile "
                         "--teacher-dtypes fp32",
               "--args", "train=--hidden 64 --layers 2 --heads 2 --kv-heads 1 --intermediate 64 --vocab 256 "
                         "--seq-len 64 --window 16 --batch 1 --steps 1 --warmup 1"])
    assert rc == 0
    dec = json.loads((out / "decode_cpu.json").read_text())
    assert [r["context"] for r in dec["rows"]] == [16, 64] and dec["rows"][0]["sb_fp32_ms"] > 0
    assert dec["command"].startswith("python3 benchmarks/decode.py") and dec["bench_command"].startswith("spikingbrain bench")
    tr = json.loads((out / "train_cpu.json").read_text())
    assert tr["benchmark"] == "train" and tr["ratio_tokens_per_s"] > 0 and tr["torch"]
    assert (out / "decode_cpu.png").read_bytes()[:8] == PNG_MAGIC


def test_serve_throughput_view_has_rows_and_ratios(tmp_path):
    data = {**META, "benchmark": "serve_throughput", "command": "python3 benchmarks/serve_throughput.py --model m",
            "rows": [{"server": "spikingbrain serve fp32", "concurrency": 4, "requests": 8, "completion_tokens": 256,
                      "seconds": 10.0, "tokens_per_s": 25.6},
                     {"server": "vLLM fp32", "concurrency": 4, "requests": 8, "completion_tokens": 256,
                      "seconds": 5.0, "tokens_per_s": 51.2}],
            "ratios": [{"concurrency": 4, "ratio": "vLLM fp32 / spikingbrain serve fp32", "value": 2.0}]}
    path = tmp_path / "serve_throughput_cpu.json"
    path.write_text(json.dumps(data))
    v = bench_report.view(path)
    assert v.name == "serve_throughput"
    assert [r[0] for r in v.tables[0].rows] == ["spikingbrain serve fp32", "vLLM fp32"]
    assert v.summary == ["4 concurrent: vLLM fp32 / spikingbrain serve fp32 = 2x"]
    md = bench_report.render_markdown(tmp_path, link_base=tmp_path)
    assert "Serving throughput: spikingbrain serve vs vLLM" in md and "benchmarks/serve_throughput.py" in md
