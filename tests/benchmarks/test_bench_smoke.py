"""bench_decode.py runs end to end on a tiny model (peers that are not installed show as unavailable).

No timing assertions: performance is read from the benchmark's table on a quiet machine."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_decode_tiny_prints_the_table(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--tiny", "--repeats", "1",
           "--engines", "qwen2edge,optimum", "--prompt-len", "16", "--new-tokens", "8",
           "--work-dir", str(tmp_path), "--json", str(tmp_path / "runs.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"memory read bandwidth: [\d.]+ GB/s", out), out
    for precision in ("fp32", "int8", "int4"):
        row = next(line for line in out.splitlines() if line.startswith(f"qwen2edge {precision}"))
        numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", row.split(precision, 1)[1])]
        # model MB, TTFT, decode tok/s, floor, % floor, RSS: all measured, all positive
        assert len(numbers) >= 6 and all(n > 0 for n in numbers[:4]), row
    optimum = next(line for line in out.splitlines() if line.startswith("optimum"))
    assert "unavailable:" in optimum  # a peer that cannot run says why instead of vanishing
    # int8/int4 bundles are smaller than fp32 on disk
    sizes = {p: float(next(l for l in out.splitlines() if l.startswith(f"qwen2edge {p}")).split()[2])
             for p in ("fp32", "int8", "int4")}
    # (int4 ~ int8 here: this tiny model is almost all embedding + lm_head, both int8 in an int4 bundle)
    assert sizes["int4"] <= sizes["int8"] < sizes["fp32"], sizes


@pytest.mark.slow
def test_long_context_tiny_prints_both_tables():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "long_context.py"), "--tiny", "--lengths", "1024",
           "--modes", "plain", "dca", "--steps", "2", "--short-context", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\s+1024\s+(plain|dca)\s", line)]
    assert len(rows) == 4, proc.stdout  # end-of-cache table + short-context table, two modes each
    short = [r for r in rows if len(r) == 6]
    # full tok/s, grown tok/s, capacity, speedup: the grown cache is the 256-slot bucket, not 1024
    assert len(short) == 2 and all(r[4] == "256" and float(r[2]) > 0 and float(r[3]) > 0 for r in short), short


@pytest.mark.slow
def test_first_load_memory_prints_three_loads(tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "first_load_memory.py"), str(bundle)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("first load", "later load"))]
    assert len(rows) == 3, proc.stdout
    for row in rows:
        load_s, rss, peak = (float(x) for x in row.split()[-3:])
        assert load_s > 0 and 0 < rss <= peak, row


@pytest.mark.slow
def test_structured_decode_prints_the_table(tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "structured_decode.py"), "--bundle", str(bundle),
                           "--max-tokens", "24", "--repeats", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("greedy", "T=0.7"))]
    assert len(rows) == 3, proc.stdout
    for row in rows:  # steps, plain tok/s, json_schema tok/s, ratio: all measured
        numbers = [float(x) for x in re.findall(r"\d+\.\d+|\b\d+\b", row.split(",", 1)[1])[1:5]]
        assert len(numbers) == 4 and all(n > 0 for n in numbers), row


def _table_rows(out: str, first_words: tuple[str, ...]) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith(first_words)]


def _run_tiny(script: str, *args: str) -> str:
    """A benchmark's --tiny run; its stdout (the table)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_speculative_decode_tiny_prints_every_method():
    out = _run_tiny("speculative_decode.py", "--new-tokens", "8", "--draft-layers", "1")
    rows = _table_rows(out, ("grounded", "free chat"))
    assert len(rows) == 8, out  # plain, prompt lookup, two drafts; two prompt categories
    assert all(r[-1] == "yes" for r in rows), out  # greedy speculation never changed the output


@pytest.mark.slow
def test_prefix_cache_ttft_tiny_reuses_the_first_turn():
    out = _run_tiny("prefix_cache_ttft.py", "--answer-tokens", "6", "--conversations", "2", "--port", "8791")
    off, on = _table_rows(out, ("off", "256 MB"))
    assert float(off[4]) == 0 and float(on[5]) > 100, out  # reused tokens: none without the cache


@pytest.mark.slow
def test_chunked_prefill_itl_tiny_prints_each_setting():
    out = _run_tiny("chunked_prefill_itl.py", "--prompt-tokens", "300", "--chunks", "0,64", "--alone-steps", "5")
    rows = _table_rows(out, ("running alone", "joins"))
    assert [r[0] for r in rows] == ["running", "joins,", "joins,"], out
    at_once, chunked = rows[1], rows[2]
    assert at_once[3] == "1" and int(chunked[4]) > 1, out  # steps: one prefill vs several chunks


def _run(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_graph_nodes_counts_exported_and_optimized_nodes(tiny_bundle_factory):
    model_dir, bundle = tiny_bundle_factory("gqa")
    row = next(line for line in _run("graph_nodes.py", str(bundle)).stdout.splitlines() if line.startswith(bundle.name[:20]))
    fmt, layers, exported, optimized, per_layer, weight_mms = row.split()[1:7]
    assert fmt == "fp32" and int(layers) == 2
    assert int(optimized) < int(exported)  # ONNX Runtime fuses (RMSNorm, transposed MatMuls, ...)
    assert int(weight_mms) == 2 * 4 + 1  # qkv, o_proj, gate/up, down_proj per layer + lm_head
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "graph_nodes.py"), str(model_dir)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "not a qwen2edge bundle" in proc.stderr


@pytest.mark.slow
def test_artifact_weight_bytes_follow_the_format(tiny_model_factory, tmp_path):
    """The bandwidth floor's bytes per token are counted from each artifact: GGUF (written by the
    benchmark's gguf_writer) and qwen2edge bundles of one checkpoint, in the formats' ratios."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import prepare
    from gguf_writer import write_qwen2_gguf

    from qwen2edge.exporter.export import ExportOptions, export_bundle
    from qwen2edge.exporter.quantize import QuantizeOptions

    ckpt = tiny_model_factory("gqa")
    sizes = {}
    for kind in ("F32", "Q8_0"):
        write_qwen2_gguf(ckpt, tmp_path / f"m-{kind}.gguf", kind)
        sizes[kind] = prepare.artifact_weight_bytes(tmp_path / f"m-{kind}.gguf")
    assert sizes["Q8_0"] / sizes["F32"] == pytest.approx(34 / 128, rel=0.01)
    for q in ("int8", "int4"):
        export_bundle(ckpt, tmp_path / q, ExportOptions(max_seq_len=64, trt_check=None, quantize=QuantizeOptions(q)))
        sizes[q] = prepare.artifact_weight_bytes(tmp_path / q)
    # per weight: int8 1 byte + a 4-byte scale per 32; int4 half a byte + a 4-byte scale (+ half a byte of
    # zero point when asymmetric) per 32; the int4 default keeps the lm_head int8
    import json

    cfg = json.loads((ckpt / "config.json").read_text())
    head = cfg["hidden_size"] * cfg["vocab_size"]
    layers = sizes["F32"] / 4 - head
    opts = QuantizeOptions("int4")
    int4 = 0.5 + 4 / 32 + (0 if opts.int4_symmetric else 0.5 / 32)
    head_int4 = (1 + 4 / 32) if opts.int4_lm_head_int8 else int4
    assert sizes["int8"] / sizes["F32"] == pytest.approx((1 + 4 / 32) / 4, rel=0.02)
    assert sizes["int4"] == pytest.approx(layers * int4 + head * head_int4, rel=0.02)


@pytest.mark.slow
def test_int4_experiments_and_quant_accuracy_print_their_tables(tiny_model_factory, tmp_path):
    ckpt = tiny_model_factory("gqa")
    out = _run("int4_experiments.py", "--model-dir", str(ckpt), "--variants", "quick", "--continuation", "4").stdout
    rows = {line[:38].strip(): line[38:].split() for line in out.splitlines()
            if line.startswith(("asym b32", "sym b32"))}
    assert set(rows) == {"asym b32 min/max (before)", "sym b32 search"}, out
    for ppl, delta, top1, kl, mb, mb05 in rows.values():
        # (a random tiny model's logits are near-flat: int4 may flip every argmax, so top-1 can be 0)
        assert float(ppl) > 0 and 0 <= float(top1.rstrip("%")) <= 100 and float(kl) > 0 and float(mb) > 0
    assert float(rows["sym b32 search"][4]) < float(rows["asym b32 min/max (before)"][4])  # no zero points
    out = _run("quant_accuracy.py", "--model-dir", str(ckpt), "--work-dir", str(tmp_path), "--continuation", "4",
               "--engines", "qwen2edge,llama.cpp").stdout
    lines = {" ".join(line.split()[:2]): line for line in out.splitlines() if line.startswith(("qwen2edge", "llama.cpp"))}
    fp32, int4 = lines["qwen2edge fp32"].split(), lines["qwen2edge int4"].split()
    assert abs(float(fp32[4].rstrip("%"))) < 0.1 and float(fp32[5].rstrip("%")) == 100.0  # fp32 bundle == reference
    assert float(int4[2]) < float(fp32[2]) / 3  # MB/token: int4 reads far fewer bytes
    for kind in ("Q8_0", "Q4_0", "Q4_K_M"):  # llama.cpp rows are present, scored or saying why not
        line = lines[f"llama.cpp {kind}"]
        assert "unavailable:" in line or len(line.split()) == 8, line
