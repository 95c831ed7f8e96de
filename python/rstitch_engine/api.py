"""The user-facing engine: loads one or two models, turns prompts into scheduler requests, runs the step
loop until they finish, and returns outputs in input order."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import random
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import _C, checks
from .config import CheckpointError, ModelConfig
from .engine_config import EngineConfig
from .outputs import RequestOutput
from .random_models import random_config
from .policies import LLMOnly, Policy, RStitch, RStitchPlus, SLMOnly, SpecDecode
from .protocol import LLM, SLM, Model
from .sampling_params import SamplingParams, scheduler_seed
from .streaming import StreamOutput, TextStream, cut_at_stop, text_in_step
from .tokenizer import check_same_vocabulary, load_tokenizer



class Engine:
    """`Engine(llm=dir)` for one model, `Engine(slm=small_dir, llm=large_dir)` for R-Stitch and friends;
    every option is a field of `EngineConfig` (engine_config.py), given as a keyword or as `config=`."""

    def __init__(self, llm: str | Path | None = None, slm: str | Path | None = None, *,
                 config: EngineConfig | None = None, **options):
        from rstitch_engine.engine.core import EngineCore

        from .model_source import resolve_model

        if config is not None and (options or llm is not None or slm is not None):
            raise ValueError("give either config=EngineConfig(...) or keyword options, not both")
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(EngineConfig)})
        if unknown:
            raise TypeError(f"Engine: unknown option(s) {', '.join(unknown)}; see EngineConfig")
        self.config = config = config or EngineConfig(llm=llm, slm=slm, **options)
        self.device, self.dtype = config.torch_device, config.torch_dtype
        self.paths: dict[int, Path | None] = {}  # None: random weights of a named shape (benchmarks)
        self.configs: dict[int, ModelConfig] = {}
        for m, src in ((SLM, config.slm), (LLM, config.llm)):
            if isinstance(src, str) and src.startswith("random:"):
                self.paths[m], self.configs[m] = None, random_config(src)
            elif src is not None:
                self.paths[m] = resolve_model(src, progress=config.progress)
                self.configs[m] = ModelConfig.from_dir(self.paths[m])
        self.tokenizer = self._tokenizer()
        self.vocab_limit = self._vocab_limit()
        self.eos_ids = self._eos_ids()
        self.core = EngineCore(config, self.configs, self.paths, vocab_limit=self.vocab_limit,
                               max_model_len=self._max_model_len(config.max_model_len))
        self.max_model_len = self.core.max_model_len
        self.sched = self.core.sched
        self._rng = random.Random(config.seed)
        self._next_id = 0
        self._lock = threading.RLock()  # the scheduler and the device: one thread at a time
        # The tokenizer (HF's fast tokenizers refuse concurrent use): its own lock, so that a request is
        # tokenized while a step runs. Lock order: _lock, then _tokenizer_lock.
        self._tokenizer_lock = threading.Lock()
        self._live: dict[int, _Live] = {}  # scheduler id -> request
        self._router_key = None
        self.default_policy: Policy = RStitch() if len(self.paths) == 2 else (
            LLMOnly() if LLM in self.paths else SLMOnly())
        if config.use_warm_up:
            self._warm_up()

    # ---- construction -------------------------------------------------------------------------------
    def _tokenizer(self):
        toks = {m: load_tokenizer(p) for m, p in self.paths.items() if p is not None}
        if all(t is not None for t in toks.values()) and len(toks) == 2:
            check_same_vocabulary(toks[SLM], toks[LLM], self.paths[SLM], self.paths[LLM])
        return toks.get(LLM) or toks.get(SLM)

    def _vocab_limit(self) -> int:
        widths = {m: c.vocab_size for m, c in self.configs.items()}
        limit = len(self.tokenizer) if self.tokenizer is not None else min(widths.values())
        for m, w in widths.items():
            if w < limit:
                raise CheckpointError(f"{self.paths[m]}: the {Model(m).name}'s logits have {w} columns, fewer "
                                      f"than the tokenizer's {limit} tokens")
        return limit

    def _eos_ids(self) -> list[int]:
        ids = set()
        for m, p in self.paths.items():
            ids.update(self.configs[m].eos_token_ids)
            gen = Path(p or "") / "generation_config.json"
            if p is not None and gen.is_file():
                eos = json.loads(gen.read_text()).get("eos_token_id")
                ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _max_model_len(self, requested: int | None) -> int:
        limit = min(c.max_position_embeddings for c in self.configs.values())
        if requested is not None and requested > limit:
            raise ValueError(f"max_model_len={requested} exceeds the models' context of {limit} positions")
        return requested if requested is not None else limit

    def _warm_up(self) -> None:
        """Runs each loaded model's paths once, so that their kernels compile here, not in a timed request:
        a prompt extend and decode steps at batch 1, a catch-up, and a batch above the fused-GEMV row limit
        (engine/ops.py FUSED_MAX_ROWS), greedy and with top-p sampling (R1-distill's recommended 0.6 / 0.95:
        the cutoff's graph variant is captured here, not in the first sampled request). Leaves the engine as
        it was (seeds drawn, request ids used)."""
        from rstitch_engine.engine.ops import FUSED_MAX_ROWS

        from .policies import Forced

        state, next_id = self._rng.getstate(), self._next_id
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        prompt = [t % self.vocab_limit for t in range(3, 43)]
        rows = min(2 * FUSED_MAX_ROWS, self.config.max_num_seqs)
        policies = [p for p in (SLMOnly(), LLMOnly(), Forced(pattern="1-2")) if p.models <= set(self.paths)]
        sampled = SamplingParams(max_tokens=4, temperature=0.6, top_p=0.95, seed=0, ignore_eos=True)
        for policy in policies:
            self.generate([prompt], params, policy, use_tqdm=False)
            self.generate([prompt[:2 + i % 5] for i in range(rows)], params, policy, use_tqdm=False)
            self.generate([prompt], sampled, policy, use_tqdm=False)
        self._rng.setstate(state)
        self._next_id = next_id

    # ---- requests -----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.sched.num_free_blocks

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenize(prompt)
        if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        # an id outside the vocabulary fails its request alone (_spec, the scheduler); only types raise here
        return None, [checks.integer(f"prompt[{i}]", t, -2**63, 2**63 - 1) for i, t in enumerate(prompt)]

    def _spec(self, ids: list[int], params: SamplingParams, policy: Policy) -> _C.RequestSpec | str:
        """The scheduler spec of one request, or why the request fails alone (a token id no int32 holds;
        the scheduler checks the rest of the prompt). Raises only on invalid parameters."""
        seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        huge = next((t for t in ids if not -2**31 <= t < 2**31), None)  # no int32 holds it
        if huge is not None:
            return f"prompt token id {huge} is outside the vocabulary [0, {self.vocab_limit})"
        spec = _C.RequestSpec()
        spec.id = self._next_id
        self._next_id += 1
        spec.prompt = ids
        spec.max_tokens, spec.min_tokens = params.max_tokens, params.min_tokens
        spec.stop_ids = sorted(set([] if params.ignore_eos else self.eos_ids) | set(params.stop_token_ids or []))
        # Temperatures below GREEDY_TEMPERATURE decode greedily (sampling_params.py).
        spec.temperature = 0.0 if params.greedy else float(params.temperature)
        spec.top_p, spec.top_k = float(params.top_p), params.top_k
        spec.seed = scheduler_seed(seed)
        spec.skip_prefix_cache = params.skip_prefix_cache
        # Forced patterns cover the outputs the context can hold, not a max_tokens of 2**31 - 1.
        policy.configure(spec, min(params.max_tokens, self.max_model_len))
        return spec

    def _check_policy(self, policy) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a rstitch_engine.policies.Policy, got {type(policy).__name__}")
        missing = [Model(m).name for m in sorted(policy.models) if m not in self.paths]
        if missing:
            raise ValueError(f"policy {policy.name!r} needs the {' and the '.join(missing)}, which this engine "
                             f"did not load (Engine(slm=..., llm=...))")
        verify_rows = self.core.scheduler_config.max_logits_rows
        if isinstance(policy, SpecDecode) and policy.k + 1 > verify_rows:
            raise ValueError(f"policy {policy.name!r}: k + 1 = {policy.k + 1} rows per verification exceed this "
                             f"engine's max_logits_rows of {verify_rows} (EngineConfig)")

    def _install_router(self, plus: list) -> None:
        """Puts the R-Stitch+ router of these requests on the SLM's runner: one router (and router
        temperature) at a time, replaced only while no R-Stitch+ request is running."""
        if not plus:
            return
        keys = {(id(p.router) if not isinstance(p.router, (str, Path)) else str(p.router), p.temperature) for p in plus}
        if len(keys) > 1:
            raise ValueError("one generate call can use one R-Stitch+ router and router temperature")
        [key] = keys
        if any(live.uses_router for live in self._live.values()):
            if key != self._router_key:
                raise ValueError("R-Stitch+ requests with another router (or router temperature) are running; "
                                 "one router is used at a time")
            return  # the running requests' router serves these too
        # Installed afresh whenever no R-Stitch+ request runs: a Router object may have been trained since.
        from .router.model import Router, dtype_name

        p = plus[0]
        router = p.router if isinstance(p.router, Router) else Router.load(p.router)
        if router.hidden_size != self.configs[SLM].hidden_size:
            raise ValueError(f"the router reads hidden states of size {router.hidden_size}, the SLM's are "
                             f"{self.configs[SLM].hidden_size}")
        if router.trained_dtype not in (None, dtype_name(self.dtype)):
            # another dtype gives other hidden states, so decisions near the router's threshold can flip
            warnings.warn(f"the R-Stitch+ router was trained on the SLM in {router.trained_dtype}; this engine runs "
                          f"it in {dtype_name(self.dtype)}, so its decisions may differ from training's "
                          f"(load the pair with dtype={router.trained_dtype!r} to match)", stacklevel=3)
        self.core.executor.collective_rpc("install_router", router, p.temperature)
        self._router_key = key

    # ---- the online core: requests join between steps, one step loop serves every caller ---------------------
    def add_requests(self, prompts: list, params: list[SamplingParams], policies: list[Policy],
                     sink: Callable[[StreamOutput], None], *, request_ids: list | None = None,
                     stream_text: bool = False, detokenize: bool = True) -> list[RequestOutput]:
        """Admits requests to the running batch; all or none (on any exception, KeyboardInterrupt included,
        those already added are aborted and their blocks released). Returns one RequestOutput each: a
        request the engine cannot serve is finished already (finish_reason "error"); the others are
        filled in when they finish. `sink` receives each request's StreamOutputs from whichever thread runs
        the step (text deltas with `stream_text`); it must be quick and must not raise. `detokenize=False`:
        the caller makes the text of requests without stop strings (`text_stream`, `final_text`), outside the
        step; those with stop strings are detokenized here, since their stop must be known before the next
        step is planned (streaming.py). Invalid arguments
        raise ValueError/TypeError before anything is admitted. Thread-safe."""
        n = len(prompts)
        request_ids = list(range(n)) if request_ids is None else request_ids
        for sp in {id(sp): sp for sp in params}.values():
            sp.validate()  # the fields may have been changed since it was built
            if sp.stop_strings and self.tokenizer is None:
                raise ValueError(f"stop strings {list(sp.stop_strings)!r} need a tokenizer, and this checkpoint has "
                                 f"none: use stop_token_ids")
        for p in set(policies):
            self._check_policy(p)
        encoded = [self._encode(p) for p in prompts]
        with self._lock:
            specs = [self._spec(ids, sp, pol) for (_, ids), sp, pol in zip(encoded, params, policies)]
            self._install_router([p for p in set(policies) if isinstance(p, RStitchPlus)])
            now = time.monotonic()
            outputs = [RequestOutput(i, text, ids, request_id=request_ids[i], metrics={"arrival_time": now})
                       for i, (text, ids) in enumerate(encoded)]
            added: list[int] = []
            try:
                draft_k = 0
                for spec, sp, pol, out in zip(specs, params, policies, outputs):
                    error = spec if isinstance(spec, str) else None
                    if error is None:
                        added.append(spec.id)
                        error = self.sched.add(spec)
                    if error:
                        out.finish_reason, out.error = "error", error
                        out.metrics["finished_time"] = now
                        continue
                    if spec.spec_k and spec.temperature > 0:
                        draft_k = max(draft_k, spec.spec_k)
                    in_step = text_in_step(sp, detokenize)
                    text = self.text_stream(sp) if in_step and (sp.stop_strings or stream_text) else None
                    self._live[spec.id] = _Live(out, sp, text, sink, isinstance(pol, RStitchPlus), in_step)
                if draft_k > self.core.draft_k:  # the draft buffers grow only with no step in flight
                    self._deliver(self.core.drain(), time.monotonic())
                    self.core.ensure_draft_logits(draft_k, self.dtype)
            except BaseException:
                self._abort(added)
                raise
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self._live)

    def step(self) -> None:
        """Runs one step of the shared loop and delivers what it committed to each request's sink."""
        with self._lock:
            started = time.monotonic()
            try:
                events = self.core.step()
            except BaseException as e:
                self._fail_live(f"an engine step failed: {e!r}")
                raise
            self._deliver(events, started)

    def _fail_live(self, why: str) -> None:
        """After a step that raised (Ctrl-C included): what the device ran of it is unknown, so every live
        request fails (its blocks return; the next step or abort delivers it, after the caller's own
        handling, such as AsyncEngine's), the in-flight steps' results are dropped, and the prefix cache, which
        may count KV of the step that never ran, is emptied. The engine can take new requests."""
        for rid in list(self._live):
            self.sched.fail(rid, why)
        self.core.inflight.clear()
        self.sched.reset_prefix_cache()

    def close(self) -> None:
        """Releases what lives outside this object: with tensor parallelism, stops the other ranks' processes
        (they also end with this process). Requests still live are aborted first."""
        with self._lock:
            self._abort(list(self._live))
            self.core.executor.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix (cold-cache measurements); False, and nothing changes, while requests
        run."""
        with self._lock:
            return self.sched.reset_prefix_cache()

    def abort_requests(self, outputs: list[RequestOutput]) -> None:
        """Finishes these requests (the outputs add_requests returned; finish_reason "abort") and returns
        their blocks at once. Finished ones are skipped. Thread-safe."""
        wanted = {id(o) for o in outputs}
        with self._lock:
            self._abort([rid for rid, live in self._live.items() if id(live.output) in wanted])

    def _deliver(self, events: list, started: float) -> None:
        now = time.monotonic()
        for rid in self.sched.take_started():
            self._live[rid].output.metrics["first_scheduled_time"] = started
        for rid, tokens, sources, entropies, _ in events:
            live = self._live[rid]
            live.output.metrics.setdefault("first_token_time", now)
            delta = ""
            if live.text is not None:
                delta, stopped = live.text.push(tokens)
                if stopped:
                    self.sched.finish_stop(rid)
            live.sink(StreamOutput(live.output.request_id, tokens, sources, entropies, delta, now))
        for rid in self.sched.take_finished():
            live = self._live.pop(rid)
            self._finish(rid, live, now)
            rest = live.text.finish(live.output.text) if live.text is not None else ""
            live.sink(StreamOutput(live.output.request_id, text=rest, time=now, output=live.output))

    def _finish(self, rid: int, live: "_Live", now: float) -> None:
        out, params = live.output, live.params
        r = self.sched.output(rid)
        self.sched.release(rid)
        out.token_ids, out.sources, out.entropies = r["token_ids"], r["sources"], r["entropies"]
        out.finish_reason, out.error = r["finish_reason"], r["error"] or None
        out.metrics["finished_time"] = now
        out.stats = dict(r["stats"], latency_s=now - out.metrics["arrival_time"])
        out.trace = [tuple(t) for t in r["trace"]]
        out.routed = r["routed"]
        if self.tokenizer is not None and live.detokenize:
            out.text = self.final_text(out.token_ids, params)

    def text_stream(self, params: SamplingParams) -> TextStream | None:
        """The text deltas of a request with these parameters as its tokens come (None without a tokenizer).
        Thread-safe: it decodes under the tokenizer's lock."""
        if self.tokenizer is None:
            return None
        return TextStream(self.tokenizer, params.stop_strings, params.skip_special_tokens, self._tokenizer_lock)

    def final_text(self, token_ids: list[int], params: SamplingParams) -> str:
        """A finished request's text: its tokens decoded, cut at the first stop string. Thread-safe."""
        with self._tokenizer_lock:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
        return cut_at_stop(text, params.stop_strings)

    def _abort(self, ids) -> None:
        """Finishes these requests and waits for in-flight steps (whose events still reach their requests'
        sinks), so that no block stays allocated and no request waits. Holds the lock."""
        for rid in ids:
            try:
                self.sched.abort(rid)
            except IndexError:  # refused at admission, or released already
                pass
        self._deliver(self.core.drain(), time.monotonic())

    # ---- offline: clients of the online core ---------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 policy: Policy | Sequence[Policy] | None = None, use_tqdm: bool = True,
                 on_tokens: Callable[[int, list[int], list[int]], None] | None = None) -> list[RequestOutput]:
        """Runs every prompt (a string or a list of token ids) to completion, batched continuously.
        `params` and `policy` are one for all or one per prompt. `on_tokens(index, token_ids, sources)` is
        called as tokens are committed (streaming), in the calling thread.

        Errors come in two kinds. Invalid arguments (types, parameter ranges, a policy this engine cannot
        run, stop strings without a tokenizer) raise ValueError/TypeError before any request is admitted.
        A request the engine cannot serve (an empty or too long prompt, a token id outside the vocabulary)
        or one that fails while running (NaN/inf in a model) fails alone: finish_reason "error" and `error`
        say why, and the other requests run. Admission is all-or-nothing: on any exception, KeyboardInterrupt
        included, every request of the call is aborted and its blocks are released.

        Thread-safe: calls from several threads (and an AsyncEngine on this engine) share one batch; each
        step runs under the engine's lock, and each call returns its own requests' outputs."""
        prompts = _prompt_list(prompts)
        n = len(prompts)
        params_list = _per_request(params if params is not None else SamplingParams(), n, "params", SamplingParams)
        policy_list = _per_request(policy if policy is not None else self.default_policy, n, "policy", Policy)
        committed = queue.SimpleQueue()
        outputs = self.add_requests(prompts, params_list, policy_list, committed.put)
        pending = {o.index for o in outputs if o.finish_reason is None}
        bar = tqdm(total=n, disable=not use_tqdm, desc="generate", unit="req")
        bar.update(n - len(pending))
        try:
            while pending:
                self.step()
                while not committed.empty():
                    out = committed.get()
                    if on_tokens and out.token_ids:
                        on_tokens(out.request_id, out.token_ids, out.sources)
                    if out.finished:
                        pending.discard(out.request_id)
                        bar.update(1)
        except BaseException:
            self.abort_requests(outputs)
            raise
        finally:
            bar.close()
        return outputs

    def chat(self, conversations, params=None, policy=None, use_tqdm: bool = True, on_tokens=None,
             **chat_template_kwargs) -> list[RequestOutput]:
        """Applies the chat template to each message list, then generates."""
        prompts = self.chat_prompts(conversations, **chat_template_kwargs)
        outs = self.generate([self.tokenize(p, add_special_tokens=False) for p in prompts], params, policy,
                             use_tqdm, on_tokens)
        for o, p in zip(outs, prompts):
            o.prompt = p
        return outs

    def chat_prompts(self, conversations, **chat_template_kwargs) -> list[str]:
        """The prompt text of each conversation (a list of {"role", "content"} messages) under the chat
        template, ready for generation. One conversation may be given as its message list."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this checkpoint has none")
        if isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        _check_conversations(conversations)
        with self._tokenizer_lock:
            return [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True,
                                                       **chat_template_kwargs) for c in conversations]

    def set_parking(self, *, llm_batch_share: float | None = None, llm_min_batch: int | None = None,
                    llm_max_wait: int | None = None) -> None:
        """Changes the parking rule (EngineConfig's llm_* fields; None keeps a value) from the next step on:
        the same rules decide every token (only which rows share a step changes), so one engine can
        compare rules."""
        changes = {k: v for k, v in (("llm_batch_share", llm_batch_share), ("llm_min_batch", llm_min_batch),
                                     ("llm_max_wait", llm_max_wait)) if v is not None}
        with self._lock:
            config = dataclasses.replace(self.config, **changes)  # validated as at construction
            self.sched.set_parking(config.llm_min_batch, config.llm_batch_share, config.llm_max_wait)
            self.config = config

    @contextlib.contextmanager
    def step_timings(self):
        """Collects every step's StepTiming rows (engine/core.py: rows, tokens, context, logits rows, seconds
        per model) while open: what evaluation/step_cost.py and router/calibrate.py fit their costs to."""
        with self._lock:
            self.core.timings = rows = []
        try:
            yield rows
        finally:
            self.core.timings = None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (chat prompts: add_special_tokens=False, the template has them). Thread-safe."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
        with self._tokenizer_lock:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)


@dataclass
class _Live:
    """A request in the scheduler: its output (filled in when it finishes), parameters, text stream (stop
    strings, text deltas) and where its StreamOutputs go."""
    output: RequestOutput
    params: SamplingParams
    text: TextStream | None
    sink: Callable[[StreamOutput], None]
    uses_router: bool
    detokenize: bool  # the engine makes its text (else the caller does, outside the step)


def _prompt_list(prompts) -> list:
    """The prompts of a generate call: one prompt (a string or a list of token ids) or a list of them."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, a list of token ids, or a list of prompts, got "
                        f"{type(prompts).__name__}")
    if prompts and isinstance(prompts[0], int) and not isinstance(prompts[0], bool):
        return [prompts]
    return list(prompts)


def _check_conversations(conversations) -> None:
    """chat(): a list of conversations, each a list of {"role": str, "content": str, ...} messages."""
    if not isinstance(conversations, (list, tuple)):
        raise ValueError(f"chat needs a list of messages or a list of conversations, got "
                         f"{type(conversations).__name__}")
    for c, conv in enumerate(conversations):
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ValueError(f"conversation {c} must be a non-empty list of messages, got {conv!r:.80}")
        for m, msg in enumerate(conv):
            if not isinstance(msg, dict):
                raise ValueError(f"conversation {c}, message {m}: a message is a dict with 'role' and 'content', "
                                 f"got {type(msg).__name__}")
            for key in ("role", "content"):
                if not isinstance(msg.get(key), str):
                    raise ValueError(f"conversation {c}, message {m}: {key!r} must be a string, got "
                                     f"{msg.get(key)!r:.80}" if key in msg else
                                     f"conversation {c}, message {m}: missing {key!r}")


def _per_request(value, n: int, what: str, kind):
    if isinstance(value, kind):
        return [value] * n
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be one {kind.__name__} or a list of {n}, got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{what} must be one {kind.__name__} or a list of {n}, got a list of {len(value)}")
    bad = next((v for v in value if not isinstance(v, kind)), None)
    if bad is not None:
        raise ValueError(f"{what} must be one {kind.__name__} or a list of {n}, got an item of type "
                         f"{type(bad).__name__}")
    return list(value)
