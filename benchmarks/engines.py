"""One timed generation per engine, run inside its own subprocess (so peak RSS is the engine's).

Each runner: load, warm up once, then prefill the prompt and decode exactly `new_tokens` greedy
tokens (end-of-sequence suppressed or ignored). Returns ttft_s (prompt in -> first token out),
decode_tps (tokens after the first / time after the first) and load_s.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def prompt_ids(n: int, vocab: int = 151643) -> list[int]:
    """A fixed pseudo-random prompt of n ordinary token ids (same for every engine)."""
    import numpy as np

    return np.random.default_rng(1234).integers(100, min(vocab, 150000), n).tolist()


def run_qwen2edge(path: str, ids: list[int], new: int, threads: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from qwen2edge.runtime.bundle import Bundle
    from qwen2edge.runtime.sampling import SamplingParams

    t = time.perf_counter()
    gen = Bundle.open(path, verify=False).generator("ort", threads=threads)
    load = time.perf_counter() - t
    gen.generate([ids], SamplingParams(max_new_tokens=4, stop_token_ids=(-1,)))
    res, tm = gen.generate([ids], SamplingParams(max_new_tokens=new, stop_token_ids=(-1,)))
    assert len(res[0].token_ids) == new, len(res[0].token_ids)
    return {"ttft_s": tm.prefill_s, "decode_tps": tm.decode_tokens_per_s, "load_s": load}


def run_transformers(path: str, ids: list[int], new: int, threads: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    load = time.perf_counter() - t
    stamps: list[float] = []

    class Stamp(LogitsProcessor):  # called once per generated token, right after its forward pass
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, logits_processor=LogitsProcessorList([Stamp()]))
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
        stamps.clear()
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=new, min_new_tokens=new, **kw)
    assert out.shape[1] - len(ids) == new
    return {"ttft_s": stamps[0] - t0, "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "load_s": load}


def run_genai(path: str, ids: list[int], new: int, threads: int) -> dict[str, float]:
    import onnxruntime_genai as og

    t = time.perf_counter()
    cfg = og.Config(path)
    # The same threads as every other engine: genai's session options (its default is every core).
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    load = time.perf_counter() - t

    def once(n: int) -> tuple[float, float, int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens([ids])  # runs the prefill
        gen.generate_next_token()  # samples the first token from the prefill's logits
        t1 = time.perf_counter()
        count = 1
        while not gen.is_done() and count < n:
            gen.generate_next_token()
            count += 1
        return t1 - t0, time.perf_counter() - t1, count

    once(4)
    ttft, dec, count = once(new)
    assert count == new, count
    return {"ttft_s": ttft, "decode_tps": (count - 1) / dec, "load_s": load}


def run_llama_cpp(path: str, ids: list[int], new: int, threads: int) -> dict[str, float]:
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=len(ids) + new + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=len(ids), logits_all=False, verbose=False)
    load = time.perf_counter() - t

    def once(n: int) -> tuple[float, float, int]:
        llm.reset()
        t0 = time.perf_counter()
        first = None
        count = 0
        for _tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter()
            if count == n:
                break
        return first - t0, time.perf_counter() - first, count

    once(4)
    ttft, dec, count = once(new)
    return {"ttft_s": ttft, "decode_tps": (count - 1) / dec, "load_s": load}


def run_optimum(path: str, ids: list[int], new: int, threads: int) -> dict[str, float]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    t = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(path, session_options=opts, provider="CPUExecutionProvider")
    load = time.perf_counter() - t
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, logits_processor=LogitsProcessorList([Stamp()]))
    model.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
    stamps.clear()
    t0 = time.perf_counter()
    model.generate(x, max_new_tokens=new, min_new_tokens=new, **kw)
    return {"ttft_s": stamps[0] - t0, "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "load_s": load}


RUNNERS: dict[str, Callable[..., dict[str, float]]] = {
    "qwen2edge": run_qwen2edge, "transformers": run_transformers, "genai": run_genai,
    "llama.cpp": run_llama_cpp, "optimum": run_optimum,
}


def run_worker(engine: str, path: str, prompt_len: int, new: int, threads: int) -> dict[str, float]:
    """Entry point of the per-engine subprocess."""
    out = RUNNERS[engine](path, prompt_ids(prompt_len), new, threads)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """This process's resident high-water mark. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across execve, so a worker would inherit its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
