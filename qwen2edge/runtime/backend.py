"""The backend interface every runner implements (ONNX Runtime here, TensorRT on devices).

A backend runs the exported graph (`infer`, Polygraphy-runner style) and owns the static KV cache,
so a device backend can keep it on the device between steps (`step`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from .. import io_spec
from ..io_spec import IOSpec


class KVCache:
    """Host-side static cache: one [B, Hkv, L, D] array per past_key.i / past_value.i input."""

    def __init__(self, spec: IOSpec, batch: int, np_dtype: Any):
        self.batch = batch
        self.arrays: dict[str, np.ndarray] = {}
        for t in spec.inputs:
            if t.name.startswith(("past_key.", "past_value.")):
                shape = (batch, *t.shape[1:])
                self.arrays[t.name] = np.zeros(shape, dtype=np_dtype)

    def write(self, presents: dict[str, np.ndarray], write_pos: np.ndarray) -> None:
        """Copy each row's new keys/values into its slots [write_pos[b], write_pos[b] + T)."""
        for name, arr in self.arrays.items():
            new = presents[name.replace("past_", "present_")]  # [B, Hkv, T, D]
            t = new.shape[2]
            for b, p in enumerate(write_pos):
                arr[b, :, p:p + t] = new[b]


class Backend(ABC):
    """infer(feed) -> outputs for the raw graph; step() runs one prefill/decode step over the cache."""

    name: str = "backend"
    # Whether `step` may run from several threads at once on separate caches (a server then runs
    # several batches concurrently); False unless the runtime documents it.
    thread_safe: bool = False

    def __init__(self, spec: IOSpec):
        self.spec = spec

    @abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on host arrays; returns every output by name."""

    @property
    def kv_np_dtype(self) -> Any:
        return {"float32": np.float32, "float16": np.float16}.get(self.spec.kv_dtype, np.float32)

    def new_cache(self, batch: int) -> Any:
        """A zeroed cache for `batch` rows (opaque to the generator)."""
        return KVCache(self.spec, batch, self.kv_np_dtype)

    def step(self, cache: Any, feed: dict[str, np.ndarray], write_pos: np.ndarray) -> np.ndarray:
        """Run the non-cache inputs in `feed` against `cache`, store the new keys/values at
        `write_pos` per row, and return logits [B, n_logits, V] (float32, host)."""
        out = self.infer({**feed, **cache.arrays})
        cache.write(out, write_pos)
        return out[io_spec.LOGITS]

    def close(self) -> None:
        """Release resources (device memory, sessions)."""
