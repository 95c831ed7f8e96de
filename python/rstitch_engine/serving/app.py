"""The OpenAI-compatible HTTP server (FastAPI) over an AsyncEngine: /v1/completions, /v1/chat/completions
(streamed as server-sent events or not), /v1/models, /health, /metrics. Conventions: docs/serving.md; the
request fields: serving/openai_request.py.

Beyond OpenAI: the `rstitch` body field routes each request, and every response carries its routing
statistics ("rstitch": LLM share, switches, catch-up and draft counts) beside `usage`; with
`"return_sources": true` the choices and chunks also carry per-token `sources` (0 SLM, 1 LLM) and entropies.

With an API key (`ServerConfig.api_key`, `rstitch serve --api-key` or RSTITCH_API_KEY) every /v1/ request
needs `Authorization: Bearer <key>` (compared in constant time), else 401; /health and /metrics stay open,
as in vLLM.

Limits: a body over `max_request_bytes` is a 413; a request running past `request_timeout_s` is aborted (its
blocks freed) and answered 408, or, once streaming, ends with an error event. While the server drains for a
graceful shutdown (server.py) new requests get 503 with Retry-After.

Status codes: 400 for invalid input (named), 401 without the API key, 404 for an unknown model, 408 past the
request timeout, 413 for a body over the limit, 503 with Retry-After when `max_waiting` requests already wait,
the server is shutting down or the step loop has failed; a request whose model produced NaN/inf
(a server-side failure, not bad input) is a 500 or, once streaming, an error event.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..async_engine import AsyncEngine, EngineDeadError, RequestRejected
from ..checks import InvalidValue
from ..outputs import RequestOutput
from ..policies import Policy
from . import MAX_REQUEST_BYTES
from .metrics import ServerMetrics
from .openai_request import APIError, ParsedRequest, check_lengths, parse_request

ROUTING_STATS = ("slm_tokens", "llm_tokens", "switches_to_llm", "switches_to_slm", "discarded_slm_tokens",
                 "extend_tokens_llm", "extend_tokens_slm", "drafted", "accepted", "llm_wait_steps", "llm_wait_s",
                 "prefix_queries", "prefix_hits_slm", "prefix_hits_llm")
RETRY_AFTER_S = 1


@dataclass
class ServerConfig:
    model_name: str
    default_policy: Policy | None   # of requests that name none (None: the engine's default)
    max_waiting: int | None = None  # 503 once this many requests wait (None: no limit)
    router: str | None = None       # the R-Stitch+ router file requests may use
    api_key: str | None = None      # every /v1/ request must carry it as a bearer token (None: open)
    max_request_bytes: int = MAX_REQUEST_BYTES  # larger bodies: 413
    request_timeout_s: float | None = None      # running longer: aborted, 408 (None: no limit)
    replica: str | None = None      # this server's replica of a Ray Serve application (serving/replicas.py)


def routing_stats(outputs: list[RequestOutput]) -> dict:
    """The `rstitch` field of a response: counts summed over its choices, and the LLM's token share."""
    stats = {k: sum(o.stats.get(k, 0) for o in outputs) for k in ROUTING_STATS}
    produced = stats["slm_tokens"] + stats["llm_tokens"]
    stats["llm_share"] = stats["llm_tokens"] / produced if produced else 0.0
    return stats


def metrics_field(outputs: list[RequestOutput]) -> dict:
    """A response's `metrics` field, in the shape vLLM adopted for per-request speculative decoding:
    {"metrics": {"speculative_decoding": {num_drafts, num_draft_tokens, num_accepted_tokens, acceptance_rate
    (accepted / draft tokens), mean_acceptance_length (1 + accepted / drafts)}}}, summed over the choices;
    {} when no choice drafted."""
    drafts = sum(o.stats.get("verify_steps", 0) for o in outputs)
    draft_tokens = sum(o.stats.get("drafted", 0) for o in outputs)
    accepted = sum(o.stats.get("accepted", 0) for o in outputs)
    if not draft_tokens:
        return {}
    return {"metrics": {"speculative_decoding": {
        "num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens, "mean_acceptance_length": 1 + accepted / drafts}}}


def usage(prompt_tokens: int, outputs: list[RequestOutput] | None = None, completion_tokens: int | None = None) -> dict:
    completion = completion_tokens if completion_tokens is not None else sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def engine_dead(message: str) -> APIError:
    return APIError(message, status=503, type="ServiceUnavailableError")


def generation_failed(output: RequestOutput) -> APIError:
    """A request whose model produced NaN/inf: a server-side failure, not bad input."""
    return APIError(f"generation failed: {output.error}", status=500, type="InternalServerError")


def sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def build_app(online: AsyncEngine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="rstitch-engine", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(config.model_name, online)
    online.listeners.append(metrics.observe)
    app.state.online, app.state.metrics = online, metrics
    app.state.draining = False  # set by a graceful shutdown (server.py): new requests get 503
    engine = online.engine

    if config.api_key is not None:
        expected = f"Bearer {config.api_key}".encode()

        @app.middleware("http")
        async def _authenticate(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if request.url.path.startswith("/v1/") and not hmac.compare_digest(given, expected):
                return error_response(APIError("a valid API key is needed: send 'Authorization: Bearer <key>'",
                                               status=401, type="AuthenticationError"))
            return await call_next(request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # logged by uvicorn; the client gets the shape
        return JSONResponse(APIError(f"internal error: {type(e).__name__}: {e}", status=500,
                                     type="InternalServerError").body(), status_code=500)

    @app.get("/health")
    async def health():
        if online.healthy:
            return Response(status_code=200)
        return error_response(engine_dead(f"the engine's step loop failed: {online.error!r}"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "rstitch-engine", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, chat=True)

    async def _serve(request: Request, chat: bool):
        try:
            if app.state.draining:
                raise APIError("the server is shutting down; retry on another replica or later", status=503,
                               type="ServiceUnavailableError", headers={"Retry-After": str(RETRY_AFTER_S)})
            parsed = parse_request(await _json(request, config.max_request_bytes), chat=chat, router=config.router,
                                   max_model_len=engine.max_model_len)
            if parsed.model is not None and parsed.model != config.model_name:
                raise APIError(f"the model {parsed.model!r} does not exist; this server serves "
                               f"{config.model_name!r}", status=404, param="model", type="NotFoundError")
            if not online.healthy:
                raise engine_dead(f"the engine's step loop failed: {online.error!r}")
            if config.max_waiting is not None and online.num_waiting >= config.max_waiting:
                raise APIError(f"{online.num_waiting} requests are waiting already (--max-waiting "
                               f"{config.max_waiting}); retry later", status=503, type="ServiceUnavailableError",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            prompts = await asyncio.to_thread(_prompt_ids, engine, parsed, chat)
            check_lengths(parsed, prompts, max_model_len=engine.max_model_len,
                          kv_tokens=engine.sched.num_blocks * engine.sched.block_size)
            policy = parsed.policy if parsed.policy is not None else config.default_policy
            requests = await _admit(online, parsed, prompts, policy, param="messages" if chat else "prompt")
        except APIError as e:
            return error_response(e)
        except InvalidValue as e:  # a field out of its type or range (rstitch_engine.checks)
            return error_response(APIError(str(e), param=e.name))
        call = _Call(parsed, chat, config, prompts, requests)
        if parsed.stream:
            return StreamingResponse(call.events(request), media_type="text/event-stream")
        return await call.complete(request)

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 past `limit` bytes (declared or read)."""
    too_large = APIError(f"the request body exceeds the server's limit of {limit} bytes (--max-request-bytes)",
                         status=413, type="RequestTooLargeError")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large  # refused before the body is read
    body = bytearray()
    async for piece in request.stream():  # a chunked body has no length to check up front
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _json(request: Request, limit: int):
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None


def _prompt_ids(engine, parsed: ParsedRequest, chat: bool) -> list[list[int]]:
    """Token ids per prompt (chat: under the chat template)."""
    try:
        if chat:
            [text] = engine.chat_prompts([parsed.prompts[0]], **parsed.chat_template_kwargs)
            return [engine.tokenize(text, add_special_tokens=False)]
        return [engine.tokenize(p) if isinstance(p, str) else list(p) for p in parsed.prompts]
    except ValueError as e:
        raise APIError(str(e), param="messages" if chat else "prompt") from None
    except Exception as e:  # a chat template that fails on these messages (jinja raises its own errors)
        raise APIError(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                       param="messages") from None


async def _admit(online: AsyncEngine, parsed: ParsedRequest, prompts: list[list[int]], policy: Policy | None,
                 param: str) -> list:
    """One engine request per choice (prompt i, sample j -> choice i * n + j); all or none."""
    base = uuid.uuid4().hex
    admitted = []
    try:
        for i, ids in enumerate(prompts):
            for j, params in enumerate(parsed.params):
                admitted.append(await online.add(ids, params, policy=policy,
                                                 request_id=f"{base}-{i * parsed.n + j}"))
    except BaseException as e:
        for r in admitted:
            r.abort()
        if isinstance(e, (RequestRejected, ValueError, TypeError)):
            raise APIError(str(e), param=param) from None
        if isinstance(e, EngineDeadError):
            raise engine_dead(str(e)) from None
        raise
    return admitted


class _Call:
    """One HTTP request's choices: collected into one response, or streamed as SSE chunks."""

    def __init__(self, parsed: ParsedRequest, chat: bool, config: ServerConfig, prompts: list[list[int]],
                 requests: list):
        self.parsed, self.chat, self.model, self.requests = parsed, chat, config.model_name, requests
        self.timeout_s, self.replica = config.request_timeout_s, config.replica
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.id = ("chatcmpl-" if chat else "cmpl-") + requests[0].request_id.partition("-")[0]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _abort(self) -> None:
        for r in self.requests:
            r.abort()

    def _rstitch(self, outputs: list[RequestOutput]) -> dict:
        """The `rstitch` field: routing statistics, and the replica that served them if there are several."""
        stats = routing_stats(outputs)
        if self.replica is not None:
            stats["replica"] = self.replica
        return stats

    async def _pump(self, index: int, request, sink: asyncio.Queue) -> None:
        """Moves one choice's outputs into the call's queue."""
        try:
            async for out in request:
                await sink.put((index, out))
        except EngineDeadError as e:
            await sink.put((index, e))

    async def _outputs(self):
        """(choice index, StreamOutput or EngineDeadError) as they come, over every choice."""
        sink: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.create_task(self._pump(i, r, sink)) for i, r in enumerate(self.requests)]
        try:
            left = len(pumps)
            while left:
                index, out = await sink.get()
                left -= isinstance(out, EngineDeadError) or out.finished
                yield index, out
        finally:
            for p in pumps:
                p.cancel()
            self._abort()

    def _choice(self, index: int, text: str, finish_reason: str | None, sources: list, entropies: list,
                chat_key: str) -> dict:
        """One choice of a response (`chat_key` "message") or of a stream chunk ("delta"; an empty delta
        ends a chat stream's choice)."""
        choice = {"index": index, "logprobs": None, "finish_reason": finish_reason}
        if not self.chat:
            choice["text"] = text
        elif chat_key == "message":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["delta"] = {"content": text} if text or finish_reason is None else {}
        if self.parsed.return_sources:
            choice["sources"], choice["entropies"] = sources, entropies
        return choice

    async def complete(self, request: Request):
        """The whole response; the requests are aborted if the client disconnects first."""
        async def collect():
            finals = {}
            async for index, out in self._outputs():
                if isinstance(out, EngineDeadError):
                    raise out
                if out.finished:
                    finals[index] = out.output
            return [finals[i] for i in range(len(self.requests))]

        collecting = asyncio.create_task(collect())
        disconnect = asyncio.create_task(_disconnected(request))
        await asyncio.wait({collecting, disconnect}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        disconnect.cancel()
        if not collecting.done():  # the client left, or the time ran out: nobody reads the answer
            timed_out = not disconnect.done() or disconnect.cancelled()
            collecting.cancel()
            self._abort()
            return error_response(self._timed_out()) if timed_out else Response(status_code=499)
        try:
            outputs = collecting.result()
        except EngineDeadError as e:
            return error_response(engine_dead(str(e)))
        failed = next((o for o in outputs if o.finish_reason == "error"), None)
        if failed is not None:
            return error_response(generation_failed(failed))
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self._choice(i, o.text, o.finish_reason, o.sources, o.entropies, "message")
                            for i, o in enumerate(outputs)],
                "usage": usage(self.prompt_tokens, outputs), "rstitch": self._rstitch(outputs),
                **metrics_field(outputs)}

    def _timed_out(self) -> APIError:
        return APIError(f"the request ran past the server's limit of {self.timeout_s:g} s (--request-timeout) and "
                        f"was aborted", status=408, type="TimeoutError")

    def _chunk(self, choices: list[dict], **extra) -> str:
        body = {"id": self.id, "object": self.object + ".chunk" if self.chat else self.object,
                "created": self.created, "model": self.model, "choices": choices, **extra}
        return sse(body)

    async def events(self, request: Request):
        """Server-sent events: a chunk per commit and choice, each choice's last with finish_reason and its
        `rstitch` stats, the usage chunk if asked, then [DONE]. A client that disconnects aborts the requests
        at once: watched here, since whether the response notices depends on the ASGI server (uvicorn 0.30
        under Starlette 1.x never told it, and the requests ran to their end)."""
        watch = asyncio.create_task(_disconnected(request))
        watch.add_done_callback(lambda t: t.cancelled() or self._abort())
        completion_tokens, finals = 0, []
        deadline = None if self.timeout_s is None else asyncio.get_running_loop().time() + self.timeout_s
        try:
            if self.chat:
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(len(self.requests))])
            outputs, failed = self._outputs(), None
            while True:
                left = None if deadline is None else max(deadline - asyncio.get_running_loop().time(), 0.0)
                try:
                    index, out = await asyncio.wait_for(anext(outputs), left)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:  # not TimeoutError: Python 3.10 keeps them apart
                    failed = self._timed_out()
                    break
                if isinstance(out, EngineDeadError):
                    failed = engine_dead(str(out))
                    break
                completion_tokens += len(out.token_ids)
                if out.finished and out.output.finish_reason == "error":
                    failed = generation_failed(out.output)
                    break
                if not (out.text or out.finished or (self.parsed.return_sources and out.token_ids)):
                    continue
                choice = self._choice(index, out.text, out.output.finish_reason if out.finished else None,
                                      out.sources, out.entropies, "delta")
                extra = {}
                if out.finished:
                    finals.append(out.output)
                    choice["rstitch"] = self._rstitch([out.output])
                    extra.update(metrics_field([out.output]))
                if self.parsed.continuous_usage:
                    extra["usage"] = usage(self.prompt_tokens, completion_tokens=completion_tokens)
                yield self._chunk([choice], **extra)
            await outputs.aclose()
            if failed is not None:
                yield sse(failed.body())
            elif self.parsed.include_usage:
                yield self._chunk([], usage=usage(self.prompt_tokens, finals), rstitch=self._rstitch(finals),
                                  **metrics_field(finals))
            yield "data: [DONE]\n\n"
        finally:
            watch.cancel()
            self._abort()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
