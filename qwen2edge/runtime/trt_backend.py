"""TensorRT backend: the same Backend interface as ONNX Runtime, with the static KV cache on the device.

Device buffers and the (non-default) stream come from Polygraphy's CUDA wrapper (ctypes over
libcudart: no torch, no cuda-python). Per step only the small inputs go host -> device and only
the logits come back; the new keys/values are copied device -> device into the cache at each row's
write position, on the same stream, so the cache never leaves the GPU.

UNTESTED ON TENSORRT: no GPU or TensorRT was available where this was written. The pure parts
(profile selection, the engine/device match, the cache copy offsets) are tested on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import io_spec
from ..errors import InferenceError
from ..io_spec import IOSpec
from ..manifest import MANIFEST, read_manifest
from ..trt.engine_io import (bind_address, bind_input, check_engine_io, engine_max_batch, new_context, output_shape,
                             set_profile)
from ..trt.engine_manifest import ENGINE_DIR, PLAN_FILE, check_engine_matches
from ..trt.profiles import Profile, select_profile
from ..trt.tensorrt_env import import_tensorrt, trt_logger
from .backend import Backend, new_token_counts


def kv_copy_plan(batch: int, heads: int, max_len: int, head_dim: int, seq: int, itemsize: int,
                 write_pos: Sequence[int], counts: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """(dst byte offset in the cache, src byte offset in present, nbytes) copies that put
    present [B, H, seq, D] at cache [B, H, write_pos[b]:write_pos[b] + seq, D] (only the first counts[b]
    of row b's seq when counts is given: the rest is padding).

    For one (row, head) the seq*D destination elements are contiguous, so that is one copy each.
    """
    if len(write_pos) != batch:
        raise InferenceError(f"write_pos has {len(write_pos)} rows for a batch of {batch}: report this as a bug")
    row = seq * head_dim * itemsize
    plan = []
    for b, p in enumerate(int(x) for x in write_pos):
        n = seq if counts is None else int(counts[b])
        if p < 0 or p + n > max_len:
            raise InferenceError(f"cache write at slots {p}..{p + n} overflows max_seq_len {max_len}: shorten the "
                                 "prompt or lower --max-new-tokens")
        for h in range(heads):
            dst = ((b * heads + h) * max_len + p) * head_dim * itemsize
            src = (b * heads + h) * row
            plan.append((dst, src, n * head_dim * itemsize))
    return plan


class _DeviceRows:
    """Rows [start, stop) of one device buffer: what TensorRT binds (a pointer and a shape)."""

    def __init__(self, base: Any, start: int, stop: int, row_bytes: int):
        self.base, self.start = base, start
        self.ptr = base.ptr + start * row_bytes
        self.shape = (stop - start, *tuple(base.shape)[1:])


class DeviceKVCache:
    """The KV-cache protocol (runtime/kv_cache.py) over device buffers [rows, Hkv, max_seq_len, D].

    It does not grow along the sequence: the engine's profiles pin past_len to max_seq_len
    (trt/profiles.py). Rows are views into one pool, so a batch of b rows binds the first b rows of the
    backend's max-batch cache instead of a cache of its own. Copies run on the backend's stream.
    Untested on TensorRT."""

    def __init__(self, backend: "TrtBackend", buffers: dict[str, Any], start: int, stop: int):
        self._backend = backend
        self._buffers = buffers  # name -> polygraphy DeviceArray [pool rows, Hkv, max_seq_len, D]
        self._start = start
        self.batch = stop - start
        self.capacity = backend.spec.max_seq_len
        self.version = 0
        self._row_bytes = {n: int(np.prod(tuple(buf.shape)[1:])) * io_spec.ITEMSIZE[backend.dtype_of(n)]
                           for n, buf in buffers.items()}
        self.arrays = {n: _DeviceRows(buf, start, stop, self._row_bytes[n]) for n, buf in buffers.items()}

    def reserve(self, needed: int) -> int:
        return self.capacity

    def fit(self, needed: int) -> int:
        return self.capacity

    def reserve_rows(self, rows: int, limit: int) -> int:
        if rows > self.batch:
            raise InferenceError(f"{rows} rows exceed this device cache's {self.batch}: report this as a qwen2edge bug")
        return self.batch

    def view(self, start: int, stop: int) -> "DeviceKVCache":
        return DeviceKVCache(self._backend, self._buffers, self._start + start, self._start + stop)

    def write(self, presents: Mapping[str, Any], write_pos: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Device-to-device copies of each row's new keys/values (device buffers in `presents`)."""
        for name, dst in self.arrays.items():
            src = presents[io_spec.present_name(name)]
            seq = int(tuple(src.shape)[2])
            b, h, length, d = dst.shape
            for dst_off, src_off, n in kv_copy_plan(b, h, length, d, seq, io_spec.ITEMSIZE[self._backend.dtype_of(name)],
                                                    write_pos, counts):
                self._backend.copy_d2d(dst.ptr + dst_off, src.ptr + src_off, n)

    def move_row(self, src: int, dst: int) -> None:
        for name, rows in self.arrays.items():
            n = self._row_bytes[name]
            self._backend.copy_d2d(rows.ptr + dst * n, rows.ptr + src * n, n)

    def copy_rows_from(self, src: "DeviceKVCache", src_row: int, dst_row: int, slots: int) -> None:
        """Slots [0, slots) of `src`'s row into row `dst_row`: one device-to-device copy per KV head (the
        two caches may differ in capacity)."""
        for name, dst in self.arrays.items():
            other = src.arrays[name]
            _, heads, dst_len, d = dst.shape
            src_len = other.shape[2]
            if slots > min(src_len, dst_len):
                raise InferenceError(f"copying {slots} slots between caches of {src_len} and {dst_len}: report this "
                                     "as a qwen2edge bug")
            item = io_spec.ITEMSIZE[self._backend.dtype_of(name)]
            for h in range(heads):
                self._backend.copy_d2d(dst.ptr + ((dst_row * heads + h) * dst_len) * d * item,
                                       other.ptr + ((src_row * heads + h) * src_len) * d * item, slots * d * item)

    def snapshot(self, row: int, slots: int) -> "DeviceKVCache":
        """A one-row cache of its own ([1, Hkv, slots, D] device buffers, outside the pool) holding slots
        [0, slots) of `row`."""
        buffers = {}
        for name, rows in self.arrays.items():
            shape = (1, rows.shape[1], slots, rows.shape[3])
            buffers[name] = self._backend.device_array(name, shape)
        copy = DeviceKVCache(self._backend, buffers, 0, 1)
        copy.capacity = slots
        copy.copy_rows_from(self, row, 0, slots)
        return copy

    @property
    def nbytes(self) -> int:
        return self.batch * sum(self._row_bytes.values())

    def reset(self) -> None:
        for name, rows in self.arrays.items():
            self._backend.zero(rows.ptr, self.batch * self._row_bytes[name])


class TrtBackend(Backend):
    """Runs bundle/engine/model.plan with TensorRT's name-based I/O API (execute_async_v3)."""

    name = "trt"
    # Static batches only: in-flight batching steps over changing row counts, which the engine's
    # profiles allow, but the path has never run on TensorRT.
    in_flight_batching = False

    @classmethod
    def from_bundle(cls, bundle: Any, engine_dir: str | Path | None = None) -> "TrtBackend":
        """Open the bundle's engine after checking it was built here (TensorRT version, GPU, ONNX)."""
        engine_dir = Path(engine_dir) if engine_dir else Path(bundle.path) / ENGINE_DIR
        if not (engine_dir / MANIFEST).is_file():
            raise InferenceError(f"{bundle.path} has no TensorRT engine: run `qwen2edge build-engine {bundle.path}` "
                                 "on this device first")
        manifest = read_manifest(engine_dir)  # verifies the plan's checksum
        trt = _import_trt()
        from ..trt.device import gpu_info

        onnx_sha = bundle.manifest.model_digest
        check_engine_matches(manifest, trt.__version__, gpu_info(), onnx_sha, str(bundle.path))
        profiles = [Profile.from_dict(p) for p in manifest["profiles"]]
        return cls(trt, engine_dir / manifest.get("plan_file", PLAN_FILE), bundle.spec, profiles, str(bundle.path))

    def __init__(self, trt: Any, plan_path: Path, spec: IOSpec, profiles: Sequence[Profile], where: str = ""):
        super().__init__(spec)
        from polygraphy import cuda as pcuda

        self._cuda = pcuda
        self.trt = trt
        self.profiles = list(profiles)
        where = where or str(plan_path.parent.parent)
        self._runtime = trt.Runtime(trt_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise InferenceError(f"TensorRT could not deserialize {plan_path}: rebuild the engine on this device")
        self._dtypes = check_engine_io(self.engine, trt, spec, self.profiles, where)  # buffers follow the engine
        self.max_batch = engine_max_batch(self.profiles)
        self.context = new_context(self.engine, where)
        self.stream = pcuda.Stream()  # non-default: copies and execution are ordered on it
        self._profile: int | None = None
        self._outputs = [t.name for t in spec.outputs]
        self._buffers: dict[str, Any] = {}
        self._pool: dict[str, Any] = {}  # one cache of the largest batch asked for; batches bind its first rows
        self._pool_rows = 0

    # ---- buffers --------------------------------------------------------------------------------

    def _dtype(self, name: str) -> Any:
        from polygraphy.datatype import DataType

        return {"float32": DataType.FLOAT32, "float16": DataType.FLOAT16, "bfloat16": DataType.BFLOAT16,
                "int64": DataType.INT64}[self._dtypes[name]]

    def _buffer(self, name: str, shape: tuple[int, ...]) -> Any:
        buf = self._buffers.get(name)
        if buf is None:
            # Created at one element: a tensor with a 0 dimension still gets a real (non-null) address,
            # which set_tensor_address requires; resize() below never shrinks the allocation.
            buf = self._buffers[name] = self._cuda.DeviceArray(shape=(1,), dtype=self._dtype(name))
        return buf.resize(shape)  # reallocates only when growing

    # ---- Backend --------------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int | None = None, bucket: int = 0) -> DeviceKVCache:
        """Rows [0, batch) of one full-size device pool, zeroed (0 * NaN garbage is NaN); `capacity` and
        `bucket` are ignored: the cache does not grow. The pool grows to the largest batch asked for."""
        if not 1 <= batch <= self.max_batch:
            raise InferenceError(f"a batch of {batch} rows is outside this engine's 1..{self.max_batch}: rebuild with "
                                 f"`qwen2edge build-engine BUNDLE --max-batch {batch}` or send fewer prompts at once")
        if self._pool_rows < batch:
            for buf in self._pool.values():
                buf.free()
            self._pool = {}
            for t in self.spec.cache_inputs:
                shape = (batch, t.shape[1], self.spec.max_seq_len, t.shape[3])  # past_len may be symbolic
                self._pool[t.name] = self._cuda.DeviceArray(shape=shape, dtype=self._dtype(t.name))
            self._pool_rows = batch
        cache = DeviceKVCache(self, self._pool, 0, batch)
        cache.reset()
        return cache

    def device_array(self, name: str, shape: tuple[int, ...]) -> Any:
        """A new device buffer for input `name` (freed with the Python object)."""
        return self._cuda.DeviceArray(shape=shape, dtype=self._dtype(name))

    def dtype_of(self, name: str) -> str:
        """Element type of an input or output as the engine has it (checked against the bundle at load)."""
        return self._dtypes[name]

    def copy_d2d(self, dst: int, src: int, nbytes: int) -> None:
        self._cuda.wrapper().memcpy(dst, src, nbytes, self._cuda.MemcpyKind.DeviceToDevice, self.stream.ptr)

    def zero(self, ptr: int, nbytes: int) -> None:
        zeros = np.zeros(nbytes, dtype=np.uint8)
        self._cuda.wrapper().memcpy(ptr, zeros.ctypes.data, nbytes, self._cuda.MemcpyKind.HostToDevice, self.stream.ptr)
        self.stream.synchronize()  # `zeros` must outlive the copy

    def _bind_and_run(self, host: Mapping[str, np.ndarray], device: Mapping[str, Any]) -> None:
        shapes = {n: a.shape for n, a in host.items()} | {n: tuple(a.shape) for n, a in device.items()}
        idx = select_profile(self.profiles, shapes)
        if idx != self._profile:
            set_profile(self.context, idx, self.stream.ptr)
            self._profile = idx
        keep = []  # host arrays must outlive their async copies (synchronized in the caller)
        for name, arr in host.items():
            want = io_spec.NUMPY_DTYPES.get(self._dtypes[name])
            arr = np.ascontiguousarray(arr if want is None else arr.astype(want, copy=False))
            keep.append(arr)
            buf = self._buffer(name, arr.shape)
            buf.copy_from(arr, self.stream)
            bind_input(self.context, name, arr.shape, buf.ptr)
        for name, arr in device.items():
            bind_input(self.context, name, tuple(arr.shape), arr.ptr)
        for name in self._outputs:
            bind_address(self.context, name, self._buffer(name, output_shape(self.context, name)).ptr)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise InferenceError("TensorRT failed to run the engine (see its log above): rebuild the engine, and "
                                 "report it if the failure persists")
        self._keep = keep

    def step(self, cache: DeviceKVCache, feed: dict[str, np.ndarray], write_pos: np.ndarray) -> np.ndarray:
        """One prefill/decode step: run, write presents into the device cache, return host logits."""
        self._bind_and_run(feed, cache.arrays)
        cache.write(self._buffers, write_pos, new_token_counts(feed))
        logits = np.empty(tuple(self._buffers[io_spec.LOGITS].shape), dtype=np.float32)
        self._buffers[io_spec.LOGITS].copy_to(logits, self.stream)
        self.stream.synchronize()
        return logits

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The raw graph on host arrays (cache included); outputs back on the host (bf16 as raw uint16)."""
        self._bind_and_run(feed, {})
        out = {}
        for name in self._outputs:
            buf = self._buffers[name]
            want = io_spec.NUMPY_DTYPES.get(self._dtypes[name])
            host = np.empty(tuple(buf.shape), dtype=want or np.uint16)
            if want is None:  # bf16: numpy has no such dtype, so copy the raw bits
                self._cuda.wrapper().memcpy(host.ctypes.data, buf.ptr, host.nbytes,
                                            self._cuda.MemcpyKind.DeviceToHost, self.stream.ptr)
            else:
                buf.copy_to(host, self.stream)
            out[name] = host
        self.stream.synchronize()
        return out

    def close(self) -> None:
        for buf in self._buffers.values():
            buf.free()
        for buf in self._pool.values():
            buf.free()
        self._buffers, self._pool, self._pool_rows = {}, {}, 0
        self.stream.free()
        self.context = self.engine = None


def _import_trt() -> Any:
    return import_tensorrt(InferenceError, "; or set {opt:backend} to ort")
