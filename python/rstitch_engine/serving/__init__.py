"""Online serving: the OpenAI-compatible HTTP server (app.py) with its request checks (protocol.py) and
Prometheus metrics (metrics.py), how it is run (server.py), and the client-side load generator
(bench_serve.py). Needs the `serve` extra: pip install -e '.[serve]'."""
