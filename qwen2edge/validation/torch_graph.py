"""The project's own PyTorch graph run eagerly as a Backend: the reference for Dual Chunk Attention.

transformers has no DCA, so a DCA bundle is compared with the eager torch module it was traced from,
driven through exactly the same host feeds (runtime/dca_feed.py). That module is itself checked
against the independent naive reference in tests/dca_reference.py (tests/exporter/test_dca.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..io_spec import IOSpec
from ..runtime.backend import Backend

REFERENCE_NAME = ("qwen2edge PyTorch graph, eager fp32 (DCA; proven against the naive O(n^2) reference "
                  "in tests/exporter/test_dca.py; transformers has no DCA)")


class TorchGraphBackend(Backend):
    """Runs graphs.model.Qwen2Graph in fp32 with the checkpoint's weights on host arrays."""

    name = "torch-graph"

    def __init__(self, model_dir: str | Path, config: ModelConfig, spec: IOSpec):
        super().__init__(spec)
        import torch

        from ..exporter.export import build_graph

        self.torch = torch
        self.graph = build_graph(Path(model_dir), config, spec.max_seq_len, "fp32")
        self._order = spec.input_names

    @property
    def kv_np_dtype(self):
        return np.float32

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [self.torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self._order]
        with self.torch.no_grad():
            outs = self.graph(*args)
        return {name: t.float().numpy() for name, t in zip(self.spec.output_names, outs)}
