"""Where a decode step's time goes: the ONNX Runtime run vs everything the host does around it.

    python benchmarks/profile_decode.py BUNDLE_DIR [--steps 64] [--no-io-binding]

Wraps the session's run calls with timers, generates --steps greedy tokens after a 128-token
prompt, and prints per-step milliseconds: total, inside ONNX Runtime, and host overhead (feeds,
cache writes, logits copy, sampling, streaming).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2edge.runtime.bundle import Bundle  # noqa: E402
from qwen2edge.runtime.sampling import SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--no-io-binding", action="store_true")
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle, verify=False)
    backend = bundle.backend("ort", io_binding=not args.no_io_binding)
    inside = [0.0]
    sess = backend.session
    for name in ("run", "run_with_iobinding"):
        real = getattr(sess, name)

        def timed(*a, _real=real, **k):
            t = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                inside[0] += time.perf_counter() - t

        setattr(sess, name, timed)
    gen = bundle.generator(backend)
    prompt = list(range(1000, 1000 + args.prompt_len))
    params = SamplingParams(max_new_tokens=args.steps, stop_token_ids=(-1,))
    gen.generate([prompt], SamplingParams(max_new_tokens=4, stop_token_ids=(-1,)))
    inside[0] = 0.0
    _, tm = gen.generate([prompt], params)
    in_decode = inside[0]  # includes the prefill run: subtract it using the prefill time
    steps = tm.decode_steps
    run_ms = (in_decode - tm.prefill_s) / steps * 1000
    total_ms = tm.decode_s / steps * 1000
    print(f"{bundle.path.name}: {steps} decode steps, io_binding={not args.no_io_binding}")
    print(f"  per step: total {total_ms:.2f} ms, ONNX Runtime {run_ms:.2f} ms, host {total_ms - run_ms:.2f} ms "
          f"({(total_ms - run_ms) / total_ms:.1%}); {1000 / total_ms:.2f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
