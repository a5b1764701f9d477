"""Per-layer drift: hidden states of a debug export (hidden_state.{i} outputs) vs the reference's on the
same token ids, so a report shows where error enters."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import io_spec
from ..runtime.backend import Backend
from ..runtime.bundle import Bundle
from ..runtime.generator import prefill_feed
from .metrics import LayerMetrics, layer_metrics

ExtraFeed = Callable[[dict, np.ndarray], dict] | None


def row_name(index: int, num_layers: int) -> str:
    """Label of output_hidden_states[index]."""
    if index == 0:
        return "embeddings"
    if index == num_layers:
        return f"layer {index - 1} + final norm"
    return f"layer {index - 1}"


def hidden_states_of(runner: Backend, ids: Sequence[int], pad_id: int, extra: ExtraFeed = None) -> list[np.ndarray]:
    """One prefill over IDS on an empty cache; returns hidden_state.0..L, each [T, C]."""
    spec = runner.spec
    feed = prefill_feed([list(ids)], spec.max_seq_len, pad_id)
    if extra is not None:
        feed.update(extra(feed, np.zeros(1, dtype=np.int64)))
    out = runner.infer({**feed, **runner.new_cache(1).arrays})
    return [out[io_spec.hidden_state(i)][0] for i in range(spec.num_layers + 1)]


def layer_drift(ref: Any, runner: Backend, sequences: Sequence[Sequence[int]], pad_id: int, max_layer_rel: float,
                extra: ExtraFeed = None, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Per output_hidden_states row, the worst drift over SEQUENCES, plus where error enters:
    the first row over MAX_LAYER_REL and the row whose relative drift grows most over the previous one."""
    L = runner.spec.num_layers
    worst: list[LayerMetrics | None] = [None] * (L + 1)
    for n, ids in enumerate(sequences, 1):
        progress(f"  per-layer drift: sequence {n}/{len(sequences)} ({len(ids)} tokens)")
        ours, theirs = hidden_states_of(runner, ids, pad_id, extra), ref.hidden_states(list(ids))
        for i in range(L + 1):
            m = layer_metrics(i, row_name(i, L), theirs[i], ours[i])
            w = worst[i]
            worst[i] = m if w is None else LayerMetrics(
                i, m.name, max(w.max_abs, m.max_abs), max(w.mean_abs, m.mean_abs),
                max(w.rel_l2, m.rel_l2), min(w.cosine, m.cosine))
    rows = [w for w in worst if w is not None]
    rel = np.array([r.rel_l2 for r in rows])
    over = [r.index for r in rows if r.rel_l2 > max_layer_rel]
    jump = int(np.argmax(np.diff(np.concatenate([[0.0], rel]))))
    return {
        "rows": [r.to_dict() for r in rows],
        "first_over": over[0] if over else None,
        "first_over_name": rows[over[0]].name if over else None,
        "largest_jump": jump,
        "largest_jump_name": rows[jump].name,
    }


def debug_bundle(bundle: Bundle, model_dir: str | Path, workdir: Path, progress: Callable[[str], None]) -> tuple[Bundle, str]:
    """A bundle with hidden-state outputs: BUNDLE itself when it is a debug export, else a debug re-export
    of MODEL_DIR (in WORKDIR) with everything the bundle was exported with: dtype, cache length, the
    long-context overrides and the weight quantization."""
    if bundle.spec.hidden_states:
        return bundle, "bundle (debug export)"
    from ..config import LongContextOverrides
    from ..exporter.export import ExportOptions, export_bundle
    from ..exporter.quantize import QuantizeOptions

    m = bundle.manifest
    q = m.quantization
    quant = QuantizeOptions(q.scheme, q.block_size, q.embeddings) if q else None
    overrides = dict(m.long_context.overrides)
    what = ", ".join([m.dtype, f"max_seq_len {bundle.max_seq_len}", *([q.scheme] if q else []),
                      *(f"{k}={v}" for k, v in overrides.items())])
    progress(f"  the bundle has no hidden-state outputs: debug re-export of {model_dir} ({what})")
    out = Path(tempfile.mkdtemp(prefix="debug-export-", dir=workdir)) / "bundle"
    export_bundle(model_dir, out, ExportOptions(max_seq_len=bundle.max_seq_len, dtype=m.dtype, opset=m.opset,
                                                trt_check=None, debug_hidden_states=True, quantize=quant,
                                                long_context=LongContextOverrides(**overrides)))
    return Bundle.open(out), f"debug re-export of the model directory ({what})"
