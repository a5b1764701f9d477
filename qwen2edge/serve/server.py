"""`qwen2edge serve`: open a bundle, build the app, run uvicorn with a graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import InputError
from ..runtime.bundle import Bundle
from .app import create_app
from .settings import ServeSettings

# After --shutdown-timeout the generations still running are cancelled; this long is left for their
# 503 bodies and final error events to go out before uvicorn closes what is left.
SHUTDOWN_GRACE_S = 5.0


class _Server:
    """uvicorn.Server whose SIGINT/SIGTERM drain in-flight requests and then return normally.

    Stock uvicorn re-raises the signal after shutting down, so the process would die of it (exit
    130/143); a supervisor should see a clean exit 0 after a requested, completed drain.

    When the drain takes longer than `drain_s`, `on_deadline` cancels the generations (each request then
    ends with an OpenAI error); uvicorn's own timeout, SHUTDOWN_GRACE_S later, would otherwise cut streams
    without an error event and answer plain-text 500s.
    """

    def __new__(cls, config: Any, drain_s: float, on_deadline: Callable[[], None]):
        import uvicorn  # subclassed lazily so importing this module does not need uvicorn

        class Server(uvicorn.Server):
            async def shutdown(self, sockets: Any = None) -> None:
                timer = asyncio.get_running_loop().call_later(drain_s, on_deadline)
                try:
                    await super().shutdown(sockets)
                finally:
                    timer.cancel()

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


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"{{opt:host}} {host!r} does not resolve ({exc.strerror}): pass an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(addr)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}): free the port or pass another {{opt:port}}") from None


def serve(bundle_dir: str | Path, settings: ServeSettings = ServeSettings(),
          progress: Callable[[str], None] = lambda msg: None) -> None:
    """Serve a bundle under the OpenAI API until SIGINT/SIGTERM; then drain for up to
    `settings.shutdown_timeout` seconds, cancel what is left, and return."""
    settings.check()
    try:
        import uvicorn
    except ImportError:
        raise InputError("serving needs FastAPI and uvicorn: pip install 'qwen2edge[serve]'") from None
    _check_port(settings.host, settings.port)  # before loading the model, and as one line rather than uvicorn's exit
    bundle = Bundle.open(bundle_dir)
    generator = bundle.generator(settings.backend)
    settings = settings.replace(model_name=settings.model_name or Path(bundle_dir).resolve().name)
    app = create_app(bundle, generator, settings, on_ready=lambda: progress(_banner(app.state.qwen2edge, settings)))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=settings.shutdown_timeout + SHUTDOWN_GRACE_S, lifespan="on")
    _Server(config, settings.shutdown_timeout, app.state.qwen2edge.scheduler.abort).run()
    progress("server stopped")


def _speedups(sched, settings: ServeSettings) -> str:
    parts = []
    if sched.speculator_factory is not None:
        spec = settings.speculative_config()
        parts.append(f"speculative {spec.method} K={spec.num_tokens}")
    if sched.in_flight and sched.prefix_cache is not None:
        parts.append(f"prefix cache {settings.prefix_cache_mb} MB")
    if sched.in_flight and sched.prefill_chunk:
        parts.append(f"prefill chunks of {sched.prefill_chunk} positions")
    return "".join(f", {p}" for p in parts)


def _banner(state, settings: ServeSettings) -> str:
    sched = state.scheduler
    return (f"serving {settings.model_name!r} ({settings.backend}, max_seq_len {state.bundle.max_seq_len}) at "
            f"http://{settings.host}:{settings.port}/v1 - {sched.workers} worker(s) x batch {sched.max_batch} "
            f"({'in-flight' if sched.in_flight else 'static'}), queue {settings.max_queue}"
            f"{_speedups(sched, settings)}"
            f"{', API key required' if settings.api_key else ''}; Ctrl-C drains and stops")
