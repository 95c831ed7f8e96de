"""The online core: AsyncEngine (join mid-batch, abort, ordering, failures) and Engine from several threads."""
import asyncio
import threading

import pytest

from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.async_engine import AsyncEngine, EngineDeadError, RequestRejected

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[7, 8, 9], [5, 6], [11, 3, 4, 2], [40, 41], [9]]
POLICIES = [policies.LLMOnly(), policies.SLMOnly(), policies.RStitch(tau=0.72), policies.SpecDecode(k=3),
            policies.RStitch(tau=0.5)]


@pytest.fixture(scope="module")
def engine(pair):
    return Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01, max_model_len=64)


@pytest.fixture(scope="module")
def solo(engine):
    """Each (prompt, policy) run alone through the offline API: the reference for every online run."""
    return [engine.generate([p], GREEDY, pol, use_tqdm=False)[0] for p, pol in zip(PROMPTS, POLICIES)]


@pytest.fixture
def online(engine):
    a = AsyncEngine(engine)
    yield a
    a.shutdown()
    assert a.engine.num_free_blocks == a.engine.sched.num_blocks, "KV blocks leaked"


async def collect(a, prompt, params=GREEDY, policy=None, request_id=None, on_first=None):
    outs = []
    async for out in a.stream(prompt, params, policy=policy, request_id=request_id):
        if not outs and on_first is not None:
            on_first()
        outs.append(out)
    return outs


def test_streams_join_a_running_batch_and_match_solo_runs(online, solo):
    async def main():
        joined = asyncio.Event()
        first = asyncio.create_task(collect(online, PROMPTS[0], policy=POLICIES[0], on_first=joined.set))
        await joined.wait()  # the first request is running: the others join its batch
        rest = [asyncio.create_task(collect(online, p, policy=pol)) for p, pol in zip(PROMPTS[1:], POLICIES[1:])]
        return await asyncio.gather(first, *rest)

    for outs, ref in zip(asyncio.run(main()), solo):
        final = outs[-1].output
        assert [t for o in outs for t in o.token_ids] == final.token_ids == ref.token_ids
        assert [s for o in outs for s in o.sources] == final.sources == ref.sources
        assert "".join(o.text for o in outs) == final.text == ref.text
        assert all(not o.finished for o in outs[:-1]) and final.finish_reason == "length"
        m = final.metrics
        assert m["arrival_time"] <= m["first_scheduled_time"] <= m["first_token_time"] <= m["finished_time"]


def test_abort_stops_within_two_steps_and_leaves_others_unchanged(online, solo, engine, monkeypatch):
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    steps = {}
    abort_requests = engine.abort_requests

    def recording_abort(outputs):
        steps["aborted"] = engine.core.next_step
        abort_requests(outputs)

    monkeypatch.setattr(engine, "abort_requests", recording_abort)

    async def main():
        tokens_seen = asyncio.Event()

        async def victim():
            outs = []
            async for out in online.stream(PROMPTS[1], long, policy=POLICIES[2], request_id="victim"):
                outs.append(out)
                if len(outs) == 2:
                    tokens_seen.set()
            return outs

        async def abort_it():
            await tokens_seen.wait()
            steps["asked"] = engine.core.next_step
            await online.abort("victim")

        return await asyncio.gather(victim(), collect(online, PROMPTS[0], policy=POLICIES[0]), abort_it())

    victim_outs, other, _ = asyncio.run(main())
    final = victim_outs[-1].output
    assert final.finish_reason == "abort" and len(final.token_ids) < 40
    assert final.token_ids == [t for o in victim_outs for t in o.token_ids]
    assert other[-1].output.token_ids == solo[0].token_ids
    assert steps["aborted"] - steps["asked"] <= 2


def test_leaving_a_stream_early_aborts_it(online):
    async def main():
        stream = online.stream(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True),
                               request_id="early")
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(200):  # the step thread takes the abort at its next step
            if online.num_running == 0 and online.num_waiting == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_rejections_and_invalid_arguments(online, engine):
    async def main():
        with pytest.raises(RequestRejected, match="context holds 64"):
            await online.generate([5] * 70, GREEDY)
        with pytest.raises(RequestRejected, match="outside the vocabulary"):
            await online.generate([5, 10**6], GREEDY)
        with pytest.raises(TypeError, match=r"prompt\[1\] must be an integer"):
            await online.generate([5, "x"], GREEDY)
        with pytest.raises(ValueError, match="stop must be"):
            bad = SamplingParams()
            bad.stop = 3
            await online.generate([5], bad)
        # a duplicate request id while the first runs
        first = asyncio.create_task(collect(online, [5, 6], SamplingParams(max_tokens=30, temperature=0.0,
                                                                           ignore_eos=True), request_id="dup"))
        await asyncio.sleep(0)
        while online.num_running == 0 and not first.done():
            await asyncio.sleep(0.005)
        with pytest.raises(ValueError, match="already running"):
            await online.generate([5], GREEDY, request_id="dup")
        await first
        return await online.generate([7, 8, 9], GREEDY, policy=POLICIES[0])

    out = asyncio.run(main())
    assert out.finish_reason == "length" and len(out.token_ids) == 12


def test_a_failing_step_loop_fails_requests_in_flight(pair):
    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01, max_model_len=64)
    online = AsyncEngine(eng)
    original, calls = eng.core.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("device lost")
        return original()

    eng.core.step = failing_step

    async def main():
        with pytest.raises(EngineDeadError, match="device lost"):
            await collect(online, PROMPTS[0], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
        with pytest.raises(EngineDeadError):
            await online.generate(PROMPTS[1], GREEDY)

    asyncio.run(main())
    assert not online.healthy and isinstance(online.error, RuntimeError)
    online.shutdown()


def test_engine_from_two_threads_shares_one_batch_correctly(engine, solo):
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def run(name, idx):
        try:
            barrier.wait()
            outs = engine.generate([PROMPTS[i] for i in idx], GREEDY, [POLICIES[i] for i in idx], use_tqdm=False)
            results[name] = outs
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    free = engine.num_free_blocks
    threads = [threading.Thread(target=run, args=("a", [0, 2, 4])), threading.Thread(target=run, args=("b", [1, 3]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for name, idx in (("a", [0, 2, 4]), ("b", [1, 3])):
        assert [o.token_ids for o in results[name]] == [solo[i].token_ids for i in idx]
        assert [o.index for o in results[name]] == list(range(len(idx)))
    assert engine.num_free_blocks == free


def test_offline_generate_beside_an_async_engine(online, engine, solo):
    async def main():
        task = asyncio.create_task(collect(online, PROMPTS[3], policy=POLICIES[3]))
        offline = await asyncio.to_thread(engine.generate, [PROMPTS[0]], GREEDY, POLICIES[0], False)
        return offline, await task

    offline, streamed = asyncio.run(main())
    assert offline[0].token_ids == solo[0].token_ids
    assert streamed[-1].output.token_ids == solo[3].token_ids


def test_the_front_detokenizes_what_has_no_stop_strings(online, engine, solo, monkeypatch):
    """Requests without stop strings are detokenized on the event loop, not in the step thread, with the
    same text; a request with stop strings is detokenized in the step (its stop must be known before the
    next step is planned) and stops as offline."""
    threads = []
    decode = engine.tokenizer.decode

    def recording_decode(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "decode", recording_decode)
    outs = asyncio.run(collect(online, PROMPTS[2], policy=POLICIES[2]))
    assert "".join(o.text for o in outs) == outs[-1].output.text == solo[2].text
    assert threads and "rstitch-step-loop" not in threads, "no text was made in the step thread"
    stop = solo[2].text[3:5]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    [offline] = engine.generate([PROMPTS[2]], params, POLICIES[2], use_tqdm=False)
    threads.clear()
    outs = asyncio.run(collect(online, PROMPTS[2], params, policy=POLICIES[2]))
    assert "".join(o.text for o in outs) == outs[-1].output.text == offline.text
    assert outs[-1].output.token_ids == offline.token_ids and outs[-1].output.finish_reason == "stop"
    assert "rstitch-step-loop" in threads
