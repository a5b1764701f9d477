"""The KV-cache protocol every backend's cache implements, and the host (numpy) cache.

A cache holds one [rows, kv_heads, capacity, head_dim] buffer per past_key.i / past_value.i input.
Row r's token at position j lives in slot j (batches are right-padded, runtime/generator.py). The
generator and the in-flight batch drive a cache through this protocol only, so a device cache (the
TensorRT backend's) and the host cache are interchangeable:

- `reserve(needed)` / `fit(needed)`: room for `needed` slots per row (fit may also shrink); both return
  the capacity the next step's feed must use;
- `reserve_rows(rows, limit)`: room for more rows, keeping the filled ones;
- `write(presents, write_pos, counts)`: store a step's new keys/values at each row's write position
  (only the first counts[b] of row b: the rest pad a row that feeds fewer tokens than the widest);
- `view(start, stop)`: rows [start, stop) as a cache sharing this one's storage;
- `move_row(src, dst)`: copy one row over another (compacting a batch);
- `copy_rows_from(src, src_row, dst_row, slots)`: copy slots [0, slots) of another cache's row (a reused
  prefix, a row prefilled apart); `snapshot(row, slots)`: those slots as a new one-row cache;
- `nbytes`: bytes held (a prefix store's memory bound);
- `reset()`: zero every slot (garbage times a zero attention weight can still be NaN).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import numpy as np

from .. import io_spec
from ..errors import InternalError
from ..io_spec import IOSpec

CACHE_BUCKET = 256  # default smallest capacity (slots) of a growable cache; capacities double from here


def cache_capacity(needed: int, current: int, max_seq_len: int, bucket: int = CACHE_BUCKET) -> int:
    """The capacity a cache holding `needed` slots should have: `current` when it fits, else the next of
    bucket, 2*bucket, 4*bucket, ... (at least double the current one, so growth copies are amortized),
    capped at max_seq_len."""
    if needed > max_seq_len:
        raise InternalError(f"{needed} cache slots exceed max_seq_len {max_seq_len}: report this as a qwen2edge bug")
    if needed <= current:
        return current
    cap = max(bucket, 2 * current)
    while cap < needed:
        cap *= 2
    return min(cap, max_seq_len)


class KVCache(Protocol):
    """What the generator and the in-flight batch may do with a backend's cache."""

    batch: int  # rows
    capacity: int  # slots per row the next step's feed must use
    version: int  # bumped whenever the buffers are replaced (bindings to them must be redone)
    arrays: Mapping[str, Any]  # past_* input name -> the backend's buffer for it

    def reserve(self, needed: int) -> int: ...

    def fit(self, needed: int) -> int: ...

    def reserve_rows(self, rows: int, limit: int) -> int: ...

    def write(self, presents: Mapping[str, Any], write_pos: np.ndarray, counts: np.ndarray | None = None) -> None: ...

    def view(self, start: int, stop: int) -> "KVCache": ...

    def move_row(self, src: int, dst: int) -> None: ...

    def copy_rows_from(self, src: "KVCache", src_row: int, dst_row: int, slots: int) -> None: ...

    def snapshot(self, row: int, slots: int) -> "KVCache": ...

    @property
    def nbytes(self) -> int: ...

    def reset(self) -> None: ...


class HostKVCache:
    """numpy buffers in host memory (ONNX Runtime binds them in place).

    With a schema-2 bundle (growable cache) the capacity starts small and grows in buckets of `bucket`
    slots as the sequence does; otherwise it is max_seq_len from the start."""

    def __init__(self, spec: IOSpec, batch: int, capacity: int | None = None, bucket: int = CACHE_BUCKET):
        self.spec = spec
        self.batch = batch
        self.bucket = bucket
        self.growable = spec.growable_cache
        self.capacity = min(capacity or spec.max_seq_len, spec.max_seq_len) if self.growable else spec.max_seq_len
        self.version = 0
        dtype = spec.kv_numpy_dtype
        self.arrays: dict[str, np.ndarray] = {
            t.name: np.zeros((batch, t.shape[1], self.capacity, t.shape[3]), dtype=dtype) for t in spec.cache_inputs}

    def reserve(self, needed: int) -> int:
        """Make room for `needed` slots (copying the filled ones into larger arrays); returns the capacity."""
        if not self.growable or needed <= self.capacity:
            return self.capacity
        self._reallocate(cache_capacity(needed, self.capacity, self.spec.max_seq_len, self.bucket))
        return self.capacity

    def fit(self, needed: int) -> int:
        """`reserve`, and also shrink when `needed` slots use under a quarter of the capacity (a batch
        that outlived its long sequences stops paying for their slots); returns the capacity."""
        if self.growable and needed <= self.capacity // 4:
            smaller = cache_capacity(needed, 0, self.spec.max_seq_len, self.bucket)
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

    def write(self, presents: Mapping[str, np.ndarray], write_pos: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Copy each row's new keys/values into its slots [write_pos[b], write_pos[b] + T), or only the first
        counts[b] of them."""
        for name, arr in self.arrays.items():
            new = presents[io_spec.present_name(name)]  # [B, Hkv, T, D]
            t = new.shape[2]
            for b, p in enumerate(write_pos):
                n = t if counts is None else int(counts[b])
                arr[b, :, p:p + n] = new[b, :, :n]

    def view(self, start: int, stop: int) -> "HostKVCache":
        """Rows [start, stop) sharing these arrays (contiguous: batch is the outermost axis); a step
        run on the view reads and writes those rows of this cache. A view does not grow."""
        v = object.__new__(HostKVCache)
        v.spec, v.batch, v.bucket, v.growable = self.spec, stop - start, self.bucket, False
        v.capacity, v.version = self.capacity, self.version
        v.arrays = {name: arr[start:stop] for name, arr in self.arrays.items()}
        return v

    def move_row(self, src: int, dst: int) -> None:
        for arr in self.arrays.values():
            arr[dst] = arr[src]

    def copy_rows_from(self, src: "HostKVCache", src_row: int, dst_row: int, slots: int) -> None:
        """Slots [0, slots) of `src`'s row `src_row` into this cache's row `dst_row` (reserve room first)."""
        if slots > self.capacity or slots > src.capacity:
            raise InternalError(f"copying {slots} slots between caches of {src.capacity} and {self.capacity}: "
                                "report this as a qwen2edge bug")
        for name, arr in self.arrays.items():
            arr[dst_row, :, :slots] = src.arrays[name][src_row, :, :slots]

    def snapshot(self, row: int, slots: int) -> "HostKVCache":
        """A new one-row cache holding slots [0, slots) of `row` (its capacity: `slots`, when growable)."""
        copy = HostKVCache(self.spec, 1, capacity=slots, bucket=self.bucket)
        copy.copy_rows_from(self, row, 0, slots)
        return copy

    @property
    def nbytes(self) -> int:
        return sum(arr.nbytes for arr in self.arrays.values())

    def reset(self) -> None:
        for arr in self.arrays.values():
            arr.fill(0)

    def _reallocate(self, cap: int) -> None:
        keep = min(cap, self.capacity)
        for name, old in self.arrays.items():
            new = np.zeros((*old.shape[:2], cap, old.shape[3]), dtype=old.dtype)
            new[:, :, :keep] = old[:, :, :keep]
            self.arrays[name] = new
        self.capacity = cap
        self.version += 1
