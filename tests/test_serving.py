"""`rstitch serve` on a tiny random pair: a real uvicorn server on 127.0.0.1 at a free port, driven by the
official openai client and by raw HTTP (streams, disconnects, bad requests, metrics, failures)."""
import asyncio
import time
import json
import re

import httpx
import pytest

openai = pytest.importorskip("openai")

from helpers import nan_embedding_copy  # noqa: E402
from rstitch_engine import Engine, SamplingParams, policies  # noqa: E402
from rstitch_engine.protocol import LLM, SLM  # noqa: E402
from rstitch_engine.serving.app import ServerConfig  # noqa: E402
from rstitch_engine.serving.server import ServerThread  # noqa: E402

MODEL = "tiny-pair"
POLICY_FIELDS = {"llm": policies.LLMOnly(), "slm": policies.SLMOnly(), "rstitch:0.5": policies.RStitch(tau=0.5),
                 "spec:3": policies.SpecDecode(k=3)}


@pytest.fixture(scope="module")
def engine(pair):
    return Engine(slm=pair[0], llm=pair[1], device="cpu", kv_cache_gb=0.05, max_model_len=256, max_num_seqs=48)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, ServerConfig(MODEL, policies.RStitch(tau=0.5))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def offline(engine, prompt, max_tokens, policy, stop=None, chat=False):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
    if chat:
        return engine.chat([[{"role": "user", "content": prompt}]], params, policy, use_tqdm=False)[0]
    return engine.generate([prompt], params, policy, use_tqdm=False)[0]


def test_openai_client_completions_streamed_and_not(client, engine):
    ref = offline(engine, "hello there", 12, policies.RStitch(tau=0.5))
    whole = client.completions.create(model=MODEL, prompt="hello there", max_tokens=12, temperature=0)
    assert whole.choices[0].text == ref.text and whole.usage.completion_tokens == len(ref.token_ids)
    assert whole.usage.prompt_tokens == len(ref.prompt_token_ids)
    stream = client.completions.create(model=MODEL, prompt="hello there", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason == "length"


def test_openai_client_chat_streamed_and_not_with_stop_strings(client, engine):
    policy = policies.LLMOnly()
    ref = offline(engine, "hi", 24, policy, chat=True)
    stop = ref.text[9:12]  # a stop string inside the answer: the stream holds back text that may start it
    cut = offline(engine, "hi", 24, policy, stop=[stop], chat=True)
    assert cut.text == ref.text[:ref.text.find(stop)] and cut.finish_reason == "stop"
    for stops, expected in ((None, ref), ([stop], cut)):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=24, temperature=0,
                  stop=stops, extra_body={"rstitch": {"policy": "llm"}})
        whole = client.chat.completions.create(**kw)
        assert whole.choices[0].message.content == expected.text
        assert whole.choices[0].finish_reason == expected.finish_reason
        deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                  if c.choices]
        assert "".join(deltas) == expected.text


def test_routing_field_and_routing_stats(client, engine):
    for name, policy in POLICY_FIELDS.items():
        ref = offline(engine, [7, 8, 9], 16, policy)
        resp = client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=16, temperature=0,
                                         extra_body={"rstitch": {"policy": name, "return_sources": True}})
        body = resp.model_dump()
        assert body["choices"][0]["sources"] == ref.sources
        stats = body["rstitch"]
        assert stats["llm_tokens"] == ref.stats["llm_tokens"] and stats["slm_tokens"] == ref.stats["slm_tokens"]
        assert stats["switches_to_llm"] == ref.stats["switches_to_llm"]
        assert stats["llm_share"] == pytest.approx(ref.stats["llm_tokens"] / len(ref.token_ids))
        assert stats["drafted"] == ref.stats["drafted"] and stats["accepted"] == ref.stats["accepted"]
        if name.startswith("spec"):  # vLLM's per-request speculative decoding metrics
            spec = body["metrics"]["speculative_decoding"]
            assert spec["num_draft_tokens"] == ref.stats["drafted"] > 0
            assert spec["num_drafts"] == ref.stats["verify_steps"]
            assert spec["acceptance_rate"] == pytest.approx(ref.stats["accepted"] / ref.stats["drafted"])
            mean_length = 1 + ref.stats["accepted"] / ref.stats["verify_steps"]
            assert spec["mean_acceptance_length"] == pytest.approx(mean_length)
            chunks = list(client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=16, temperature=0,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"rstitch": {"policy": name}}))
            assert chunks[-1].model_dump()["metrics"]["speculative_decoding"] == spec  # the usage chunk
        else:
            assert "metrics" not in body
    fields = client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=16, temperature=0,
                                       extra_body={"rstitch": {"policy": "rstitch", "tau": 0.5}})
    grammar = client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=16, temperature=0,
                                        extra_body={"rstitch": {"policy": "rstitch:0.5"}})
    assert fields.choices[0].text == grammar.choices[0].text


def test_n_and_seeds(client):
    resp = client.completions.create(model=MODEL, prompt="abc", max_tokens=10, temperature=1.0, seed=5, n=3)
    again = client.completions.create(model=MODEL, prompt="abc", max_tokens=10, temperature=1.0, seed=5, n=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [c.text for c in again.choices]
    assert len({c.text for c in resp.choices}) > 1  # choice j samples with seed + j
    assert resp.usage.completion_tokens == 30


async def _stream_tokens(http: httpx.AsyncClient, body: dict, stop_after: int | None = None):
    """(text, sources, finish_reason) of one streamed completion; with stop_after, disconnects after that
    many chunks."""
    text, sources, finish, chunks = "", [], None, 0
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            sources += choice.get("sources", [])
            finish = choice["finish_reason"] or finish
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return None
    return text, sources, finish


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"rstitch:{name}") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            if re.match(rf"rstitch:{re.escape(name)}(\{{|\s)", line):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_streams_disconnects_and_metrics(server, engine):
    prompts = [[(7 * i + j) % 300 + 3 for j in range(1 + i % 5)] for i in range(32)]
    names = list(POLICY_FIELDS)
    refs = [offline(engine, p, 20, POLICY_FIELDS[names[i % 4]]) for i, p in enumerate(prompts)]
    free = engine.num_free_blocks
    before = httpx.get(server.url + "/metrics").text

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            def body(i, p, **kw):
                return {"model": MODEL, "prompt": p, "max_tokens": 20, "temperature": 0,
                        "rstitch": {"policy": names[i % 4], "return_sources": True}, **kw}
            good = [_stream_tokens(http, body(i, p)) for i, p in enumerate(prompts)]
            leaving = [_stream_tokens(http, body(i, [5, 6, i + 3], max_tokens=200, ignore_eos=True), stop_after=3)
                       for i in range(8)]
            return await asyncio.gather(*good, *leaving)

    results = asyncio.run(main())
    for (text, sources, finish), ref in zip(results[:32], refs):
        assert (text, sources, finish) == (ref.text, ref.sources, ref.finish_reason)
    deadline = time.monotonic() + 60  # the aborted requests' blocks come back once the step thread took the aborts
    while time.monotonic() < deadline:  # (seconds on a machine busy with other jobs)
        if engine.num_free_blocks == free and not engine.has_unfinished_requests():
            break
        time.sleep(0.01)
    assert engine.num_free_blocks == free and not engine.has_unfinished_requests()
    after = httpx.get(server.url + "/metrics").text
    delta = lambda name, **kw: _metric(after, name, **kw) - _metric(before, name, **kw)  # noqa: E731
    assert delta("request_success_total", finished_reason="length") == 32
    assert delta("request_success_total", finished_reason="abort") == 8
    received = [s for _, sources, _ in results[:32] for s in sources]
    # the 8 aborted streams received some tokens too; the counters count what was sent to every client
    llm_sent, slm_sent = delta("generation_tokens_total", source="llm"), delta("generation_tokens_total", source="slm")
    assert llm_sent >= received.count(LLM) and slm_sent >= received.count(SLM)
    assert llm_sent + slm_sent - len(received) <= 8 * 200
    assert delta("prompt_tokens_total") == sum(len(p) for p in prompts) + 8 * 3
    assert delta("e2e_request_latency_seconds_count") == 40
    assert delta("llm_wait_seconds_count") == 40  # one observation per finished request, parked or not
    assert 0 < delta("llm_steps_total") <= engine.sched.llm_steps
    assert _metric(after, "num_requests_running") == 0 and _metric(after, "kv_cache_usage_perc") == 0


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "nonsense": 1}, 400, "nonsense"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * 300}, 400, "context holds"),
    ("/v1/completions", {"prompt": [5, 10**6]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n must be an integer in [1, 16]"),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "n must be an integer in [1, 16]"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "x", "rstitch": {"policy": "fast"}}, 400, "rstitch.policy"),
    ("/v1/completions", {"prompt": "x", "rstitch": {"policy": "rstitch", "tau": "high"}}, 400, "tau"),
    ("/v1/completions", {"prompt": "x", "rstitch": {"policy": "spec", "k": 0}}, 400, "k must be"),
    ("/v1/completions", {"prompt": "x", "rstitch": {"policy": "spec", "tau": 0.1}}, 400, "rstitch.tau"),
    ("/v1/completions", {"prompt": "x", "rstitch": {"policy": "rstitch+"}}, 400, "router"),
    ("/v1/completions", {"prompt": "x", "rstitch": {"polcy": "llm"}}, 400, "rstitch.polcy"),
    ("/v1/completions", {"prompt": "x", "rstitch": "llm"}, 400, "rstitch"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, 400, "prompt"),
]


@pytest.mark.parametrize("path, body, status, words", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_naming_the_problem(server, path, body, status, words):
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] or words in (error["param"] or "")
    assert error["code"] == status and error["type"]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null", b"\"text\""])
def test_malformed_bodies_get_400(server, content):
    r = httpx.post(server.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_models_and_health(server, engine):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == engine.max_model_len
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.fixture(scope="module")
def nan_pair(pair, tmp_path_factory):
    """The tiny pair with one token's embedding row NaN in the LLM: a request with that token fails there."""
    return pair[0], nan_embedding_copy(pair[1], tmp_path_factory.mktemp("nan-llm"))


def test_nan_fails_alone_max_waiting_and_a_dead_step_loop(nan_pair):
    eng = Engine(slm=nan_pair[0], llm=nan_pair[1], device="cpu", kv_cache_gb=0.05, max_model_len=1024,
                 max_num_seqs=1)
    with ServerThread(eng, ServerConfig(MODEL, policies.LLMOnly(), max_waiting=1)) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as http:
                checked, chunks_after = asyncio.Event(), []

                async def long_stream():  # holds the one sequence slot until the checks are done
                    body = {"prompt": [5, 6], "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
                            "stream": True}
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {") and checked.is_set():
                                chunks_after.append(json.loads(line[6:]))
                                if len(chunks_after) == 3:
                                    return  # disconnects: the request is aborted
                    raise AssertionError("the long request ended before the checks")

                long = asyncio.create_task(long_stream())
                while s.online.num_running == 0:
                    await asyncio.sleep(0.002)
                nan = asyncio.create_task(http.post("/v1/completions", json={"prompt": [5, 77, 6], "max_tokens": 5,
                                                                              "temperature": 0}))
                while s.online.num_waiting == 0:  # the NaN request waits for the one sequence slot
                    await asyncio.sleep(0.002)
                full = await http.post("/v1/completions", json={"prompt": [5], "max_tokens": 2})
                checked.set()
                await long
                while s.online.num_running:  # the long one aborted, the NaN request runs and fails
                    await asyncio.sleep(0.002)
                return chunks_after, await nan, full

        chunks_after, failed, full = asyncio.run(main())
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks_after)  # streamed on
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert "waiting" in full.json()["error"]["message"]
        assert failed.status_code == 500 and "NaN" in failed.json()["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 200

        def broken_step():
            raise RuntimeError("device lost")

        eng.core.step = broken_step
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 4}, timeout=60)
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
        assert httpx.post(s.url + "/v1/completions", json={"prompt": [5], "max_tokens": 2}).status_code == 503
    assert eng.num_free_blocks == eng.sched.num_blocks


def test_rstitch_plus_uses_the_router_the_server_loaded(engine, tmp_path):
    from rstitch_engine.router import Router

    path = Router(engine.configs[SLM].hidden_size, init_switch_prob=1 - 1e-6).save(tmp_path / "router.safetensors")
    ref = offline(engine, [7, 8, 9], 12, policies.RStitchPlus(router=str(path), tau=0.3))
    with ServerThread(engine, ServerConfig(MODEL, policies.LLMOnly(), router=str(path))) as s:
        body = {"prompt": [7, 8, 9], "max_tokens": 12, "temperature": 0,
                "rstitch": {"policy": "rstitch+", "tau": 0.3, "return_sources": True}}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["sources"] == ref.sources
        assert r.json()["rstitch"]["llm_tokens"] == ref.stats["llm_tokens"]
        other = httpx.post(s.url + "/v1/completions", json={**body, "rstitch": {"policy": "rstitch+",
                                                                              "router": "elsewhere.safetensors"}})
        assert other.status_code == 400 and "not loaded" in other.json()["error"]["message"]


def test_the_servers_policy_decides_requests_that_name_none(engine):
    """ServerConfig.default_policy (`rstitch serve --policy` / `--tau`) routes requests without a `rstitch`
    policy; None leaves them to the engine's default (R-Stitch with both models); a lone server names no
    replica."""
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "temperature": 0}
    with ServerThread(engine, ServerConfig(MODEL, policies.LLMOnly())) as s:
        stats = httpx.post(s.url + "/v1/completions", json=body).json()["rstitch"]
        assert stats["llm_share"] == 1.0 and stats["switches_to_llm"] == 0 and "replica" not in stats
    with ServerThread(engine, ServerConfig(MODEL, None)) as s:  # R-Stitch starts on the SLM
        assert httpx.post(s.url + "/v1/completions", json=body).json()["rstitch"]["switches_to_llm"] > 0


def test_api_key_guards_v1_and_leaves_health_and_metrics_open(engine, monkeypatch):
    """--api-key: /v1/* needs 'Authorization: Bearer KEY' (401 in OpenAI's error shape without it or with
    another key); /health and /metrics stay open; the OpenAI client with the key works."""
    from rstitch_engine.serving import is_loopback

    key = "sk-test-7f3a"
    with ServerThread(engine, ServerConfig(MODEL, policies.LLMOnly(), api_key=key)) as s:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key},
                        {"Authorization": f"Bearer {key}x"}):
            for method, path, kw in (("POST", "/v1/completions", {"json": body}), ("GET", "/v1/models", {})):
                r = httpx.request(method, s.url + path, headers=headers, **kw)
                assert r.status_code == 401, (headers, path)
                assert r.json()["error"]["type"] == "AuthenticationError" and "API key" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 200
        r = httpx.post(s.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        authed = openai.OpenAI(base_url=s.url + "/v1", api_key=key)
        assert authed.models.list().data[0].id == MODEL
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope").models.list()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")


def test_serve_warns_without_a_key_off_the_loopback_and_reads_the_key_from_the_environment(pair, monkeypatch,
                                                                                           capsys):
    """`rstitch serve` on a non-loopback host without a key warns; RSTITCH_API_KEY gives the key."""
    from rstitch_engine import cli

    served = []
    monkeypatch.setattr("rstitch_engine.serving.server.serve", lambda engine, config, **kw: served.append((config, kw)))
    args = ["serve", "--slm", str(pair[0]), "--llm", str(pair[1]), "--kv-cache-gb", "0.01"]
    cli.main(args + ["--host", "0.0.0.0"])
    assert "without an API key" in capsys.readouterr().err and served[-1][0].api_key is None
    monkeypatch.setenv("RSTITCH_API_KEY", "from-env")
    cli.main(args + ["--host", "0.0.0.0"])
    assert "without an API key" not in capsys.readouterr().err and served[-1][0].api_key == "from-env"
    cli.main(args + ["--api-key", "given"])
    assert served[-1][0].api_key == "given" and served[-1][1]["host"] == "127.0.0.1"


def test_body_limit_and_request_timeout(engine, monkeypatch):
    """A body over max_request_bytes is a 413 (declared or chunked); a request running past
    request_timeout_s is aborted, its blocks freed, and answered 408 (an error event once streaming)."""
    import time as clock

    free = engine.num_free_blocks
    config = ServerConfig(MODEL, policies.LLMOnly(), max_request_bytes=300, request_timeout_s=0.5)
    with ServerThread(engine, config) as s:
        small = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(s.url + "/v1/completions", json=small).status_code == 200
        big = {**small, "prompt": "x" * 400}
        r = httpx.post(s.url + "/v1/completions", json=big)
        assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]
        chunked = httpx.post(s.url + "/v1/completions", content=iter([json.dumps(big).encode()]))  # no length
        assert chunked.status_code == 413
        step = engine.step
        monkeypatch.setattr(engine, "step", lambda: (clock.sleep(0.05), step())[1])  # >= 5 s for 100 tokens
        slow = {"model": MODEL, "prompt": "hi", "max_tokens": 100, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/completions", json=slow, timeout=60)
        assert r.status_code == 408 and r.json()["error"]["type"] == "TimeoutError"
        events = [line for line in httpx.post(s.url + "/v1/completions", json={**slow, "stream": True},
                                              timeout=60).text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["type"] == "TimeoutError"
        monkeypatch.setattr(engine, "step", step)
        for _ in range(100):  # the aborts reach the step thread at its next step
            if engine.num_free_blocks == free:
                break
            clock.sleep(0.05)
        assert engine.num_free_blocks == free


def test_prefix_cache_hits_and_length_limits(pair):
    """A repeated prefix over HTTP: identical outputs, hits in the response's `rstitch` stats and the same counts
    in /metrics; a given max_tokens past the context and n choices past the KV cache are 400s naming the field."""
    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.002, max_model_len=256)
    kv_tokens = eng.sched.num_blocks * eng.sched.block_size
    assert kv_tokens < 16 * 256
    shared = list(range(40, 77))
    with ServerThread(eng, ServerConfig(MODEL, policies.RStitch(tau=0.5))) as s:
        before = httpx.get(s.url + "/metrics").text
        bodies = [{"model": MODEL, "prompt": shared + [t], "max_tokens": 12, "temperature": 0} for t in (5, 5, 6)]
        answers = [httpx.post(s.url + "/v1/completions", json=b, timeout=60).json() for b in bodies]
        after = httpx.get(s.url + "/metrics").text
        assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
        stats = [a["rstitch"] for a in answers]
        assert stats[0]["prefix_hits_slm"] == 0 and stats[1]["prefix_hits_slm"] == stats[2]["prefix_hits_slm"] == 36
        for model in ("slm", "llm"):
            hits = _metric(after, "prefix_cache_hits_total", model=model) - _metric(before, "prefix_cache_hits_total",
                                                                                     model=model)
            assert hits == sum(st[f"prefix_hits_{model}"] for st in stats)
            queries = _metric(after, "prefix_cache_queries_total", model=model) - _metric(
                before, "prefix_cache_queries_total", model=model)
            assert queries == 3 * 38
        offline_out = offline(eng, shared + [6], 12, policies.RStitch(tau=0.5))
        assert answers[2]["choices"][0]["text"] == offline_out.text
        for body, param in (({"prompt": [5] * 200, "max_tokens": 57}, "max_tokens"),
                            ({"prompt": [5] * 10, "max_tokens": 246, "n": 16}, "n")):
            r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, **body}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        ok = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": [5] * 200, "max_tokens": 56,
                                                         "temperature": 0}, timeout=60)
        assert ok.status_code == 200
    assert eng.num_free_blocks == eng.sched.num_blocks
