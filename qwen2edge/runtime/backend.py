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


CACHE_BUCKET = 256  # smallest cache capacity (slots); capacities double from here up to max_seq_len


def cache_capacity(needed: int, current: int, max_seq_len: int, bucket: int | None = None) -> int:
    """The capacity a cache holding `needed` slots should have: `current` when it fits, else the next of
    bucket, 2*bucket, 4*bucket, ... (at least double the current one, so growth copies are amortized),
    capped at max_seq_len."""
    if needed > max_seq_len:
        raise ValueError(f"{needed} cache slots exceed max_seq_len {max_seq_len}")
    if needed <= current:
        return current
    cap = max(bucket or CACHE_BUCKET, 2 * current)
    while cap < needed:
        cap *= 2
    return min(cap, max_seq_len)


class KVCache:
    """Host-side cache: one [B, Hkv, capacity, D] array per past_key.i / past_value.i input.

    With a schema-2 bundle (growable_cache) the capacity starts small and grows in buckets as the
    sequence does (`reserve`); otherwise it is max_seq_len from the start."""

    def __init__(self, spec: IOSpec, batch: int, np_dtype: Any, capacity: int | None = None):
        self.spec = spec
        self.batch = batch
        self.growable = spec.growable_cache
        self.capacity = min(capacity or spec.max_seq_len, spec.max_seq_len) if self.growable else spec.max_seq_len
        self.version = 0  # bumped whenever the arrays are replaced (bindings to them must be redone)
        self.arrays: dict[str, np.ndarray] = {}
        for t in spec.inputs:
            if t.name.startswith(("past_key.", "past_value.")):
                shape = (batch, t.shape[1], self.capacity, t.shape[3])
                self.arrays[t.name] = np.zeros(shape, dtype=np_dtype)

    def reserve(self, needed: int) -> int:
        """Make room for `needed` slots (copying the filled ones into larger arrays); returns the capacity."""
        if not self.growable or needed <= self.capacity:
            return self.capacity
        self._reallocate(cache_capacity(needed, self.capacity, self.spec.max_seq_len))
        return self.capacity

    def fit(self, needed: int) -> int:
        """`reserve`, and also shrink when `needed` slots use under a quarter of the capacity (a batch
        that outlived its long sequences stops paying for their slots); returns the capacity."""
        if self.growable and needed <= self.capacity // 4:
            smaller = cache_capacity(needed, 0, self.spec.max_seq_len)
            if smaller < self.capacity:
                self._reallocate(smaller)
        return self.reserve(needed)

    def reserve_rows(self, rows: int, limit: int) -> int:
        """Make room for `rows` rows (at least doubling, at most `limit`), keeping the filled ones; returns
        the row count. An in-flight batch starts with the rows it needs, not all it may ever hold."""
        if rows <= self.batch:
            return self.batch
        grown = min(limit, max(rows, 2 * self.batch))
        for name, old in self.arrays.items():
            new = np.zeros((grown, *old.shape[1:]), dtype=old.dtype)
            new[:self.batch] = old
            self.arrays[name] = new
        self.batch = grown
        self.version += 1
        return grown

    def view(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) sharing these arrays (contiguous: batch is the outermost axis); a step
        run on the view reads and writes those rows of this cache."""
        v = object.__new__(KVCache)
        v.spec, v.batch, v.growable, v.capacity, v.version = self.spec, stop - start, False, self.capacity, self.version
        v.arrays = {name: arr[start:stop] for name, arr in self.arrays.items()}
        return v

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s slots over row `dst` (compacting a batch whose middle rows finished)."""
        for arr in self.arrays.values():
            arr[dst] = arr[src]

    def _reallocate(self, cap: int) -> None:
        keep = min(cap, self.capacity)
        for name, old in self.arrays.items():
            new = np.zeros((*old.shape[:2], cap, old.shape[3]), dtype=old.dtype)
            new[:, :, :keep] = old[:, :, :keep]
            self.arrays[name] = new
        self.capacity = cap
        self.version += 1

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
    # Whether its caches are host KVCaches, whose row views let sequences join and leave a running
    # batch (runtime/continuous.py).
    in_flight_batching: bool = True

    def __init__(self, spec: IOSpec):
        self.spec = spec

    @abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on host arrays; returns every output by name."""

    @property
    def kv_np_dtype(self) -> Any:
        return {"float32": np.float32, "float16": np.float16}.get(self.spec.kv_dtype, np.float32)

    def new_cache(self, batch: int, capacity: int | None = None) -> Any:
        """A zeroed cache for `batch` rows (opaque to the generator). `capacity` (slots) is where a
        growable cache starts; None means max_seq_len. Feeds for it must use `cache.capacity`."""
        return KVCache(self.spec, batch, self.kv_np_dtype, capacity)

    def reserve(self, cache: Any, needed: int) -> int:
        """Grow `cache` to hold `needed` slots if it can; returns the capacity the next feed must use."""
        return cache.reserve(needed)

    def step(self, cache: Any, feed: dict[str, np.ndarray], write_pos: np.ndarray) -> np.ndarray:
        """Run the non-cache inputs in `feed` against `cache`, store the new keys/values at
        `write_pos` per row, and return logits [B, n_logits, V] (float32, host)."""
        out = self.infer({**feed, **cache.arrays})
        cache.write(out, write_pos)
        return out[io_spec.LOGITS]

    def close(self) -> None:
        """Release resources (device memory, sessions)."""
