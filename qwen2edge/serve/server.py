"""`qwen2edge serve`: open a bundle, build the app, run uvicorn with a graceful shutdown."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

from ..errors import InputError
from ..runtime.api import load_generator
from .app import ServeSettings, create_app


class _Server:
    """uvicorn.Server whose SIGINT/SIGTERM drain in-flight requests and then return normally.

    Stock uvicorn re-raises the signal after shutting down, so the process would die of it (exit
    130/143); a supervisor should see a clean exit 0 after a requested, completed drain.
    """

    def __new__(cls, config):  # subclass lazily so importing this module does not need uvicorn
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                handled = (signal.SIGINT, signal.SIGTERM)
                original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
                try:
                    yield
                finally:
                    for sig, handler in original.items():
                        signal.signal(sig, handler)

        return Server(config)


def _validate(host: str, port: int, max_concurrency: int, max_batch: int, max_queue: int,
              shutdown_timeout: float) -> None:
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {port}: pick a free TCP port")
    for flag, value, low in (("--max-concurrency", max_concurrency, 1), ("--max-batch", max_batch, 1),
                             ("--max-queue", max_queue, 0)):
        if value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}: pass a larger value")
    if shutdown_timeout < 0:
        raise InputError(f"--shutdown-timeout must be >= 0, got {shutdown_timeout}: pass seconds to drain")
    if not host:
        raise InputError("--host is empty: pass 127.0.0.1 (local only) or 0.0.0.0 (all interfaces)")


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"--host {host!r} does not resolve ({exc.strerror}): pass an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(addr)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}): free the port or pass --port") from None


def serve(bundle_dir: str | Path, backend: str = "ort", host: str = "127.0.0.1", port: int = 8000,
          max_concurrency: int = 8, max_batch: int = 8, max_queue: int = 64, api_key: str | None = None,
          model_name: str | None = None, shutdown_timeout: float = 30.0, batching: str = "in-flight",
          progress: Callable[[str], None] = lambda msg: None) -> None:
    """Serve a bundle under the OpenAI API until SIGINT/SIGTERM; then drain for up to `shutdown_timeout`
    seconds, cancel what is left, and return."""
    _validate(host, port, max_concurrency, max_batch, max_queue, shutdown_timeout)
    try:
        import uvicorn
    except ImportError:
        raise InputError("serving needs FastAPI and uvicorn: pip install 'qwen2edge[serve]'") from None
    _check_port(host, port)  # before loading the model, and as one line rather than uvicorn's sys.exit
    bundle, generator = load_generator(bundle_dir, backend)
    name = model_name or Path(bundle_dir).resolve().name
    settings = ServeSettings(model_name=name, api_key=api_key or None, max_concurrency=max_concurrency,
                             max_batch=max_batch, max_queue=max_queue, batching=batching)
    app = create_app(bundle, generator, settings, on_ready=lambda: progress(
        f"serving {name!r} ({backend}, max_seq_len {bundle.max_seq_len}) at http://{host}:{port}/v1 "
        f"- {state.scheduler.workers} worker(s) x batch {state.scheduler.max_batch} "
        f"({'in-flight' if state.scheduler.in_flight else 'static'}), queue {max_queue}"
        f"{', API key required' if api_key else ''}; Ctrl-C drains and stops"))
    state = app.state.qwen2edge
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    server = _Server(config)
    server.run()
    progress("server stopped")
