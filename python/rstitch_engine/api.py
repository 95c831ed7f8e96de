"""The user-facing engine: loads one or two models, turns prompts into scheduler requests, runs the step
loop until they finish, and returns outputs in input order."""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from . import _C
from .config import CheckpointError, ModelConfig
from .engine_config import EngineConfig
from .detokenize import IncrementalDecoder
from .loader import load_weights
from .outputs import RequestOutput
from .random_models import random_config, random_weights
from .policies import LLMOnly, Policy, RStitch, RStitchPlus, SLMOnly
from .protocol import LLM, SLM, Model
from .sampling_params import SamplingParams
from .tokenizer import check_same_vocabulary, load_tokenizer



class Engine:
    """`Engine(llm=dir)` for one model, `Engine(slm=small_dir, llm=large_dir)` for R-Stitch and friends;
    every option is a field of `EngineConfig` (engine_config.py), given as a keyword or as `config=`."""

    def __init__(self, llm: str | Path | None = None, slm: str | Path | None = None, *,
                 config: EngineConfig | None = None, **options):
        from rstitch_engine.engine.runtime import Runtime

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
        weights = {m: load_weights(p, self.configs[m], self.dtype, self.device) if p is not None
                   else random_weights(self.configs[m], self.dtype, self.device, seed=config.seed + m)
                   for m, p in self.paths.items()}
        self.runtime = Runtime(config, self.configs, weights, vocab_limit=self.vocab_limit,
                               max_model_len=self._max_model_len(config.max_model_len))
        self.max_model_len = self.runtime.max_model_len
        self.sched, self.loop = self.runtime.sched, self.runtime.loop
        self._rng = random.Random(config.seed)
        self._next_id = 0
        self.default_policy: Policy = RStitch() if len(self.paths) == 2 else (
            LLMOnly() if LLM in self.paths else SLMOnly())

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
        return requested or limit

    # ---- requests -----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.sched.num_free_blocks

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        bad = [type(t).__name__ for t in prompt if not isinstance(t, int) or isinstance(t, bool)]
        if bad:
            raise TypeError(f"a prompt list must hold token ids (int), got an item of type {bad[0]}")
        return None, list(prompt)

    def _spec(self, ids: list[int], params: SamplingParams, policy: Policy) -> _C.RequestSpec:
        spec = _C.RequestSpec()
        spec.id = self._next_id
        self._next_id += 1
        spec.prompt = ids
        spec.max_tokens, spec.min_tokens = params.max_tokens, params.min_tokens
        spec.stop_ids = sorted(set([] if params.ignore_eos else self.eos_ids) | set(params.stop_token_ids or []))
        spec.temperature, spec.top_p, spec.top_k = float(params.temperature), float(params.top_p), params.top_k
        seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        spec.seed = seed & 0x7FFFFFFF
        policy.configure(spec, params.max_tokens)
        return spec

    def _check_policy(self, policy) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a rstitch_engine.policies.Policy, got {type(policy).__name__}")
        missing = [Model(m).name for m in sorted(policy.models) if m not in self.paths]
        if missing:
            raise ValueError(f"policy {policy.name!r} needs the {' and the '.join(missing)}, which this engine "
                             f"did not load (Engine(slm=..., llm=...))")

    def _install_router(self, plus: list) -> None:
        """Puts the R-Stitch+ router of this call on the SLM's runner (one router per call)."""
        if not plus:
            return
        if len({(id(p.router) if not isinstance(p.router, (str, Path)) else str(p.router), p.temperature)
                for p in plus}) > 1:
            raise ValueError("one generate call can use one R-Stitch+ router and router temperature")
        from .router import Router

        p = plus[0]
        router = p.router if isinstance(p.router, Router) else Router.load(p.router)
        if router.hidden_size != self.configs[SLM].hidden_size:
            raise ValueError(f"the router reads hidden states of size {router.hidden_size}, the SLM's are "
                             f"{self.configs[SLM].hidden_size}")
        self.runtime.runners[SLM].router = router.to(self.device).on_device(p.temperature)

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 policy: Policy | Sequence[Policy] | None = None, use_tqdm: bool = True,
                 on_tokens: Callable[[int, list[int], list[int]], None] | None = None) -> list[RequestOutput]:
        """Runs every prompt (a string or a list of token ids) to completion, batched continuously.
        `params` and `policy` are one for all or one per prompt. `on_tokens(index, token_ids, sources)` is
        called as tokens are committed (streaming)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params_list = _per_request(params if params is not None else SamplingParams(), n, "params", SamplingParams)
        policy_list = _per_request(policy if policy is not None else self.default_policy, n, "policy", Policy)
        for p in set(policy_list):
            self._check_policy(p)
        self._install_router([p for p in set(policy_list) if isinstance(p, RStitchPlus)])
        encoded = [self._encode(p) for p in prompts]
        start = time.perf_counter()
        outputs: list[RequestOutput] = [RequestOutput(i, text, ids) for i, (text, ids) in enumerate(encoded)]
        live: dict[int, tuple[int, SamplingParams, IncrementalDecoder | None]] = {}
        for i, ((_, ids), sp, pol) in enumerate(zip(encoded, params_list, policy_list)):
            spec = self._spec(ids, sp, pol)
            error = self.sched.add(spec)
            if error:
                outputs[i].finish_reason, outputs[i].error = "error", error
                continue
            if spec.spec_k and sp.temperature > 0:
                self.loop.ensure_draft_logits(spec.spec_k, self.vocab_limit, self.dtype)
            decoder = IncrementalDecoder(self.tokenizer, sp.skip_special_tokens) \
                if sp.stop_strings and self.tokenizer is not None else None
            live[spec.id] = (i, sp, decoder)
        bar = tqdm(total=n, disable=not use_tqdm, desc="generate", unit="req")
        bar.update(n - len(live))
        try:
            while live:
                for rid, new_tokens, new_sources, _ in self.loop.step():
                    i, sp, decoder = live[rid]
                    if on_tokens:
                        on_tokens(i, new_tokens, new_sources)
                    if decoder is not None and _hits_stop(decoder, new_tokens, sp.stop_strings):
                        self.sched.finish_stop(rid)
                for rid in self.sched.take_finished():
                    i, sp, decoder = live.pop(rid)
                    self._finish(outputs[i], rid, sp, decoder, time.perf_counter() - start)
                    bar.update(1)
        except BaseException:
            self._abort(live)
            raise
        finally:
            bar.close()
        return outputs

    def chat(self, conversations, params=None, policy=None, use_tqdm: bool = True, on_tokens=None,
             **chat_template_kwargs) -> list[RequestOutput]:
        """Applies the chat template to each message list, then generates."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this checkpoint has none")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True,
                                                      **chat_template_kwargs) for c in conversations]
        outs = self.generate([self.tokenizer.encode(p, add_special_tokens=False) for p in prompts], params,
                             policy, use_tqdm, on_tokens)
        for o, p in zip(outs, prompts):
            o.prompt = p
        return outs

    def _finish(self, out: RequestOutput, rid: int, params: SamplingParams, decoder, elapsed: float) -> None:
        r = self.sched.output(rid)
        self.sched.release(rid)
        out.token_ids, out.sources, out.entropies = r["token_ids"], r["sources"], r["entropies"]
        out.finish_reason, out.error = r["finish_reason"], r["error"] or None
        out.stats = dict(r["stats"], latency_s=elapsed)
        out.trace = [tuple(t) for t in r["trace"]]
        out.routed = r["routed"]
        if self.tokenizer is not None:
            out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=params.skip_special_tokens)
            if decoder is not None:
                out.text = _cut_at_stop(out.text, params.stop_strings)

    def _abort(self, live: dict) -> None:
        """After a failure mid-batch: finish every live request and wait for in-flight steps, so that no
        block stays allocated."""
        for rid in live:
            self.sched.abort(rid)
        self.loop.drain()
        for rid in self.sched.take_finished():
            self.sched.release(rid)


def _per_request(value, n: int, what: str, kind):
    if isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n or not all(isinstance(v, kind) for v in values):
        raise ValueError(f"{what} must be one {kind.__name__} or a list of {n}")
    return values


def _hits_stop(decoder: IncrementalDecoder, new_tokens: list[int], stops: tuple[str, ...]) -> bool:
    tail = len(decoder.text)
    decoder.push(new_tokens)
    window = decoder.text[max(0, tail - max(map(len, stops)) + 1):]
    return any(s in window for s in stops)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text
