"""ONNX Runtime backend (CPU by default; any provider ONNX Runtime offers).

Decode hot path (one token per row): inputs are bound where they live (the cache arrays are bound
once per cache, never copied), and logits/present outputs go into buffers preallocated per cache,
so a step allocates nothing sizeable. The optimized graph (fusions such as DequantizeLinear+MatMul
-> MatMulNBits) is cached beside the bundle (`ORT_CACHE`), keyed by the model's digest, the ONNX
Runtime version and the CPU architecture, so later loads skip the optimizer; a cache is loaded only when
its signed record binds it to the verified model (ort_cache.py), else it is rebuilt.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import io_spec
from ..errors import InferenceError
from ..io_spec import IOSpec
from .backend import Backend, new_token_counts
from .kv_cache import HostKVCache
from .ort_cache import ORT_CACHE, OPTIMIZED_FILE, cache_problem, new_cache_dir, optimized_cache_dir, publish

__all__ = ["ORT_CACHE", "OPTIMIZED_FILE", "OrtBackend", "optimized_cache_dir"]

if TYPE_CHECKING:
    from .bundle import Bundle

log = logging.getLogger("qwen2edge.runtime")


def default_threads() -> int:
    """Physical-core-sized intra-op pool: hyper-threads slow memory-bound decode down."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def release_freed_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it mapped otherwise); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def session_options(threads: int, level: Any = None) -> Any:
    """SessionOptions for every qwen2edge session: `threads` intra-op threads, quiet logs, and denormals
    flushed to zero. Softmax over a long cache underflows to subnormal probabilities, which x86 computes
    at a fraction of normal speed: that made YaRN bundles 23% slower at the end of an 8k cache
    (docs/long_context.md); subnormals are below 1.2e-38, far under any logit tolerance."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if level is not None:
        opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    return opts


class _DecodeBuffers:
    """An IOBinding for one-token steps over one cache, with its preallocated outputs."""

    def __init__(self, session: Any, spec: IOSpec, cache: HostKVCache, n_logits: int):
        self.binding = session.io_binding()
        self.n_logits = n_logits
        self.cache_version = cache.version
        self.outputs: dict[str, np.ndarray] = {}
        dims = {io_spec.BATCH: cache.batch, io_spec.SEQ: 1, io_spec.N_LOGITS: n_logits}
        for t in spec.outputs:  # logits, present_key/value.i, and hidden_state.i in debug exports
            arr = np.empty(t.concrete_shape(dims), dtype=io_spec.numpy_dtype(t.dtype))
            self.outputs[t.name] = arr
            self.binding.bind_output(t.name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        for name, arr in cache.arrays.items():
            self.binding.bind_cpu_input(name, arr)  # bound once per capacity: HostKVCache.write updates in place


class OrtBackend(Backend):
    """Runs model.onnx with onnxruntime.InferenceSession."""

    name = "ort"
    reopened = False  # whether the first load replaced its optimizing session with the saved graph
    thread_safe = True  # InferenceSession.run is documented thread-safe; each batch has its own cache

    @classmethod
    def from_bundle(cls, bundle: "Bundle", *, cache_optimized: bool = True, **kwargs: Any) -> "OrtBackend":
        """The bundle's model, with its optimized graph cached beside it (CPU provider only: an optimized
        graph is specific to the providers that optimized it). Other keywords go to the constructor."""
        digest = bundle.manifest.model_digest  # graph and weights: external data changes it too
        if (cache_optimized and digest and not kwargs.get("providers")
                and kwargs.get("optimized_model_path") is None):
            kwargs.setdefault("optimized_cache", optimized_cache_dir(bundle.path / ORT_CACHE, digest))
            kwargs.setdefault("model_digest", digest)
        return cls(bundle.path / bundle.manifest.model_file, bundle.spec, **kwargs)

    def __init__(self, model_path: str | Path, spec: IOSpec, threads: int | None = None,
                 providers: list[str] | None = None, optimized_model_path: str | Path | None = None,
                 optimized_cache: str | Path | None = None, io_binding: bool = True, reopen: bool = True,
                 model_digest: str = ""):
        """optimized_cache: a directory (see optimized_cache_dir) to load the optimized graph from,
        or to save it to on first load; unwritable locations are skipped silently. It is loaded only if
        its record binds it to `model_digest` (the verified model's, BundleManifest.model_digest), else it
        is rebuilt (ort_cache.cache_problem). reopen: after saving it, drop the optimizing session and
        load the saved graph instead (far less resident memory for the life of the process; costs one more
        load, once)."""
        super().__init__(spec)
        if spec.kv_dtype == "bfloat16" and not providers:
            raise InferenceError("ONNX Runtime's CPU provider has no bfloat16 MatMul, so bf16 bundles run on "
                                 "TensorRT only: set {opt:backend} to trt, or re-export with `--dtype fp16` or fp32 "
                                 "for ONNX Runtime")
        import onnxruntime as ort

        self.threads = threads or default_threads()
        self.providers = providers or ["CPUExecutionProvider"]
        self.io_binding = io_binding
        cached = Path(optimized_cache) / OPTIMIZED_FILE if optimized_cache else None
        problem = cache_problem(cached.parent, model_digest) if cached is not None else "no cache"
        if problem is None:
            # Already optimized: basic-level passes only (they are idempotent and cheap).
            self.session = self._session(cached, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, None)
            self.optimized_from_cache = True
        else:
            self.optimized_from_cache = False
            if cached is not None and cached.parent.exists():
                log.warning("rebuilding the optimized-graph cache %s: %s", cached.parent, problem)
                shutil.rmtree(cached.parent, ignore_errors=True)  # if it stays (read-only), it is still not loaded
            tmp = new_cache_dir(cached.parent) if cached is not None and not optimized_model_path else None
            save = optimized_model_path or (tmp / OPTIMIZED_FILE if tmp else None)
            published = False
            try:
                self.session = self._session(Path(model_path), ort.GraphOptimizationLevel.ORT_ENABLE_ALL, save)
            finally:
                if tmp is not None:
                    published = publish(tmp, cached.parent, model_digest)
            if reopen and published:
                # The session that optimized and serialized the graph stays ~1.4 GiB larger than one
                # loaded from its output (0.5B fp32: 3903 vs 2520 MiB resident): replace it.
                del self.session
                release_freed_heap()
                self.session = self._session(cached, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, None)
                self.reopened = True
        self._outputs = [o.name for o in self.session.get_outputs()]
        # Decode bindings per cache, dropped with the cache (a weak map: the backend must not keep
        # every batch's buffers alive).
        self._decode: weakref.WeakKeyDictionary[HostKVCache, _DecodeBuffers] = weakref.WeakKeyDictionary()
        self._decode_lock = threading.Lock()

    def _session(self, path: Path, level: Any, save: Path | None) -> Any:
        import onnxruntime as ort

        opts = session_options(self.threads, level)
        if save is not None:
            opts.optimized_model_filepath = str(save)
            # Weights go to one side file so graphs over protobuf's 2 GiB can be saved too.
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          Path(save).name + ".data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            return ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise InferenceError(f"ONNX Runtime could not load {path} ({str(exc).splitlines()[0]}): "
                                 "re-export the bundle with this qwen2edge version") from exc

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self._outputs, feed)
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime failed to run the graph ({str(exc).splitlines()[0]})") from exc
        return dict(zip(self._outputs, values))

    def step(self, cache: Any, feed: dict[str, np.ndarray], write_pos: np.ndarray) -> np.ndarray:
        """Prefill through infer(); one-token steps through the cache's bound buffers."""
        if not self.io_binding or feed[io_spec.INPUT_IDS].shape[1] != 1 or not isinstance(cache, HostKVCache):
            return super().step(cache, feed, write_pos)
        bufs = self._decode_buffers(cache, feed[io_spec.LOGITS_INDEX].shape[1])
        for name, arr in feed.items():
            bufs.binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        try:
            self.session.run_with_iobinding(bufs.binding)
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime failed to run the graph ({str(exc).splitlines()[0]})") from exc
        cache.write(bufs.outputs, write_pos, new_token_counts(feed))
        # A copy: the buffer is overwritten by the next step, and callers may keep the logits.
        return bufs.outputs[io_spec.LOGITS].copy()

    def _decode_buffers(self, cache: HostKVCache, n_logits: int) -> _DecodeBuffers:
        with self._decode_lock:
            bufs = self._decode.get(cache)
            if bufs is None or bufs.n_logits != n_logits or bufs.cache_version != cache.version:
                bufs = self._decode[cache] = _DecodeBuffers(self.session, self.spec, cache, n_logits)
            return bufs
