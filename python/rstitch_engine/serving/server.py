"""Running the HTTP app: `serve` (the `rstitch serve` command, blocking) and `ServerThread` (uvicorn in a
background thread on the loopback, for tests and `rstitch bench serve --slm/--llm`)."""
from __future__ import annotations

import ipaddress
import threading
import time

import uvicorn

from ..async_engine import AsyncEngine
from .app import ServerConfig, build_app

LOOPBACK = "127.0.0.1"
API_KEY_ENV = "RSTITCH_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume others can reach it
        return False


def serve(engine, config: ServerConfig, *, host: str = LOOPBACK, port: int = 8000, log_level: str = "info") -> None:
    """Serves `engine` until interrupted; the step thread stops with the server."""
    online = AsyncEngine(engine)
    try:
        uvicorn.run(build_app(online, config), host=host, port=port, log_level=log_level)
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
