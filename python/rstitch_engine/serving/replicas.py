"""`rstitch serve --replicas N`: N engine replicas as one Ray Serve application behind one OpenAI-compatible
ingress (docs/design.md, 'Replicas on Ray Serve').

Ray Serve LLM's extension point (`LLMConfig(server_cls=...)` + `build_openai_app`) speaks vLLM's request and
response classes (ray.serve.llm imports them from vllm), so this is a deployment and an ingress of our own on
Ray Serve's public API:

- `EngineReplica` (N replicas): an Engine, its AsyncEngine and the same FastAPI app as `rstitch serve`
  (serving/app.py), called in-process over ASGI; every response's `rstitch` stats name the replica. Its
  `check_health` is the step loop's health, so Ray Serve replaces a replica whose engine failed, as it does one
  whose process died. GPUs per replica: the tensor-parallel size, in one placement-group bundle.
- `Ingress` (one replica, no GPU): reads the body (413 past the limit), forwards the request through a
  deployment handle (Ray Serve routes it, power of two choices) and streams the answer back. Each replica
  takes `max_num_seqs` requests at once (`max_ongoing_requests`), the rest wait in the handle's queue; the
  one ingress counts the requests in the application, so `--max-waiting` bounds the application's queue:
  past every replica's `max_num_seqs` plus `--max-waiting`, a 503 with Retry-After in OpenAI's error shape
  (Ray Serve's own `max_queued_requests` also counts requests a free replica is about to take, so a burst
  would be refused with replicas idle). A replica that dies fails its requests with a 503 (not started)
  or an error event (streaming); nothing hangs.
- `MetricsHub` (a Ray actor): each replica pushes its Prometheus exposition every METRICS_PUSH_S; the
  ingress's /metrics is their union, every series labelled with its `replica` (sum over it for the
  application). A replica silent for METRICS_STALE_S (dead, replaced) leaves it.
"""

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import RayError

from . import MAX_REQUEST_BYTES, SHUTDOWN_TIMEOUT_S
from .app import RETRY_AFTER_S, ServerConfig, error_response, read_body, sse
from .openai_request import APIError

APP_NAME = "rstitch"
METRICS_PUSH_S = 0.5
METRICS_STALE_S = 5.0
HEALTH_CHECK_PERIOD_S = 2.0
START_TIMEOUT_S = 600.0
# The ingress only forwards: it takes every request at once (Ray Serve's default of 5 would queue the rest
# at the proxy, unbounded, before the ingress could count them)
INGRESS_MAX_ONGOING = 100_000
MIN_OBJECT_STORE_BYTES = 100 * 2**20  # Ray's object store carries only requests and chunks here
# A Ray started here: no usage reporting; a proxy that takes more than Ray Serve's 5 s to come up on a busy
# machine is not killed and restarted over and over
LOCAL_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def replica_resources(device: str, tensor_parallel_size: int) -> dict:
    """Ray Serve options that reserve one replica's devices: its tensor-parallel ranks' GPUs (CUDA) or CPUs,
    in one bundle so that the ranks share a node."""
    unit = "GPU" if str(device).startswith("cuda") else "CPU"
    bundle = {"CPU": 1, "GPU": tensor_parallel_size} if unit == "GPU" else {"CPU": tensor_parallel_size}
    return {"placement_group_bundles": [bundle], "placement_group_strategy": "STRICT_PACK"}


@ray.remote(num_cpus=0)
class MetricsHub:
    """The replicas' latest Prometheus expositions, served as one."""

    def __init__(self):
        self.snapshots: dict[str, tuple[float, str]] = {}

    def report(self, replica: str, text: str) -> None:
        self.snapshots[replica] = (time.monotonic(), text)

    def render(self) -> bytes:
        fresh = {r: text for r, (at, text) in self.snapshots.items() if time.monotonic() - at <= METRICS_STALE_S}
        return merged_exposition(fresh)


def merged_exposition(by_replica: dict[str, str]) -> bytes:
    """One Prometheus exposition of several, each sample labelled with its replica."""
    families: dict[str, object] = {}
    for replica, text in sorted(by_replica.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, family)
            samples = [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
            if merged is family:
                family.samples = samples
            else:
                merged.samples += samples

    class Snapshot:
        def collect(self):
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)


@serve.deployment
class EngineReplica:
    def __init__(self, engine_kwargs: dict, server: ServerConfig, hub):
        from ..api import Engine
        from ..async_engine import AsyncEngine
        from .app import build_app

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.online = AsyncEngine(Engine(**engine_kwargs))
        server.replica, server.max_waiting = self.replica, None  # the ingress's handle queues for the application
        self.app = build_app(self.online, server)
        self.hub = hub
        self._pusher = threading.Thread(target=self._push_metrics, name="rstitch-metrics", daemon=True)
        self._stop = threading.Event()
        self._pusher.start()

    def _push_metrics(self) -> None:
        registry = self.app.state.metrics.registry
        while not self._stop.wait(METRICS_PUSH_S):
            with contextlib.suppress(RayError):  # the hub goes first at shutdown
                ray.get(self.hub.report.remote(self.replica, generate_latest(registry).decode()))

    def check_health(self) -> None:
        if not self.online.healthy:
            raise RuntimeError(f"replica {self.replica}: the engine's step loop failed: {self.online.error!r}")

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """The app's answer to one HTTP request: {"status", "headers"}, then the body's pieces. If
        the caller goes away (cancelled), the app sees the client disconnect and aborts the request."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query,
                 "headers": headers, "client": ("ingress", 0), "server": ("replica", 0)}
        gone, delivered = asyncio.Event(), False
        messages: asyncio.Queue = asyncio.Queue()

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        app = asyncio.create_task(self.app(scope, receive, messages.put))
        app.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
                    yield {"status": message["status"], "headers": headers}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
        finally:
            gone.set()
            with contextlib.suppress(Exception):  # the app answered already; uvicorn would only log it
                await asyncio.wait_for(app, SHUTDOWN_TIMEOUT_S)

    def __del__(self):  # Ray Serve stops the replica: abort what still runs, stop the step thread
        self._stop.set()
        self.online.shutdown()
        self.online.engine.close()


def replica_failed(e: BaseException) -> APIError:
    return APIError(f"the replica serving this request failed ({type(e).__name__}); retry: Ray Serve replaces it",
                    status=503, type="ServiceUnavailableError", headers={"Retry-After": str(RETRY_AFTER_S)})


async def _rest(answer, streaming: bool, done):
    """The body's pieces after the start; a replica that dies mid-stream ends an event stream with an error
    event (a plain body is cut short: its length no longer matches). Cancelled: the replica aborts. `done()`
    when it ends, however."""
    try:
        async for piece in answer:
            yield piece
    except RayError as e:
        if streaming:
            yield sse(replica_failed(e).body()).encode()
    finally:
        answer.cancel()
        done()


ingress_app = FastAPI(title="rstitch-engine", docs_url=None, redoc_url=None)


# serve.ingress copies the app as it is here: what its routes call is defined above
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, engines, hub, max_request_bytes: int, capacity: int | None):
        self.engines, self.hub, self.max_request_bytes = engines, hub, max_request_bytes
        self.capacity = capacity  # requests running or waiting in the application at most (None: no limit)
        self.in_flight = 0        # forwarded /v1/ POSTs whose answer has not ended

    @ingress_app.get("/metrics")
    async def metrics(self):
        return Response(await self.hub.render.remote(), media_type=CONTENT_TYPE_LATEST)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, path: str, request: Request):
        try:
            body = await read_body(request, self.max_request_bytes)
        except APIError as e:
            return error_response(e)
        counted = request.method == "POST" and path.startswith("v1/")
        if counted and self.capacity is not None and self.in_flight >= self.capacity:
            return error_response(APIError(f"{self.in_flight} requests run or wait in the application already "
                                           f"(every replica's --max-num-seqs plus --max-waiting); retry later",
                                           status=503, type="ServiceUnavailableError",
                                           headers={"Retry-After": str(RETRY_AFTER_S)}))
        self.in_flight += counted

        def done() -> None:
            self.in_flight -= counted

        answer = self.engines.options(stream=True).forward.remote(
            request.method, request.url.path, request.url.query.encode(), request.headers.raw, body)
        try:
            start = await answer.__anext__()
        except RayError as e:
            done()
            return error_response(replica_failed(e))
        except BaseException:
            done()
            raise
        streaming = dict(start["headers"]).get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(_rest(answer, streaming, done), status_code=start["status"],
                                 headers=dict(start["headers"]))


@dataclass
class ReplicaOptions:
    replicas: int
    host: str = "127.0.0.1"
    port: int = 8000
    ray_address: str | None = None  # None: start Ray here, stopped with the application
    max_waiting: int | None = None  # the application's queue beyond the replicas' running requests
    max_request_bytes: int = MAX_REQUEST_BYTES
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S
    start_timeout_s: float = START_TIMEOUT_S  # replicas not all running by then: an error, not a wait forever
    ray_init: dict = field(default_factory=dict)  # more ray.init arguments (tests: fewer CPUs)


class ReplicaApplication:
    """`with ReplicaApplication(engine_kwargs, server, options) as app:` N replicas behind `app.url`; on exit
    (or an error while starting) the application is deleted and a Ray started here is stopped."""

    def __init__(self, engine_kwargs: dict, server: ServerConfig, options: ReplicaOptions):
        from ..engine_config import EngineConfig

        if options.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {options.replicas}")
        if options.max_waiting is not None and options.max_waiting < 0:
            raise ValueError(f"--max-waiting must be >= 0, got {options.max_waiting}")
        self.config = EngineConfig(**engine_kwargs)  # bad options fail here, not in every replica
        self.engine_kwargs, self.server, self.options = engine_kwargs, server, options
        self.url = f"http://{options.host}:{options.port}"
        self.device = "cpu"  # decided when Ray is up (the cluster's GPUs)
        self._started_ray = False

    def __enter__(self) -> "ReplicaApplication":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        o = self.options
        if o.ray_address is None:
            for name, value in LOCAL_RAY_ENV.items():  # read by the processes ray.init starts
                os.environ.setdefault(name, value)
            # CPU ranks each reserve a CPU: enough logical CPUs for every replica (they may share cores)
            cpus = max(os.cpu_count() or 1, o.replicas * self.config.tensor_parallel_size)
            ray.init(**{"num_cpus": cpus, "include_dashboard": False, "object_store_memory": MIN_OBJECT_STORE_BYTES,
                        "log_to_driver": False, **o.ray_init})
            self._started_ray = True
        else:
            ray.init(address=o.ray_address, **o.ray_init)
        # as the engine: CUDA when the replicas have GPUs to use, unless --device says otherwise
        self.device = str(self.config.device or ("cuda" if ray.cluster_resources().get("GPU", 0) else "cpu"))
        serve.start(http_options={"host": o.host, "port": o.port})
        hub = MetricsHub.options(name=f"{APP_NAME}-metrics", get_if_exists=True).remote()
        engines = EngineReplica.options(
            num_replicas=o.replicas, max_ongoing_requests=self.config.max_num_seqs,
            health_check_period_s=HEALTH_CHECK_PERIOD_S, graceful_shutdown_timeout_s=o.shutdown_timeout,
            **replica_resources(self.device, self.config.tensor_parallel_size)
        ).bind(self.engine_kwargs, self.server, hub)
        capacity = None if o.max_waiting is None else o.replicas * self.config.max_num_seqs + o.max_waiting
        self._deploy(Ingress.options(max_ongoing_requests=INGRESS_MAX_ONGOING).bind(
            engines, hub, o.max_request_bytes, capacity))

    def _deploy(self, app) -> None:
        """serve.run, which waits for every replica for as long as it takes (forever when the cluster lacks
        the devices), bounded by start_timeout_s."""
        failure: list[BaseException] = []

        def run() -> None:
            try:
                serve.run(app, name=APP_NAME, route_prefix="/")
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                failure.append(e)

        deploying = threading.Thread(target=run, name="rstitch-deploy", daemon=True)
        deploying.start()
        deploying.join(self.options.start_timeout_s)
        if deploying.is_alive():
            status = serve.status().applications.get(APP_NAME)
            why = "; ".join(f"{name}: {d.status} {d.message}".strip() for name, d in status.deployments.items()) \
                if status else "not deployed"
            raise TimeoutError(f"the {self.options.replicas} replicas did not start within "
                               f"{self.options.start_timeout_s:g} s ({why}); each needs "
                               f"{replica_resources(self.device, self.config.tensor_parallel_size)['placement_group_bundles']}")
        if failure:
            raise RuntimeError(f"the replicas failed to start: {failure[0]}") from failure[0]

    def close(self) -> None:
        """Stops the application: with a Ray started here, Serve and Ray; on a cluster given by address, only
        this application (other applications on it keep running), then disconnects."""
        if ray.is_initialized():
            with contextlib.suppress(Exception):  # Serve may be gone already (an error while starting)
                if self._started_ray:
                    serve.shutdown()
                else:
                    serve.delete(APP_NAME)
            ray.shutdown()
            self._started_ray = False


def serve_replicas(engine_kwargs: dict, server: ServerConfig, options: ReplicaOptions) -> None:
    """`rstitch serve --replicas N`: serves until Ctrl-C or SIGTERM (each replica drains for shutdown_timeout
    s), then stops the application, and Ray when it was started here."""
    stop = threading.Event()
    try:
        with ReplicaApplication(engine_kwargs, server, options) as app:
            print(f"{options.replicas} replicas ready: {app.url}/v1", file=sys.stderr, flush=True)
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())  # after ray.init, which sets its own
            try:
                while not stop.wait(1.0):  # a timed wait, so that Ctrl-C interrupts it
                    pass
            finally:
                signal.signal(signal.SIGTERM, previous)
    except KeyboardInterrupt:
        pass
