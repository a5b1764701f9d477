"""Store a tied embedding / lm_head matrix once in the ONNX file.

The tracer constant-folds lm_head's transpose of the tied embedding into a second initializer
([hidden, vocab] next to [vocab, hidden]): for Qwen2-0.5B that is 545 MB of fp32 twice, on disk and
in the runtime's memory. This rewrite keeps only the [hidden, vocab] matrix the MatMul reads and
looks embeddings up in it column-wise: Gather(axis=1) -> [hidden, batch, seq] -> Transpose.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def share_tied_embedding(model: Any, progress: Callable[[str], None] = lambda s: None) -> bool:
    """Rewrite `model` in place when an embedding Gather's table is the transpose of a MatMul weight.
    Returns whether it did."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    for i, node in enumerate(model.graph.node):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or axis != 0 or node.input[0] not in inits:
            continue
        table = inits[node.input[0]]
        if len(table.dims) != 2:
            continue
        twin = next((inits[w] for w in matmul_weights if list(inits[w].dims) == list(table.dims)[::-1]), None)
        if twin is None:
            continue
        if not np.array_equal(numpy_helper.to_array(table).T, numpy_helper.to_array(twin)):
            continue
        out = node.output[0]
        cols = f"{out}.tied_cols"
        gather = helper.make_node("Gather", [twin.name, node.input[1]], [cols], axis=1, name=f"{node.name}.tied")
        transpose = helper.make_node("Transpose", [cols], [out], perm=[1, 2, 0], name=f"{node.name}.tied_t")
        model.graph.node.remove(node)
        model.graph.node.insert(i, transpose)
        model.graph.node.insert(i, gather)
        if not any(table.name in n.input for n in model.graph.node):
            model.graph.initializer.remove(table)
        progress(f"      tied embeddings: one {list(twin.dims)} matrix serves the lookup and lm_head")
        return True
    return False
