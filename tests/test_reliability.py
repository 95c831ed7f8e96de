"""Reliability (issue 13): all-or-nothing admission, sampled speculative decoding with fully accepted drafts,
NaN detection independent of the attention backend, tiny temperatures, integer ranges, argument checks,
LLM parking that never waits for a batch that cannot form, and a seeded randomized mix of good and bad
requests.

Error classes: invalid arguments (types, parameter ranges, a policy the engine cannot run, stop strings
without a tokenizer, malformed chat messages) raise ValueError/TypeError before any request is admitted;
a request the engine cannot serve (empty or too long prompt, a token id outside the vocabulary) or one
that fails while running (NaN/inf) fails alone with finish_reason "error".
"""
import dataclasses
import random

import numpy as np
import pytest

from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.protocol import LLM, SLM

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(pair):
    return Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01, max_model_len=64)


def _idle(eng, free):
    """The engine holds nothing from earlier calls: every block free, no request queued or running."""
    assert eng.num_free_blocks == free
    assert eng.sched.num_waiting == 0 and eng.sched.num_running == 0


# ---- 1. admission is all-or-nothing ------------------------------------------------------------------------
def test_invalid_parameters_late_in_a_batch_admit_nothing(engine):
    free = engine.num_free_blocks
    ref = engine.generate([[7, 8, 9]], GREEDY, use_tqdm=False)[0].token_ids
    changed = SamplingParams(max_tokens=8)
    changed.max_tokens = 2**31  # changed after it was validated
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate([[7, 8, 9], [7, 8, 9]], [GREEDY, changed], use_tqdm=False)
    _idle(engine, free)
    with pytest.raises(ValueError, match="policy must be one Policy or a list of 3"):
        engine.generate([[7, 8, 9]] * 3, GREEDY, [policies.LLMOnly(), policies.SLMOnly(), "llm"], use_tqdm=False)
    _idle(engine, free)
    with pytest.raises(TypeError, match=r"prompt\[1\] must be an integer"):
        engine.generate([[7, 8, 9], [1, "2"]], GREEDY, use_tqdm=False)
    _idle(engine, free)
    with pytest.raises(ValueError, match="bad forced pattern item"):
        policies.Forced(pattern="1-3,x")
    assert engine.generate([[7, 8, 9]], GREEDY, use_tqdm=False)[0].token_ids == ref
    _idle(engine, free)


def test_a_token_id_no_int32_holds_fails_alone(engine):
    free = engine.num_free_blocks
    ref = engine.generate([[7, 8, 9]], GREEDY, use_tqdm=False)[0]
    outs = engine.generate([[7, 8, 9], [7, 2**31], [7, -2**40], [7, 8, 9]], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in (outs[0], outs[3])] == [ref.token_ids] * 2
    for o in outs[1:3]:
        assert o.finish_reason == "error" and "outside the vocabulary" in o.error
    _idle(engine, free)


class _InterruptedAdd:
    """The engine's scheduler, with a KeyboardInterrupt (Ctrl-C) raised at the n-th add."""

    def __init__(self, sched, n):
        self._sched, self._left = sched, n

    def add(self, spec):
        if self._left == 0:
            raise KeyboardInterrupt
        self._left -= 1
        return self._sched.add(spec)

    def __getattr__(self, name):
        return getattr(self._sched, name)


def test_ctrl_c_during_admission_releases_what_was_added(engine, monkeypatch):
    free = engine.num_free_blocks
    ref = engine.generate([[7, 8, 9]], GREEDY, use_tqdm=False)[0].token_ids
    monkeypatch.setattr(engine, "sched", _InterruptedAdd(engine.sched, 40))
    with pytest.raises(KeyboardInterrupt):
        engine.generate([[7, 8, 9]] * 200, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    _idle(engine, free)
    assert engine.generate([[7, 8, 9]], GREEDY, use_tqdm=False)[0].token_ids == ref


# ---- 2. sampled speculative decoding reaches fully accepted drafts -------------------------------------------
@pytest.fixture(scope="module")
def issue_pair(tiny):
    return tiny("qwen2"), tiny("qwen2", hidden=128, seed=1)


def test_sampled_speculative_decoding_with_every_k(issue_pair):
    eng = Engine(slm=issue_pair[0], llm=issue_pair[1], device="cpu", kv_cache_gb=0.02)
    free = eng.num_free_blocks
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=1)
    full = 0
    for k in range(1, 9):
        [out] = eng.generate(["hello"], params, policy=policies.SpecDecode(k=k), use_tqdm=False)
        assert out.finish_reason in ("length", "stop") and out.error is None
        assert len(out.token_ids) == 12 or out.finish_reason == "stop"
        full += out.stats["accepted"] > 0
    assert full > 0
    _idle(eng, free)


# ---- 3. NaN is detected whatever the attention backend does with it ------------------------------------------
def _poison(eng, model, where, token):
    w = eng.core.executor.worker.runners[model].weights
    assert w.lm_head.data_ptr() != w.embed.data_ptr(), "tied embeddings would put the NaN into the logits"
    target = w.embed[token] if where == "embed" else w.layers[0].qkv[0]  # one q_proj output row
    saved = target.clone()
    if where == "embed":
        target.fill_(float("nan"))
    else:
        target[0] = float("nan")  # one weight
    return lambda: target.copy_(saved)


@pytest.mark.parametrize("kernels, where, model, chunk", [
    ("torch", "embed", LLM, None), ("torch", "q_proj", LLM, None), ("torch", "embed", SLM, None),
    ("torch", "q_proj", SLM, None), ("torch", "embed", LLM, 4), ("triton", "embed", LLM, None),
    ("triton", "q_proj", SLM, None)])
def test_nan_in_a_model_fails_the_request_naming_the_model(pair, kernels, where, model, chunk):
    kw = dict(max_num_batched_tokens=chunk) if chunk else {}
    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01, kernels=kernels, **kw)
    free = eng.num_free_blocks
    policy = policies.LLMOnly() if model == LLM else policies.SLMOnly()
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    poisoned, clean = [30, 31, 32, 33, 34, 35, 36, 37, 38, 39], [50, 51, 52]
    ref = eng.generate([poisoned, clean], params, policy, use_tqdm=False)
    token = next(t for t in poisoned[:2] if t not in clean + ref[1].token_ids)
    restore = _poison(eng, model, where, token)
    assert eng.reset_prefix_cache()  # the cached KV of the first run came from the clean weights
    try:
        outs = eng.generate([poisoned, clean], params, policy, use_tqdm=False)
    finally:
        restore()
    name = "LLM" if model == LLM else "SLM"
    assert outs[0].finish_reason == "error" and f"the {name} produced NaN" in outs[0].error
    if where == "embed":  # only the request holding the token is hit
        assert outs[1].token_ids == ref[1].token_ids and outs[1].finish_reason == ref[1].finish_reason
    else:
        assert outs[1].finish_reason == "error"
    _idle(eng, free)
    assert eng.generate([poisoned], params, policy, use_tqdm=False)[0].token_ids == ref[0].token_ids


# ---- 4. tiny temperatures are greedy ------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [policies.LLMOnly(), policies.SLMOnly(), policies.RStitch(tau=0.72),
                                    policies.SpecDecode(k=3)], ids=lambda p: p.name)
def test_tiny_temperatures_decode_greedily(engine, policy):
    greedy = engine.generate([[7, 8, 9], [40, 41]], SamplingParams(max_tokens=8, temperature=0.0), policy,
                             use_tqdm=False)
    for t in (1e-39, 1e-20, 9.9e-6):
        tiny_t = engine.generate([[7, 8, 9], [40, 41]], SamplingParams(max_tokens=8, temperature=t, seed=3),
                                 policy, use_tqdm=False)
        assert [(o.token_ids, o.finish_reason) for o in tiny_t] == [(o.token_ids, o.finish_reason) for o in greedy]
    assert SamplingParams(temperature=9.9e-6).greedy and not SamplingParams(temperature=1e-5).greedy


# ---- 5. integer ranges --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(max_tokens=2**31), "max_tokens"), (dict(max_tokens=2**31 - 1, min_tokens=2**31), "min_tokens"),
    (dict(top_k=2**31), "top_k"), (dict(stop_token_ids=[2**31]), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(seed=2**63), "seed"), (dict(seed=-1), "seed"),
    (dict(stop=123), "stop"), (dict(stop=[None]), "stop"), (dict(stop_token_ids=5), "stop_token_ids")])
def test_out_of_range_integers_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


@pytest.mark.parametrize("make, field", [
    (lambda: policies.SpecDecode(k=2**31), "k"), (lambda: policies.SpecDecode(k=True), "k"),
    (lambda: policies.RStitch(handover_after=2**31), "handover_after"),
    (lambda: policies.Forced(pattern=(1, "2")), "pattern"), (lambda: policies.Forced(llm_share=0.5, seed=-1), "seed")])
def test_out_of_range_policy_fields_are_refused(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_large_seeds_are_hashed_not_folded(engine):
    from rstitch_engine.sampling_params import scheduler_seed

    assert scheduler_seed(5) == 5 and scheduler_seed(2**31 - 1) == 2**31 - 1
    assert len({scheduler_seed(s) for s in (0, 2**31, 2**32, 2**62, 2**63 - 1)}) == 5
    assert all(0 <= scheduler_seed(s) < 2**31 for s in (2**31, 2**63 - 1))
    run = lambda seed: engine.generate(  # noqa: E731
        [[7, 8, 9]], SamplingParams(max_tokens=16, temperature=1.5, seed=seed, ignore_eos=True),
        policies.LLMOnly(), use_tqdm=False)[0].token_ids
    assert run(0) != run(2**31)
    assert run(2**40) == run(2**40)
    big = SamplingParams(max_tokens=2**31 - 1, top_k=2**31 - 1, stop_token_ids=[2**31 - 1], seed=2**63 - 1,
                         ignore_eos=True)
    out = engine.generate([[7, 8, 9]], big, policies.SLMOnly(), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 64 - 3


# ---- 9. smaller argument checks ------------------------------------------------------------------------------
def test_argument_checks(engine, tiny):
    free = engine.num_free_blocks
    with pytest.raises(TypeError, match="got dict"):
        engine.generate({"prompt": "hello"}, use_tqdm=False)
    with pytest.raises(TypeError, match="got set"):
        engine.generate({"hello"}, use_tqdm=False)
    for bad, what in (([{"role": "user"}], "missing 'content'"), ([{"content": "hi"}], "missing 'role'"),
                      ([{"role": "user", "content": 3}], "'content' must be a string"),
                      ([["user", "hi"]], "a message is a dict"), ([[]], "must be a non-empty list of messages"), ("hi", "chat needs a list")):
        with pytest.raises(ValueError, match=what):
            engine.chat(bad, use_tqdm=False)
    _idle(engine, free)
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(llm=engine.paths[LLM], device="cpu", max_model_len=0)
    bare = Engine(llm=tiny("llama", vocab_size=50), device="cpu", kv_cache_gb=0.01)
    with pytest.raises(ValueError, match="stop strings .* need a tokenizer"):
        bare.generate([[1, 2, 3]], SamplingParams(max_tokens=4, stop="x"), use_tqdm=False)
    assert bare.num_free_blocks == bare.core.scheduler_config.num_blocks


def test_a_lone_llm_row_does_not_wait_for_a_batch_that_cannot_form(pair):
    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01, llm_min_batch=4,
                 llm_max_wait=10_000)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for prompts, policy in (([[7, 8, 9]], policies.LLMOnly()), ([[7, 8, 9], [5, 6]], policies.LLMOnly()),
                            ([[7, 8, 9], [5, 6]], [policies.LLMOnly(), policies.SLMOnly()])):
        before = eng.core.next_step
        outs = eng.generate(prompts, params, policy, use_tqdm=False)
        assert all(len(o.token_ids) == 8 for o in outs)
        assert eng.core.next_step - before <= 20, "rows must not spin on empty steps"


# ---- randomized: good and bad requests mixed ----------------------------------------------------------------
POLICIES = [policies.LLMOnly(), policies.SLMOnly(), policies.RStitch(tau=0.72), policies.SpecDecode(k=2),
            policies.SpecDecode(k=3)]


def _good(rng):
    prompt = [rng.randrange(3, 384) for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.5:
        params = SamplingParams(max_tokens=rng.randint(1, 10), temperature=0.0, ignore_eos=rng.random() < 0.5)
    else:
        params = SamplingParams(max_tokens=rng.randint(1, 10), temperature=rng.choice([0.7, 1.0, 1e-30]),
                                top_k=rng.choice([0, 5]), seed=rng.choice([rng.randrange(2**31), rng.randrange(2**63)]),
                                ignore_eos=rng.random() < 0.5)
    return prompt, params, rng.choice(POLICIES)


def _bad_request(rng):
    """A request that fails alone (finish_reason "error"), and the words its error must contain."""
    kind = rng.randrange(4)
    if kind == 0:
        return [], "empty"
    if kind == 1:
        return [5] * rng.randint(64, 80), "context holds 64"
    if kind == 2:
        return [5, rng.choice([384, 10**6, 2**31, 2**45])], "outside the vocabulary"
    return [5, -rng.randint(1, 2**40)], "outside the vocabulary"


def _bad_argument(rng):
    """(prompt, params, policy) that make generate raise before running anything, with the error."""
    kind = rng.randrange(5)
    prompt, params, policy = _good(rng)
    if kind == 0:
        params = dataclasses.replace(params)
        params.max_tokens = 2**31
        return (prompt, params, policy), (ValueError, "max_tokens")
    if kind == 1:
        params = dataclasses.replace(params)
        params.stop = 123
        return (prompt, params, policy), (ValueError, "stop")
    if kind == 2:
        return ([1, 2.5], params, policy), (TypeError, r"prompt\[1\] must be an integer")
    if kind == 3:
        return (prompt, params, "spec:4"), (ValueError, "policy must be one Policy")
    params = dataclasses.replace(params)
    params.seed = 2**64
    return (prompt, params, policy), (ValueError, "seed")


def test_randomized_mix_of_good_and_bad_requests(engine):
    rng = random.Random(13)
    free = engine.num_free_blocks
    solo_cache = {}

    def solo(prompt, params, policy):
        key = (tuple(prompt), repr(params), policy.name)
        if key not in solo_cache:
            [o] = engine.generate([prompt], params, policy, use_tqdm=False)
            solo_cache[key] = (o.token_ids, o.finish_reason)
            _idle(engine, free)
        return solo_cache[key]

    for _ in range(5):
        requests, expected_errors = [], {}
        for i in range(rng.randint(2, 6)):
            if rng.random() < 0.25:
                prompt, words = _bad_request(rng)
                _, params, policy = _good(rng)
                requests.append((prompt, params, policy))
                expected_errors[i] = words
            else:
                requests.append(_good(rng))
        if rng.random() < 0.5:  # one invalid argument somewhere: nothing runs, the engine stays usable
            bad, (error, words) = _bad_argument(rng)
            at = rng.randrange(len(requests) + 1)
            with pytest.raises(error, match=words):
                engine.generate([r[0] for r in requests[:at] + [bad] + requests[at:]],
                                [r[1] for r in requests[:at] + [bad] + requests[at:]],
                                [r[2] for r in requests[:at] + [bad] + requests[at:]], use_tqdm=False)
            _idle(engine, free)
        outs = engine.generate([r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests],
                               use_tqdm=False)
        _idle(engine, free)
        for i, (out, (prompt, params, policy)) in enumerate(zip(outs, requests)):
            if i in expected_errors:
                assert out.finish_reason == "error" and expected_errors[i] in out.error and not out.token_ids
            else:
                assert out.error is None
                assert (out.token_ids, out.finish_reason) == solo(prompt, params, policy), (i, params, policy)


def test_numpy_prompts_bool_fields_and_engine_limits(engine):
    free = engine.num_free_blocks
    ref = engine.generate([[7, 8, 9]], GREEDY, use_tqdm=False)[0].token_ids
    for prompt in (np.array([7, 8, 9], dtype=np.int32), [np.int64(7), np.int16(8), 9]):
        assert engine.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids == ref
    with pytest.raises(TypeError, match="a prompt must be a string or a list of token ids, got ndarray"):
        engine.generate([np.array([7.0, 8.0])], GREEDY, use_tqdm=False)
    for field in ("ignore_eos", "skip_special_tokens"):
        with pytest.raises(ValueError, match=f"{field} must be true or false"):
            SamplingParams(**{field: "no"})
    rows = engine.core.scheduler_config.max_logits_rows
    with pytest.raises(ValueError, match=f"k \\+ 1 = {rows + 1} rows .* max_logits_rows of {rows}"):
        engine.generate([[7, 8, 9]], GREEDY, policies.SpecDecode(k=rows), use_tqdm=False)
    with pytest.raises(ValueError, match="got dict"):
        engine.generate([[7, 8, 9]], {"max_tokens": 3}, use_tqdm=False)
    with pytest.raises(ValueError, match="list of 2, got a list of 1"):
        engine.generate([[7, 8, 9], [5]], [GREEDY], use_tqdm=False)
    _idle(engine, free)
