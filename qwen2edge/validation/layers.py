"""Per-layer drift: hidden states of a debug export (hidden_state.{i} outputs) vs transformers'
output_hidden_states on the same token ids, so a report shows where error enters."""

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
from .reference import HFReference


def row_name(index: int, num_layers: int) -> str:
    """Label of output_hidden_states[index]."""
    if index == 0:
        return "embeddings"
    if index == num_layers:
        return f"layer {index - 1} + final norm"
    return f"layer {index - 1}"


def hidden_states_of(runner: Backend, ids: Sequence[int], pad_id: int) -> list[np.ndarray]:
    """One prefill over IDS on an empty cache; returns hidden_state.0..L, each [T, C]."""
    spec = runner.spec
    feed = prefill_feed([list(ids)], spec.max_seq_len, pad_id)
    out = runner.infer({**feed, **runner.new_cache(1).arrays})
    return [out[io_spec.hidden_state(i)][0] for i in range(spec.num_layers + 1)]


def layer_drift(ref: HFReference, runner: Backend, sequences: Sequence[Sequence[int]], pad_id: int,
                max_layer_rel: float, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Per output_hidden_states row, the worst drift over SEQUENCES, plus where error enters:
    the first row over MAX_LAYER_REL and the row whose relative drift grows most over the previous one."""
    L = runner.spec.num_layers
    worst: list[LayerMetrics | None] = [None] * (L + 1)
    for n, ids in enumerate(sequences, 1):
        progress(f"  per-layer drift: sequence {n}/{len(sequences)} ({len(ids)} tokens)")
        ours, theirs = hidden_states_of(runner, ids, pad_id), ref.hidden_states(list(ids))
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
        "threshold": max_layer_rel,
        "first_over": over[0] if over else None,
        "first_over_name": rows[over[0]].name if over else None,
        "largest_jump": jump,
        "largest_jump_name": rows[jump].name,
    }


def debug_runner(bundle: Bundle, model_dir: str | Path, runner: Backend | None, workdir: Path,
                 progress: Callable[[str], None]) -> tuple[Backend, str]:
    """A runner exposing hidden states: the bundle's own ORT runner when it is a debug export,
    else a debug re-export of MODEL_DIR at the bundle's dtype and cache length (in WORKDIR)."""
    if bundle.spec.hidden_states and runner is not None:
        return runner, "bundle (debug export)"
    if bundle.spec.hidden_states:
        return bundle.backend("ort"), "bundle (debug export)"
    from ..exporter.export import ExportOptions, export_bundle

    out = Path(tempfile.mkdtemp(prefix="debug-export-", dir=workdir))
    progress(f"  the bundle has no hidden-state outputs: debug re-export of {model_dir} "
             f"({bundle.manifest.dtype}, max_seq_len {bundle.max_seq_len})")
    export_bundle(model_dir, out / "bundle", ExportOptions(max_seq_len=bundle.max_seq_len,
                                                           dtype=bundle.manifest.dtype, debug_hidden_states=True))
    return Bundle.open(out / "bundle").backend("ort"), f"debug re-export of the model directory ({bundle.manifest.dtype})"
