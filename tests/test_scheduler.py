"""The C++ scheduler against a simulated device (tests/sim_device.py): every policy, with and without
one-step-late results, under preemption and chunked prefill, must give exactly the tokens and sources of
the rules applied by full recomputation, and return every block."""
import math
import random

import pytest

from rstitch_engine import _C
from sim_device import SimDevice, make_scheduler, reference, run_to_completion

INF = math.inf
VOCAB, EOS = 50, 7


def prompts(n, seed=0, lo=3, hi=20):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def add(sched, rid, prompt, max_tokens, **policy):
    spec = _C.RequestSpec()
    spec.id, spec.prompt, spec.max_tokens, spec.stop_ids = rid, prompt, max_tokens, [EOS]
    for k, v in policy.items():
        setattr(spec, k, v)
    return sched.add(spec)


def run_batch(policy: dict, ref_kw: dict, *, n=6, max_tokens=40, max_inflight=1, seed=0, device=None, **sched_kw):
    sched = make_scheduler(max_inflight=max_inflight, vocab=VOCAB, **sched_kw)
    dev = SimDevice(sched, sched_kw.get("max_num_seqs", 8), 128, VOCAB)
    if device is not None:
        device.append(dev)
    ps = prompts(n, seed)
    for i, p in enumerate(ps):
        assert add(sched, i, p, max_tokens, **policy) == ""
    run_to_completion(sched, dev, max_inflight)
    outs = [sched.output(i) for i in range(n)]
    for p, o in zip(ps, outs):
        ref_tokens, ref_sources = reference(p, max_tokens, EOS, VOCAB, **ref_kw)
        assert o["token_ids"] == ref_tokens
        assert o["sources"] == ref_sources
        s = o["stats"]
        assert s["slm_tokens"] + s["llm_tokens"] == len(o["token_ids"])
        assert s["discarded_slm_tokens"] == s["switches_to_llm"]
    assert sched.num_free_blocks == sched.num_blocks, "blocks leaked"
    return outs


@pytest.mark.parametrize("max_inflight", [1, 2])
@pytest.mark.parametrize("tau", [-1.0, 0.2, 0.5, 0.8, 1.0])
def test_rstitch_matches_reference(tau, max_inflight):
    outs = run_batch(dict(tau_up=tau, tau_down=tau), dict(tau_up=tau, tau_down=tau), max_inflight=max_inflight)
    sources = [s for o in outs for s in o["sources"]]
    if tau < 0:
        assert set(sources) == {1}
    elif tau >= 1:
        assert set(sources) == {0}
    else:
        assert set(sources) == {0, 1}, "both models must produce tokens at this tau"


@pytest.mark.parametrize("park", [dict(llm_min_batch=4, llm_max_wait=3), dict(llm_batch_share=0.75, llm_max_wait=3)])
@pytest.mark.parametrize("max_inflight", [1, 2])
def test_parking_llm_rows_changes_timing_not_outputs(max_inflight, park):
    mean_llm_batch, waits = [], []
    for kw in (dict(), park):
        devices = []
        outs = run_batch(dict(tau_up=0.5, tau_down=0.5), dict(tau_up=0.5, tau_down=0.5), max_inflight=max_inflight,
                         device=devices, **kw)
        rows = devices[0].rows_run[1]
        mean_llm_batch.append(sum(rows) / len(rows))
        waits.append(sum(o["stats"]["llm_wait_steps"] for o in outs))
    assert mean_llm_batch[1] > 1.2 * mean_llm_batch[0], mean_llm_batch
    assert waits[0] == 0 < waits[1]


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_share_parking_keeps_reference_tokens_at_any_batch(batch):
    """Tokens and sources equal the full-recompute rules with parking on; at batch 1 nothing ever waits (the
    one request is all that could join), above it rows do."""
    outs = run_batch(dict(tau_up=0.5, tau_down=0.5), dict(tau_up=0.5, tau_down=0.5), n=batch, max_num_seqs=16,
                     num_blocks=256, llm_batch_share=0.5, llm_max_wait=4, seed=batch)
    waits = sum(o["stats"]["llm_wait_steps"] for o in outs)
    assert waits == 0 if batch == 1 else waits > 0


def test_share_parking_decisions():
    """Constructed cases: 4 forced requests, request 0 needs the LLM from its second token, the others never.
    With share 0.5 the LLM row waits (1 ready of 4 that could join: 2 wanted) for llm_max_wait steps, then
    runs; with share 0.25 (1 wanted) or without other work it never waits."""
    def waited(share, max_wait, others=3, slots=8):
        sched = make_scheduler(llm_batch_share=share, llm_max_wait=max_wait, vocab=VOCAB, max_num_seqs=slots)
        dev = SimDevice(sched, slots, 128, VOCAB)
        for i in range(1 + others):
            spec = _C.RequestSpec()  # no stop ids: every request runs its 6 tokens
            spec.id, spec.prompt, spec.max_tokens = i, [3, 4, 5], 6
            spec.forced = [0, 1, 1, 0, 0, 0] if i == 0 else [0] * 6
            assert sched.add(spec) == ""
        run_to_completion(sched, dev, 1)
        out = sched.output(0)
        assert out["sources"] == [0, 1, 1, 0, 0, 0]
        return out["stats"]["llm_wait_steps"]
    assert waited(0.5, 3) == 3  # parked at its first LLM token until it had waited 3 steps
    assert waited(0.5, 0) == 0
    assert waited(0.25, 3) == 0
    assert waited(1.0, 3, others=0) == 0  # alone: all that could join are ready
    # 2 slots and 6 more requests queued: only requests that can start count, so 1 of 2 is enough at 0.5
    assert waited(0.5, 3, others=7, slots=2) == 0
    assert waited(1.0, 3, others=7, slots=2) == 3  # share 1 wants both running rows


def test_separate_thresholds():
    run_batch(dict(tau_up=0.6, tau_down=0.3), dict(tau_up=0.6, tau_down=0.3), max_inflight=2)


@pytest.mark.parametrize("max_inflight", [1, 2])
def test_overlap_marks_flipped_rows_stale(max_inflight):
    outs = run_batch(dict(tau_up=0.5, tau_down=0.5), dict(tau_up=0.5, tau_down=0.5), max_inflight=max_inflight)
    stale = sum(o["stats"]["stale_rows"] for o in outs)
    switches = sum(o["stats"]["switches_to_llm"] + o["stats"]["switches_to_slm"] for o in outs)
    if max_inflight == 1:
        assert stale == 0
    else:
        assert 0 < stale <= switches + len(outs), "a stale row per flip (or stop), no more"


def test_pessimistic_llm_rows_are_never_stale_after_a_hand_back():
    """optimistic_llm=False: an LLM row waits for its pending decision instead of being dispatched as if it
    stayed on the LLM, so no hand-back leaves a stale row; the optimistic rule loses one per hand-back. The
    same tokens either way (run_batch checks them against the reference)."""
    stale, switches = {}, {}
    for optimistic in (True, False):
        outs = run_batch(dict(tau_up=0.5, tau_down=0.5), dict(tau_up=0.5, tau_down=0.5), max_inflight=2,
                         optimistic_llm=optimistic)
        stale[optimistic] = sum(o["stats"]["stale_rows"] for o in outs)
        switches[optimistic] = [sum(o["stats"][k] for o in outs) for k in ("switches_to_llm", "switches_to_slm")]
    to_llm, hand_backs = switches[False]
    assert switches[True] == switches[False] and hand_backs > 0
    assert stale[False] <= to_llm + len(outs), "stale rows only from SLM -> LLM flips (and stops)"
    assert stale[True] >= stale[False] + hand_backs // 2, "the optimistic rule's hand-backs make rows stale"


@pytest.mark.parametrize("max_inflight", [1, 2])
def test_preemption_recomputes_and_matches(max_inflight):
    # 10 blocks of 4 tokens for 6 requests that each grow past 20 tokens: they cannot all stay resident.
    outs = run_batch(dict(tau_up=0.5, tau_down=0.5), dict(tau_up=0.5, tau_down=0.5), max_inflight=max_inflight,
                     num_blocks=16, max_tokens=30)
    assert sum(o["stats"]["preemptions"] for o in outs) > 0


@pytest.mark.parametrize("max_inflight", [1, 2])
def test_chunked_prefill_matches(max_inflight):
    """Prompts longer than the step budget (7 tokens) are prefilled in chunks of at most 7, and the outputs
    still match the reference."""
    outs = run_batch(dict(tau_up=0.5, tau_down=0.5), dict(tau_up=0.5, tau_down=0.5), max_inflight=max_inflight,
                     max_step_tokens=7, n=4)
    chunked = 0
    for o in outs:
        prefill = [new for _, new, start in o["trace"] if start < o["num_prompt_tokens"]]
        assert sum(prefill) >= o["num_prompt_tokens"] and max(prefill) <= 7
        chunked += len(prefill) > 1
    assert chunked >= 2, "prompts of 15 and 20 tokens must take several chunks"


@pytest.mark.parametrize("max_inflight", [1, 2])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_decoding_is_llm_only(k, max_inflight):
    outs = run_batch(dict(spec_k=k), dict(tau_up=INF, tau_down=-INF, spec_k=k), max_inflight=max_inflight)
    for o in outs:
        s = o["stats"]
        assert o["sources"].count(1) == s["verify_steps"], "one LLM token per verification"
        assert s["accepted"] <= s["drafted"] <= k * s["verify_steps"]


def test_handover_after_one():
    run_batch(dict(tau_up=0.5, tau_down=0.5, handover_after=1), dict(tau_up=0.5, tau_down=0.5, handover_after=1),
              max_inflight=2)


def test_forced_pattern():
    forced = [1 if 5 <= i < 9 or 20 <= i < 22 else 0 for i in range(40)]
    outs = run_batch(dict(forced=forced, tau_up=0.0), dict(tau_up=0.0, tau_down=0.0, forced=forced),
                     max_inflight=2, max_tokens=30)
    for o in outs:
        n = len(o["sources"])
        assert o["sources"] == forced[:n]


def test_llm_only_and_slm_only_need_one_model():
    outs = run_batch(dict(start_model=1, tau_down=-INF), dict(tau_up=INF, tau_down=-INF, start=1), models=(1,))
    assert all(set(o["sources"]) <= {1} for o in outs)


def test_requests_are_refused_with_reasons():
    sched = make_scheduler(models=(1,), max_model_len=32)
    assert "empty" in add(sched, 0, [], 4)
    assert "outside the vocabulary" in add(sched, 1, [1, VOCAB], 4)
    assert "context" in add(sched, 2, [1] * 32, 4)
    assert "needs the SLM" in add(sched, 3, [1, 2], 4, start_model=0)
    assert "already in use" in add(sched, 4, [1], 4, start_model=1) + add(sched, 4, [1], 4, start_model=1)


def test_abort_and_errors_free_blocks_and_spare_the_others():
    sched = make_scheduler(max_inflight=2)
    dev = SimDevice(sched, 8, 128, VOCAB)
    for i, p in enumerate(prompts(4)):
        add(sched, i, p, 30, tau_up=0.5, tau_down=0.5)
    for step in range(3):
        dev.plan(step)
        for m in (0, 1):
            if dev.field(m, "header")[0]:
                dev.run(m)
        if step:
            dev.commit(step - 1, [0, 1])
    sched.abort(0)
    sched.fail(1, "boom")
    dev.commit(2, [0, 1])  # planned before the abort: its rows for 0 and 1 are ignored
    run_to_completion(sched, dev, 1)
    assert sched.output(0)["finish_reason"] == "abort"
    assert sched.output(1)["finish_reason"] == "error" and sched.output(1)["error"] == "boom"
    assert all(sched.output(i)["finish_reason"] in ("stop", "length") for i in (2, 3))
    assert sched.num_free_blocks == sched.num_blocks


@pytest.mark.parametrize("policy", [dict(tau_up=0.5, tau_down=0.5), dict(spec_k=3)])
def test_nan_logits_fail_one_request_only(policy):
    sched = make_scheduler(max_inflight=2)
    dev = SimDevice(sched, 8, 128, VOCAB)
    ps = prompts(4)
    for i, p in enumerate(ps):
        add(sched, i, p, 20, **policy)
    dev.nan_slots.add(1)  # sequence slots are handed out in admission order: request 1 gets slot 1
    run_to_completion(sched, dev, 2)
    assert sched.output(1)["finish_reason"] == "error" and "NaN" in sched.output(1)["error"]
    for i in (0, 2, 3):
        assert sched.output(i)["finish_reason"] in ("stop", "length")
    assert sched.num_free_blocks == sched.num_blocks
