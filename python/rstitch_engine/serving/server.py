"""Running the HTTP app: `serve` (the `rstitch serve` command, blocking; SIGTERM drains gracefully) and
`ServerThread` (uvicorn in a background thread on the loopback, for tests and `rstitch bench serve
--slm/--llm`)."""
from __future__ import annotations

import signal
import threading
import time

import uvicorn

from ..async_engine import AsyncEngine
from . import SHUTDOWN_TIMEOUT_S
from .app import ServerConfig, build_app

LOOPBACK = "127.0.0.1"


DRAIN_POLL_S = 0.1


class _DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM as a graceful shutdown (as a load balancer or Kubernetes stops a replica): new
    requests get 503 with Retry-After at once, running ones may finish within `shutdown_timeout` s, the rest
    are then aborted, and the server exits normally (status 0). Ctrl-C (SIGINT) stops at once, as before."""

    def __init__(self, config: uvicorn.Config, online: AsyncEngine, shutdown_timeout: float):
        super().__init__(config)
        self.online, self.shutdown_timeout = online, shutdown_timeout

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM:
            return super().handle_exit(sig, frame)
        if not self.config.app.state.draining:  # a second SIGTERM changes nothing
            self.config.app.state.draining = True
            threading.Thread(target=self._drain, name="rstitch-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.online.num_running + self.online.num_waiting and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_S)
        self.online.shutdown()  # aborts what still runs; its streams end
        self.should_exit = True  # not handle_exit: uvicorn would re-raise the SIGTERM after stopping


def serve(engine, config: ServerConfig, *, host: str = LOOPBACK, port: int = 8000, log_level: str = "info",
          shutdown_timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Serves `engine` until interrupted (Ctrl-C) or terminated (SIGTERM: drains first, see _DrainingServer);
    the step thread stops with the server."""
    online = AsyncEngine(engine)
    server = _DrainingServer(uvicorn.Config(build_app(online, config), host=host, port=port, log_level=log_level),
                             online, shutdown_timeout)
    try:
        server.run()
    except KeyboardInterrupt:  # some uvicorn versions re-raise the Ctrl-C they handled: a normal stop
        pass
    finally:
        online.shutdown()


class ServerThread:
    """`with ServerThread(engine, config) as server:` a server on 127.0.0.1 at a free port (`server.url`),
    stopped (and its step thread with it) on exit."""

    def __init__(self, engine, config: ServerConfig, *, log_level: str = "warning", timeout_s: float = 60.0):
        self.online = AsyncEngine(engine)
        self.app = build_app(self.online, config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=LOOPBACK, port=0, log_level=log_level,
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="rstitch-http", daemon=True)
        self.timeout_s = timeout_s
        self.url = ""

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{LOOPBACK}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout_s)
        self.online.shutdown()
