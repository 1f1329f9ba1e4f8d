"""Loading models into engines and running the app under uvicorn with a graceful drain.

Shutdown (SIGTERM or Ctrl-C): the listening socket closes, every engine stops admitting (a new request on a kept-alive
connection gets 503 + Retry-After) and keeps stepping what it holds; requests that finish within ``drain`` seconds
are answered normally, the rest are cancelled between steps and answered with a 503 "shutting down" error, so no
accepted request is silently dropped. Then the process exits 0.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Callable, Sequence

from .engine import Engine, EngineConfig
from .state import Limits, ServerState

log = logging.getLogger("edgediff.serve")


def load_engines(models: Sequence[tuple[str, Path]], *, backend: str = "cpu", config: EngineConfig = EngineConfig(),
                 metrics=None) -> dict[str, Engine]:
    """Load each bundle (errors are the runtime's one-line BundleError/InputError), start its engine thread, and
    wait for its warm-up. A model whose warm-up fails stops the whole start: a server must not be ready with a
    model that cannot generate."""
    from edgediff import Pipeline

    from .metrics import ServerMetrics

    metrics = metrics or ServerMetrics()
    engines: dict[str, Engine] = {}
    try:
        for name, path, *more in models:  # (name, path[, {lora file: weight}])
            loras = more[0] if more else None
            engines[name] = Engine(name, Pipeline.load(path, backend=backend, loras=loras), config, metrics).start()
        for engine in engines.values():
            engine.ready.wait()
            if engine.failure is not None:
                raise engine.failure
    except BaseException:
        for engine in engines.values():
            engine.shutdown(0)
        raise
    return engines


def make_server(state: ServerState, *, host: str, port: int, drain: float, log_level: str = "warning",
                on_ready: Callable[[], None] | None = None):
    """A uvicorn server for the app over ``state`` whose shutdown drains the engines first."""
    import uvicorn

    from .app import create_app

    app = create_app(state, shutdown_grace=drain)

    class DrainingServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if on_ready is not None and not self.should_exit:
                on_ready()

        async def shutdown(self, sockets=None):
            for engine in state.engines.values():  # stop admitting, finish or fail what is held within `drain`
                engine.shutdown(drain)
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its shutdown, which would end the process with -15 after a clean
            # drain; here a handled SIGTERM/SIGINT ends in a normal exit instead
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    # uvicorn's own wait for open connections is the backstop: the engines answer everything within `drain`
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain + 10,
                            server_header=False, lifespan="on")
    return DrainingServer(config)


def serve(models: Sequence[tuple[str, Path]], *, host: str, port: int, backend: str, config: EngineConfig,
          limits: Limits, api_key: str | None, drain: float, on_loading: Callable[[], None] | None = None,
          on_ready: Callable[[int], None] | None = None) -> None:
    """Bind, load and warm up every model, then serve until SIGTERM/Ctrl-C (see the module doc). ``on_loading``
    is called once the port is held, ``on_ready(port)`` once the server accepts requests."""
    from .metrics import ServerMetrics

    sock = bind(host, port)  # a taken port fails now, not after minutes of loading
    try:
        if on_loading is not None:
            on_loading()
        metrics = ServerMetrics()
        engines = load_engines(models, backend=backend, config=config, metrics=metrics)
        state = ServerState(engines, limits=limits, api_key=api_key, metrics=metrics)
        bound = sock.getsockname()[1]  # the port the OS chose for --port 0
        make_server(state, host=host, port=bound, drain=drain,
                    on_ready=None if on_ready is None else lambda: on_ready(bound)).run(sockets=[sock])
    finally:
        sock.close()


def bind(host: str, port: int):
    """A listening TCP socket on host:port (IPv6 when host is an IPv6 address); one line when it cannot be had."""
    import socket

    from edgediff.errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host") \
            from None
    sock.set_inheritable(True)
    return sock
