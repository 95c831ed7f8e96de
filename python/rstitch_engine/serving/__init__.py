"""Online serving: the OpenAI-compatible HTTP server (app.py) with its request checks (protocol.py) and
Prometheus metrics (metrics.py), how it is run (server.py), and the client-side load generator
(bench_serve.py). Needs the `serve` extra: pip install -e '.[serve]'. This module holds what the CLI reads
without that extra: the server's defaults and the loopback test."""
from __future__ import annotations

import ipaddress

API_KEY_ENV = "RSTITCH_API_KEY"  # the API key, kept out of process listings
MAX_REQUEST_BYTES = 8 * 2**20  # the default body limit: a 128k-token prompt as JSON is well below it
SHUTDOWN_TIMEOUT_S = 30.0  # on SIGTERM, how long running requests may take to finish


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: assume others can reach it
        return False
