"""Quantized accuracy side by side on the default model: qwen2edge int8 / int4 against llama.cpp's
Q8_0, Q4_0 and Q4_K_M, each scored against the fp32 reference (transformers) on the same token ids.

Sequences and scores: benchmarks/quant_eval.py (the built-in EN/ZH/code/math prompt set; perplexity,
top-1 agreement with the reference's argmax, mean KL). qwen2edge rows run the exported bundles on
ONNX Runtime (teacher-forced prefill of each whole sequence); llama.cpp rows run llama-cpp-python
with every position's logits. The llama.cpp files come from the same checkpoint: F32 / Q8_0 written
by benchmarks/gguf_writer.py, Q4_0 / Q4_K_M by llama.cpp's own quantizer from the F16 file. The
fp32 rows of both are the conversion check (they should sit at the reference).

Run in the benchmark venv (benchmarks/README.md):
    /work/bench-venv/bin/python benchmarks/quant_accuracy.py [--model-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import prepare  # noqa: E402
import quant_eval  # noqa: E402
from prepare import Unavailable  # noqa: E402

QWEN2EDGE = ("fp32", "int8", "int4")
LLAMA = ("F32", "Q8_0", "Q4_0", "Q4_K_M")


def default_model(log) -> Path:
    """The converted default model: converted here if this venv has the GGUF, else the shared cache."""
    from qwen2edge.exporter.gguf_convert import default_model_dir, ensure_default_model, is_converted

    try:
        return Path(ensure_default_model(progress=log))
    except Exception:  # noqa: BLE001 - the GGUF package may live only in the package's own venv
        d = default_model_dir()
        if is_converted(d):
            return d
        raise


def qwen2edge_logits(bundle_dir: Path, threads: int) -> Callable[[list[int]], np.ndarray]:
    from qwen2edge.runtime.bundle import Bundle
    from qwen2edge.validation.engine import teacher_forced

    gen = Bundle.open(bundle_dir, verify=False).generator("ort", threads=threads)
    return lambda ids: teacher_forced(gen, ids, [])


def llama_logits(path: Path, n_ctx: int, threads: int) -> Callable[[list[int]], np.ndarray]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)

    def run(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return run


def llama_probe(path: Path, threads: int) -> str | None:
    """Load the GGUF and evaluate a few tokens in a child process: a llama.cpp crash (e.g. a GCC 12 build
    on an AMX CPU, prepare.llama_crash) marks the row with its cause instead of ending the script."""
    import subprocess

    code = ("import sys; from llama_cpp import Llama; llm = Llama(model_path=sys.argv[1], n_ctx=16, n_batch=16, "
            "n_threads=int(sys.argv[2]), logits_all=True, verbose=False); llm.eval([1, 2, 3])")
    res = subprocess.run([sys.executable, "-c", code, str(path), str(threads)], capture_output=True, text=True)
    return None if res.returncode == 0 else f"{path.name}: {prepare.llama_crash(res.returncode)}"


def build_rows(work: Path, model_dir: Path, max_len: int, engines: set[str], log) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not engines or "qwen2edge" in engines:
        for prec in QWEN2EDGE:
            path = prepare.bundle(work, model_dir, None if prec == "fp32" else prec, max_len, log)
            rows.append({"engine": "qwen2edge", "precision": prec, "path": path})
    if not engines or "llama.cpp" in engines:
        for kind in LLAMA:
            row = {"engine": "llama.cpp", "precision": kind, "path": None}
            try:
                row["path"] = prepare.gguf_file(work, model_dir, kind, log)
            except Unavailable as exc:
                row["why"] = str(exc)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], model: str, ppl_ref: float, positions: int) -> str:
    head = f"{'engine':<22}{'MB/token':>9} {'ppl':>11}{'ppl delta':>10}{'top-1':>8}{'mean KL':>9}"
    out = [f"{model}, {positions} scored positions (built-in EN/ZH/code/math set), "
           f"reference transformers fp32 perplexity {ppl_ref:.3f}", head, "-" * len(head)]
    for r in rows:
        name = f"{r['engine']} {r['precision']}"
        if "score" not in r:
            out.append(f"{name:<22}{'':>9}   unavailable: {r.get('why', 'not run')}")
            continue
        s = r["score"]
        out.append(f"{name:<22}{r['mb_per_token']:>9.1f} {s.ppl:>11.3f}{s.ppl_delta:>+10.2%}{s.top1:>8.1%}{s.kl:>9.4f}")
    return "\n".join(out)


def verdict(rows: list[dict[str, Any]]) -> str:
    """Issue #16's accuracy target: qwen2edge int4's perplexity delta no worse than llama.cpp Q4_K_M's."""
    got = {f"{r['engine']} {r['precision']}": r["score"] for r in rows if "score" in r}
    ours, peer = got.get("qwen2edge int4"), got.get("llama.cpp Q4_K_M")
    if ours is None or peer is None:
        return "int4 perplexity delta <= llama.cpp Q4_K_M's: not measured (a row is unavailable)"
    met = "met" if ours.ppl_delta <= peer.ppl_delta else "not met"
    return f"int4 perplexity delta <= llama.cpp Q4_K_M's: {met} ({ours.ppl_delta:+.2%} vs {peer.ppl_delta:+.2%})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="A Qwen2 checkpoint (default: the default model).")
    ap.add_argument("--work-dir", type=Path, default=Path(os.environ.get("QWEN2EDGE_BENCH_DIR",
                                                                       Path.home() / ".cache/qwen2edge/bench")))
    ap.add_argument("--engines", default="", help="Comma-separated subset: qwen2edge,llama.cpp")
    ap.add_argument("--continuation", type=int, default=32, help="Greedy reference tokens after each chat prompt.")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    from qwen2edge.validation.reference import HFReference

    model_dir = args.model_dir or default_model(log)
    work = args.work_dir / f"accuracy-{model_dir.name}"
    work.mkdir(parents=True, exist_ok=True)
    ref = HFReference(model_dir)
    seqs = quant_eval.eval_sequences(model_dir, ref, args.continuation)
    ref_logits = [ref.logits(ids) for _, ids in seqs]
    del ref
    longest = max(len(ids) for _, ids in seqs)
    engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    rows = build_rows(work, model_dir, longest + 8, engines, log)
    digest = hashlib.sha256(json.dumps(seqs).encode()).hexdigest()[:12]
    for r in rows:
        if r["path"] is None:
            continue
        # Scores are cached per artifact and sequence set (delete the work dir to recompute).
        st = Path(r["path"]).stat()
        cache = work / f"score-{r['engine']}-{r['precision']}-{digest}-{st.st_size}-{int(st.st_mtime)}.json"
        r["mb_per_token"] = (prepare.artifact_weight_bytes(Path(r["path"])) or float("nan")) / 1e6
        if cache.is_file():
            r["score"] = quant_eval.Score(**json.loads(cache.read_text()))
            continue
        t = time.perf_counter()
        if r["engine"] == "llama.cpp":
            r["why"] = llama_probe(Path(r["path"]), args.threads)
            if r["why"]:
                log(f"{r['engine']} {r['precision']}: {r['why']}")
                continue
        try:
            fn = (qwen2edge_logits(r["path"], args.threads) if r["engine"] == "qwen2edge"
                  else llama_logits(r["path"], longest + 8, args.threads))
        except ImportError as exc:
            r["why"] = f"{exc.name or exc} not installed"
            continue
        r["score"] = quant_eval.score(ref_logits, [fn(ids) for _, ids in seqs], seqs)
        cache.write_text(json.dumps(r["score"].__dict__))
        log(f"{r['engine']} {r['precision']}: {r['score']} ({time.perf_counter() - t:.0f}s)")
    scored = [r["score"] for r in rows if "score" in r]
    print(table(rows, model_dir.name, scored[0].ppl_ref if scored else float("nan"), scored[0].positions if scored else 0))
    print(verdict(rows))
    if args.json:
        args.json.write_text(json.dumps([{k: (v.__dict__ if k == "score" else str(v) if k == "path" else v)
                                          for k, v in r.items()} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
