"""AsyncEngine: the online engine for asyncio callers (the server). Requests join the running batch at the
next step, stream their tokens, and can be aborted.

One background thread owns the step loop: it takes admissions and aborts from a thread-safe queue between
steps, runs `Engine.step()`, and the engine hands each commit to the request's asyncio queue through
`call_soon_threadsafe`. The offline `Engine.generate` is another client of the same core, so it may run on
the same engine from other threads at the same time (docs/design.md, 'Online core').

Failures: a request the engine cannot serve is refused when it is admitted (`RequestRejected`, a
ValueError); one that fails while running (NaN) finishes with finish_reason "error"; a failure of the step
loop itself fails every request in flight with `EngineDeadError`, is logged, and makes `healthy` False.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from .api import Engine
from .outputs import RequestOutput
from .policies import Policy
from .sampling_params import SamplingParams
from .streaming import StreamOutput, text_in_step

log = logging.getLogger("rstitch_engine")


class RequestRejected(ValueError):
    """The engine cannot serve this request (an empty or too long prompt, a token id outside the
    vocabulary); nothing of it ran."""


class EngineDeadError(RuntimeError):
    """The step loop failed; the engine serves no more requests."""


@dataclass
class _Admission:
    request_id: str
    prompt: object
    params: SamplingParams
    policy: Policy | None
    stream_text: bool
    sink: object
    admitted: asyncio.Future
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    """`AsyncEngine(Engine(slm=..., llm=...))`; `async for out in engine.stream(prompt, params, policy=...)`
    yields StreamOutputs (new token ids, text delta, sources, entropies; the last one carries the complete
    RequestOutput with finish_reason and stats); `await engine.abort(request_id)`; `shutdown()` when done."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # running requests by request id: the output add_requests returned, and where its outputs go
        self._running: dict[str, tuple[RequestOutput, Callable]] = {}
        self._pending = 0  # admissions queued, not yet taken by the step thread
        self._pending_lock = threading.Lock()
        self._ids = itertools.count()
        # called in the step thread with every StreamOutput of every request (the server's metrics)
        self.listeners: list[Callable[[StreamOutput], None]] = []
        self._thread = threading.Thread(target=self._run, name="rstitch-step-loop", daemon=True)
        self._thread.start()

    # ---- called from the event loop ----------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests that wait for a sequence slot or KV blocks, or to be admitted."""
        return self._pending + self.engine.sched.num_waiting

    @property
    def num_running(self) -> int:
        return self.engine.sched.num_running

    @property
    def llm_steps(self) -> int:
        """Steps the LLM has run so far (the parking rule makes them fewer and fuller)."""
        return self.engine.sched.llm_steps

    @property
    def kv_cache_usage(self) -> float:
        sched = self.engine.sched
        return 1.0 - sched.num_free_blocks / sched.num_blocks

    async def add(self, prompt, params: SamplingParams | None = None, *, policy: Policy | None = None,
                  request_id: str | None = None, stream_text: bool = True) -> "RequestStream":
        """Admits one request (a prompt string or a list of token ids) to the running batch and returns its
        stream of StreamOutputs. Raises ValueError/TypeError for invalid arguments, RequestRejected for a
        request the engine cannot serve, EngineDeadError once the step loop has failed."""
        if not self.healthy:
            raise EngineDeadError(f"the engine's step loop failed: {self.error!r}")
        loop = asyncio.get_running_loop()
        params = params if params is not None else SamplingParams()
        params.validate()  # its stop strings decide who detokenizes
        front = _FrontText(self.engine, params, stream_text) \
            if self.engine.tokenizer is not None and not text_in_step(params, detokenize=False) else None
        request = RequestStream(self, request_id if request_id is not None else f"req-{next(self._ids)}", front)
        admission = _Admission(request.request_id, prompt, params, policy, stream_text,
                               lambda out: _post(loop, request.queue.put_nowait, out), loop.create_future(), loop)
        with self._pending_lock:
            self._pending += 1
        self._commands.put(("add", admission))
        try:
            await admission.admitted
        except asyncio.CancelledError:
            request.abort()  # admitted after all, or not: either way it must not run
            raise
        return request

    async def stream(self, prompt, params: SamplingParams | None = None, *, policy: Policy | None = None,
                     request_id: str | None = None, stream_text: bool = True) -> AsyncIterator[StreamOutput]:
        """`add`, then its StreamOutputs as steps commit them. Leaving the iteration early (break,
        cancellation, a closed connection) aborts the request."""
        request = await self.add(prompt, params, policy=policy, request_id=request_id, stream_text=stream_text)
        try:
            async for out in request:
                yield out
        finally:
            request.abort()

    async def generate(self, prompt, params: SamplingParams | None = None, *, policy: Policy | None = None,
                       request_id: str | None = None) -> RequestOutput:
        """The complete output of one request (stream() collected)."""
        async for out in self.stream(prompt, params, policy=policy, request_id=request_id, stream_text=False):
            pass
        return out.output  # a stream ends with its finished output (or raises)

    async def abort(self, request_id: str) -> None:
        """Aborts a running request: it finishes with finish_reason "abort" at the next step and its blocks
        return; unknown or finished ids are ignored."""
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the step thread (requests still running are aborted)."""
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    # ---- the step thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                block = not eng.has_unfinished_requests()
                while True:  # every command that is queued, waiting for one when there is nothing to run
                    try:
                        kind, arg = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    block = False
                    if kind == "stop":
                        self._abort_all()
                        return
                    if kind == "add":
                        self._admit(arg)
                    else:
                        self._abort(arg)
                if eng.has_unfinished_requests():
                    eng.step()
        except BaseException as e:  # the step loop itself failed: fail everything in flight
            log.exception("the step loop failed; failing every request in flight")
            self.error = e
            self._fail_all(EngineDeadError(f"the engine's step loop failed: {e!r}"))

    def _admit(self, a: _Admission) -> None:
        with self._pending_lock:
            self._pending -= 1
        done = lambda outcome: _post(a.loop, _resolve, a.admitted, outcome)  # noqa: E731
        if a.request_id in self._running:
            return done(ValueError(f"request id {a.request_id!r} is already running"))
        policy = a.policy if a.policy is not None else self.engine.default_policy

        def sink(out: StreamOutput) -> None:
            if out.finished:
                self._running.pop(a.request_id, None)
            for listener in self.listeners:
                listener(out)
            a.sink(out)

        try:
            [out] = self.engine.add_requests([a.prompt], [a.params], [policy], sink, request_ids=[a.request_id],
                                             stream_text=a.stream_text, detokenize=False)
        except BaseException as e:
            done(e)
            if isinstance(e, (ValueError, TypeError)):
                return
            raise
        if out.finish_reason == "error":
            return done(RequestRejected(out.error))
        self._running[a.request_id] = (out, a.sink)
        if "finished_time" in out.metrics:  # an offline generate in another thread stepped it to its end
            self._running.pop(a.request_id, None)
        done(None)

    def _abort(self, request_id: str) -> None:
        running = self._running.get(request_id)
        if running is not None:
            self.engine.abort_requests([running[0]])

    def _abort_all(self) -> None:
        self.engine.abort_requests([out for out, _ in list(self._running.values())])

    def _fail_all(self, error: EngineDeadError) -> None:
        while True:  # admissions still queued
            try:
                kind, arg = self._commands.get(block=False)
            except queue.Empty:
                break
            if kind == "add":
                _post(arg.loop, _resolve, arg.admitted, error)
        for _, sink in list(self._running.values()):
            sink(error)
        try:
            self._abort_all()
        except Exception:  # the loop is broken; the blocks are what is left to return
            log.exception("aborting the requests in flight failed")


class _FrontText:
    """The text of a request without stop strings, made on the event loop as its outputs are read, not in
    the step thread (streaming.py, 'Who detokenizes')."""

    def __init__(self, engine: Engine, params: SamplingParams, stream_text: bool):
        self.engine, self.params = engine, params
        self.stream = engine.text_stream(params) if stream_text else None

    def fill(self, out: StreamOutput) -> None:
        if self.stream is not None and out.token_ids:
            out.text, _ = self.stream.push(out.token_ids)
        if out.finished:
            out.output.text = self.engine.final_text(out.output.token_ids, self.params)
            if self.stream is not None:
                out.text = self.stream.finish(out.output.text)


class RequestStream:
    """One admitted request: iterate for its StreamOutputs (the last one `finished`); `abort()` from any
    thread ends it early (a no-op once it finished)."""

    def __init__(self, online: AsyncEngine, request_id: str, front: _FrontText | None = None):
        self.online, self.request_id, self.front = online, request_id, front
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> StreamOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        if isinstance(out, BaseException):
            self.finished = True
            raise out
        self.finished = out.finished
        if self.front is not None:
            self.front.fill(out)
        return out

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.online._commands.put(("abort", self.request_id))


def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Runs fn(*args) in the event loop's thread; nothing when that loop has closed (its caller is gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _resolve(future: asyncio.Future, outcome: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
