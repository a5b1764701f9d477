"""One Triton model instance: qwen2edge's generator behind the Python backend's decoupled API.

`execute` parses each request (a bad one is answered with an error at once) and hands it to the same
scheduler `qwen2edge serve` uses: one worker thread runs an in-flight batch of up to `max_batch` rows,
so requests arriving together share decode steps. Responses come later, from that worker thread,
through each request's response sender (the decoupled transaction policy allows it), so `execute`
returns as soon as the batch has room for one more request: while it is full, `execute` waits, and
Triton keeps further requests in its own queue and gives them to an instance with room.

Torch-free. `pb` is the backend's `triton_python_backend_utils` module (importable only inside the
backend's stub process, hence passed in).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError, field_spelling
from ..runtime.bundle import Bundle
from ..runtime.generator import Generation
from ..serve.scheduler import Job, Scheduler, ShuttingDown
from .config import ModelSettings
from .protocol import INPUTS, TRITON_FIELDS, RequestError, parse_request

CANCEL_POLL_S = 0.2  # how often a generating request asks Triton whether its client cancelled
UNLOADING = "the model is being unloaded: retry on another instance or server"


@dataclass
class TritonJob(Job):
    """A scheduler job whose events go straight to the request's Triton response sender (no event loop).

    Stream: every text delta is one response (`output_ids` empty), then a final response with empty text
    and every generated id. Otherwise one final response with the whole text and ids."""

    pb: Any = None
    sender: Any = None
    stream: bool = False
    on_end: Callable[[], None] = lambda: None  # called once, after the final response
    _last_poll: float = field(default_factory=time.monotonic)

    def _post(self, kind: str, payload: Any) -> None:
        if kind == "text":
            self._poll_cancel()
            if self.stream and not self.cancelled.is_set():
                self._send(payload, [], final=False)
            return
        try:
            if kind == "done":
                self._finish(payload)
            else:
                self._error(payload)
        finally:
            self.on_end()

    def _finish(self, result: Generation) -> None:
        if result.finish_reason == "cancelled":
            send_error(self.pb, self.sender, "the request was cancelled", "CANCELLED")
        else:
            self._send("" if self.stream else result.text, result.token_ids, final=True)

    def _error(self, exc: BaseException) -> None:
        if isinstance(exc, ShuttingDown):
            send_error(self.pb, self.sender, UNLOADING, "UNAVAILABLE")
        elif isinstance(exc, InputError):
            send_error(self.pb, self.sender, exc.render(field_spelling(TRITON_FIELDS)), "INVALID_ARG")
        else:
            send_error(self.pb, self.sender, f"generation failed: {exc}", "INTERNAL")

    def _poll_cancel(self) -> None:
        now = time.monotonic()
        if now - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = now
            if self.sender.is_cancelled():
                self.cancel()  # the row stops at the next decode step

    def _send(self, text: str, ids: list[int], final: bool) -> None:
        pb = self.pb
        outputs = [pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                   pb.Tensor("output_ids", np.asarray(ids, dtype=np.int64))]
        if not deliver(pb, self.sender, pb.InferenceResponse(output_tensors=outputs), final):
            self.cancel()


def deliver(pb: Any, sender: Any, response: Any, final: bool) -> bool:
    """Send one response; False when the sender is closed (client gone or request cancelled)."""
    try:
        sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
        return True
    except Exception:  # the backend raises its own error type for a closed sender
        return False


def send_error(pb: Any, sender: Any, message: str, code: str) -> None:
    """The request's final response: a Triton error with `code` (a pb.TritonError attribute name)."""
    deliver(pb, sender, pb.InferenceResponse(error=pb.TritonError(message, getattr(pb.TritonError, code))), True)


def read_inputs(pb: Any, request: Any) -> dict[str, np.ndarray]:
    """This request's input tensors as numpy copies (Triton frees them when execute returns)."""
    out = {}
    for spec in INPUTS:
        tensor = pb.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            out[spec.name] = np.array(tensor.as_numpy(), copy=True)
    return out


class ModelInstance:
    """Loads the bundle's generator (checksums verified) and runs a scheduler for this instance."""

    def __init__(self, pb: Any, settings: ModelSettings, version_dir: str | Path):
        self.pb = pb
        bundle_dir = Path(settings.bundle)
        if not bundle_dir.is_absolute():
            bundle_dir = Path(version_dir) / bundle_dir
        options = {"threads": settings.threads} if settings.backend == "ort" and settings.threads else {}
        self.bundle = Bundle.open(bundle_dir)  # verifies every file's checksum
        generator = self.bundle.generator(settings.backend, **options)
        self.max_seq_len = self.bundle.max_seq_len
        self.streaming = settings.streaming
        # One worker, max_batch rows; the room semaphore keeps it from holding more requests than rows.
        self.scheduler = Scheduler(generator, max_concurrency=settings.max_batch, max_batch=settings.max_batch,
                                   max_queue=0)
        self._room = threading.BoundedSemaphore(self.scheduler.capacity)
        self.scheduler.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_request(read_inputs(self.pb, request), self.bundle.tokenizer, self.max_seq_len)
                if parsed.stream and not self.streaming:
                    raise RequestError("input 'stream' is true, but this model answers each request once (written "
                                       "with --no-streaming): send stream false, or use a streaming model")
            except RequestError as exc:
                send_error(self.pb, sender, str(exc), "INVALID_ARG")
                continue
            except InputError as exc:
                send_error(self.pb, sender, exc.render(field_spelling(TRITON_FIELDS)), "INVALID_ARG")
                continue
            except Exception as exc:  # a bug must fail this request, never the instance
                send_error(self.pb, sender, f"internal error: {type(exc).__name__}: {exc}", "INTERNAL")
                continue
            self._room.acquire()  # wait for a free row: meanwhile Triton routes requests to other instances
            job = TritonJob(parsed.prompt_ids, parsed.params, None, pb=self.pb, sender=sender,
                            stream=parsed.stream, on_end=self._room.release)
            try:
                self.scheduler.submit(job)
            except ShuttingDown:
                self._room.release()
                send_error(self.pb, sender, UNLOADING, "UNAVAILABLE")

    def close(self) -> None:
        """Cancel waiting and running requests (each gets an error) and stop the worker."""
        self.scheduler.close()
