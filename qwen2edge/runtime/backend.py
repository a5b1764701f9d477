"""The backend interface every runner implements (ONNX Runtime here, TensorRT on devices).

A backend runs the exported graph (`infer`, Polygraphy-runner style) and makes the caches its steps
read and write (`new_cache`, `step`), so a device backend can keep them on the device between steps.
Caches follow one protocol (runtime/kv_cache.py), whoever made them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .. import io_spec
from ..io_spec import IOSpec
from .kv_cache import CACHE_BUCKET, HostKVCache, KVCache


def new_token_counts(feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per row, how many of a step's tokens are real (the rest pad a shorter row, or an idle one, and
    their keys/values are not stored); None when every token is real."""
    t = feed[io_spec.INPUT_IDS].shape[1]
    counts = feed[io_spec.ATTENTION_MASK][:, -t:].sum(axis=1)
    return None if t == 1 and counts.all() else counts


class Backend(ABC):
    """infer(feed) -> outputs for the raw graph; step() runs one prefill/decode step over a cache."""

    name: str = "backend"
    # Whether `step` may run from several threads at once on separate caches (a server then runs
    # several batches concurrently); False unless the runtime documents it.
    thread_safe: bool = False
    # Whether sequences may join and leave a running batch (runtime/continuous.py): needs caches whose
    # row views and row moves are cheap, and steps over any row count.
    in_flight_batching: bool = True
    # The most rows one step accepts (a TensorRT engine's --max-batch); None: no limit.
    max_batch: int | None = None

    def __init__(self, spec: IOSpec):
        self.spec = spec

    @abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on host arrays; returns every output by name."""

    def new_cache(self, batch: int, capacity: int | None = None, bucket: int = CACHE_BUCKET) -> KVCache:
        """A zeroed cache for `batch` rows. `capacity` (slots) is where a growable cache starts (None:
        max_seq_len) and `bucket` the step it grows by; feeds for it must use `cache.capacity`."""
        return HostKVCache(self.spec, batch, capacity, bucket)

    def step(self, cache: KVCache, feed: dict[str, np.ndarray], write_pos: np.ndarray) -> np.ndarray:
        """Run the non-cache inputs in `feed` against `cache`, store the new keys/values at
        `write_pos` per row, and return logits [B, n_logits, V] (float32, host)."""
        out = self.infer({**feed, **cache.arrays})
        cache.write(out, write_pos, new_token_counts(feed))
        return out[io_spec.LOGITS]

    def close(self) -> None:
        """Release resources (device memory, sessions)."""
