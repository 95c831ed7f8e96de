"""The Python API around generation: parameters, errors per request, stop conditions, chat, tokenizer-less
checkpoints, continuous batching under memory pressure, and the CLI."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.cli import main
from rstitch_engine.config import ModelConfig


@pytest.fixture(scope="module")
def llm(tiny):
    return tiny("qwen2", init_std=0.3, layers=2)


@pytest.fixture(scope="module")
def engine(llm):
    return Engine(llm=llm, device="cpu", block_size=4, kv_cache_gb=0.01, max_model_len=256)


@pytest.mark.parametrize("kw, msg", [
    (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=0), "max_tokens"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(temperature=-0.1), "temperature"), (dict(top_k=-2), "top_k"),
    (dict(seed=1.5), "seed"), (dict(stop=[""]), "stop"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_invalid_sampling_params_raise_when_built(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_a_bad_request_fails_alone(engine):
    free = engine.num_free_blocks
    params = SamplingParams(max_tokens=5, temperature=0.0)
    outs = engine.generate([[5, 6, 7], [1] * 300, [], [8, 10**6], "hello"], params, use_tqdm=False)
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 5
    assert outs[1].finish_reason == "error" and "context holds 256" in outs[1].error
    assert outs[2].finish_reason == "error" and "empty" in outs[2].error
    assert outs[3].finish_reason == "error" and "outside the vocabulary" in outs[3].error
    assert outs[4].finish_reason == "length" and outs[4].text
    assert engine.num_free_blocks == free


def test_bad_arguments_are_clear(engine):
    with pytest.raises(TypeError, match="string or a list of token ids"):
        engine.generate([3.5], use_tqdm=False)
    for items, index in (([1, "2"], 1), ([1, None], 1), ([True], 0)):
        with pytest.raises(TypeError, match=f"prompt\\[{index}\\] must be an integer"):
            engine.generate([items], use_tqdm=False)
    with pytest.raises(ValueError, match="one SamplingParams or a list of 2"):
        engine.generate([[1], [2]], [SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="needs the SLM"):
        engine.generate([[1]], SamplingParams(), policies.RStitch(), use_tqdm=False)
    with pytest.raises(ValueError, match="tau must be a number"):
        policies.RStitch(tau=float("nan"))
    with pytest.raises(ValueError, match="exceeds the models' context"):
        Engine(llm=engine.paths[1], device="cpu", max_model_len=10**6)


def test_outputs_come_back_in_input_order_and_finish_alone(engine):
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (9, 2, 30, 1)]
    outs = engine.generate([[3, 4], [5] * 20, [6], [7, 8, 9]], params, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [9, 2, 30, 1]
    assert [o.index for o in outs] == [0, 1, 2, 3]


def test_greedy_is_independent_of_batch_and_streams(engine):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    streamed = {}
    outs = engine.generate([[3, 4], [5] * 20, [6]], params, use_tqdm=False,
                           on_tokens=lambda i, toks, srcs: streamed.setdefault(i, []).extend(toks))
    assert all(streamed[i] == o.token_ids for i, o in enumerate(outs))
    assert engine.generate([[5] * 20], params, use_tqdm=False)[0].token_ids == outs[1].token_ids


def test_stop_strings_and_stop_token_ids(engine):
    base = engine.generate(["The answer"], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    out = engine.generate(["The answer"], SamplingParams(max_tokens=30, temperature=0.0, stop=stop,
                                                         ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == base.text[:3] and len(out.token_ids) < 30
    tid = base.token_ids[4]
    out = engine.generate(["The answer"], SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[tid],
                                                         ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == tid
    assert tid not in out.token_ids[:-1]


def test_tokenizing_does_not_wait_for_a_running_step(engine):
    """Tokenization has its own lock: while another thread holds the step lock (a step runs), tokenize,
    chat_prompts and a request's encoding still finish; detokenization waits for the tokenizer, not the step."""
    import threading

    stepping, release = threading.Event(), threading.Event()

    def long_step():
        with engine._lock:
            stepping.set()
            release.wait(30)

    holder = threading.Thread(target=long_step)
    holder.start()
    try:
        assert stepping.wait(10)
        done = {}
        worker = threading.Thread(target=lambda: done.update(
            ids=engine.tokenize("hello world"), chat=engine.chat_prompts([{"role": "user", "content": "hi"}]),
            encoded=engine._encode("hello world")))
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "tokenizing waited for the step lock"
        assert done["encoded"] == ("hello world", done["ids"]) and "hi" in done["chat"][0]
    finally:
        release.set()
        holder.join()


def test_min_tokens_defers_eos(engine):
    params = SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=list(range(384)), min_tokens=7)
    out = engine.generate([[3, 4]], params, use_tqdm=False)[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "stop"


def test_chat_applies_the_template(engine):
    out = engine.chat([{"role": "user", "content": "What is 7 times 8?"}], SamplingParams(max_tokens=4),
                      use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>user\nWhat is 7 times 8?<|im_end|>")
    assert out.prompt.endswith("<|im_start|>assistant\n")


def test_checkpoint_without_tokenizer_takes_token_ids(tiny):
    eng = Engine(llm=tiny("llama", vocab_size=50), device="cpu", kv_cache_gb=0.01)
    assert eng.tokenizer is None
    out = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 4 and out.text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        eng.generate(["text"], use_tqdm=False)


def test_memory_pressure_preempts_and_never_leaks(llm):
    # 12 blocks of 4 tokens for 8 requests growing to ~30 tokens each: most must wait or be preempted.
    per_token = ModelConfig.from_dir(llm).kv_bytes_per_token(torch.float32)
    eng = Engine(llm=llm, device="cpu", block_size=4, kv_cache_gb=12 * 4 * per_token / 2**30, max_model_len=48,
                 max_num_seqs=8)
    assert eng.core.scheduler_config.num_blocks == 12
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [[i + 3] * (3 + i) for i in range(8)]
    outs = eng.generate(prompts, params, use_tqdm=False)
    roomy = Engine(llm=llm, device="cpu", block_size=4, kv_cache_gb=0.01)
    ref = roomy.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert sum(o.stats["preemptions"] for o in outs) > 0
    assert eng.num_free_blocks == 12


def test_a_crash_mid_batch_frees_every_block(engine, monkeypatch):
    free = engine.num_free_blocks
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fault")
        return original(*a, **k)

    original = engine.core.step
    monkeypatch.setattr(engine.core, "step", boom)
    with pytest.raises(RuntimeError, match="device fault"):
        engine.generate([[1, 2], [3, 4]], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    monkeypatch.undo()
    assert engine.num_free_blocks == free
    assert engine.generate([[1, 2]], SamplingParams(max_tokens=3), use_tqdm=False)[0].finish_reason == "length"


def test_cli_generate_marks_llm_tokens(pair, capsys):
    main(["generate", "--slm", str(pair[0]), "--llm", str(pair[1]), "--tau", "0.72", "--max-tokens", "16",
          "--no-color", "The quick brown fox"])
    captured = capsys.readouterr()
    assert "[[" in captured.out and "]]" in captured.out
    assert "SLM" in captured.err and "switches to the LLM" in captured.err


def test_cli_make_tiny_and_help(tmp_path):
    main(["make-tiny", str(tmp_path / "m"), "--arch", "qwen3"])
    assert (tmp_path / "m" / "model.safetensors").is_file()
    helptext = subprocess.run([sys.executable, "-m", "rstitch_engine", "--help"], capture_output=True, text=True)
    assert helptext.returncode == 0
    for command in ("generate", "make-tiny", "demo", "eval", "bench", "calibrate", "train-router"):
        assert command in helptext.stdout


def test_cli_eval_runs_end_to_end_on_a_tiny_pair(pair, tmp_path, capsys):
    out = tmp_path / "eval"
    main(["eval", "--slm", str(pair[0]), "--llm", str(pair[1]), "--synthetic", "3", "--max-tokens", "8",
          "--policies", "llm,slm,rstitch:0.72,spec:2", "--out", str(out), "--no-progress"])
    table = capsys.readouterr().out
    for name in ("llm", "slm", "rstitch:0.72", "spec:2"):
        assert name in table
    for f in ("records.jsonl", "summary.json", "summary.md", "pareto.png", "view-rstitch_0.72.html"):
        assert (out / f).stat().st_size > 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 12


def test_cli_eval_resume_runs_only_the_missing_policies(pair, tmp_path, monkeypatch):
    """--resume keeps a policy's records when --out holds them for the same problems and runs the others."""
    runs = []
    chat = Engine.chat
    monkeypatch.setattr(Engine, "chat", lambda self, *a, policy, **kw: runs.append(policy.name) or
                        chat(self, *a, policy=policy, **kw))
    out = tmp_path / "eval"
    common = ["eval", "--slm", str(pair[0]), "--llm", str(pair[1]), "--max-tokens", "6", "--out", str(out),
              "--no-progress", "--level", "hard"]
    main(common + ["--synthetic", "3", "--policies", "llm"])
    first = (out / "records.jsonl").read_text().splitlines()
    main(common + ["--synthetic", "3", "--policies", "llm,slm", "--resume"])
    lines = (out / "records.jsonl").read_text().splitlines()
    assert runs == ["llm", "slm"] and lines[:3] == first and len(lines) == 6
    assert [json.loads(line)["policy"] for line in lines] == ["llm"] * 3 + ["slm"] * 3
    assert {r["policy"] for r in json.loads((out / "summary.json").read_text())["rows"]} == {"llm", "slm"}
    main(common + ["--synthetic", "2", "--policies", "llm", "--resume"])  # other problems: nothing to keep
    assert runs == ["llm", "slm", "llm"] and len((out / "records.jsonl").read_text().splitlines()) == 2


def test_cli_eval_compares_a_router_file_with_rstitch(pair, tmp_path, capsys):
    from rstitch_engine.router.model import Router

    hidden = json.loads((pair[0] / "config.json").read_text())["hidden_size"]
    Router(hidden, init_switch_prob=0.9).save(tmp_path / "always.safetensors")  # switches wherever H > tau
    out = tmp_path / "eval"
    main(["eval", "--slm", str(pair[0]), "--llm", str(pair[1]), "--synthetic", "3", "--max-tokens", "8",
          "--policies", f"rstitch:0.72,rstitch+:0.72@{tmp_path}/always.safetensors", "--out", str(out),
          "--no-progress"])
    assert "rstitch+:0.72@always" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    by_policy = {}
    for r in records:
        by_policy.setdefault(r["policy"], []).append((r["text"], r["llm_share"]))
    assert by_policy["rstitch+:0.72@always"] == by_policy["rstitch:0.72"]  # R-Stitch's identity, problem by problem
    assert any(share > 0 for _, share in by_policy["rstitch:0.72"])  # the LLM took part: the identity is not vacuous


@pytest.mark.parametrize("kw", [dict(temperature=0.8), dict(temperature=1.2, top_p=0.8), dict(temperature=0.7, top_k=20)])
def test_seeded_sampling_is_reproducible_and_batch_independent(engine, kw):
    prompt = [11, 12, 13]
    params = SamplingParams(max_tokens=20, seed=5, ignore_eos=True, **kw)
    alone = engine.generate([prompt], params, use_tqdm=False)[0].token_ids
    others = [SamplingParams(max_tokens=n, seed=n, ignore_eos=True, **kw) for n in (3, 30, 7)]
    batched = engine.generate([[4, 5], prompt, [6] * 9, [7]], [others[0], params, others[1], others[2]],
                              use_tqdm=False)[1].token_ids
    assert alone == batched == engine.generate([prompt], params, use_tqdm=False)[0].token_ids
    other_seed = engine.generate([prompt], dataclasses.replace(params, seed=6), use_tqdm=False)[0].token_ids
    greedy = engine.generate([prompt], dataclasses.replace(params, temperature=0.0), use_tqdm=False)[0].token_ids
    assert other_seed != alone and greedy != alone


def test_cli_demo_streams_and_compares(pair, capsys):
    main(["demo", "--slm", str(pair[0]), "--llm", str(pair[1]), "--tau", "0.72", "--max-tokens", "12",
          "--no-color"])
    out = capsys.readouterr().out
    assert "--- R-Stitch (rstitch:0.72)" in out and "--- LLM only (llm)" in out
    assert "[[" in out, "the LLM's tokens are marked in the streamed R-Stitch answer"
    assert "R-Stitch took" in out and "LLM only" in out


def test_warm_up_leaves_the_engine_as_it_was(pair):
    """warm_up (default on CUDA) runs every path once at construction; afterwards nothing is held and
    unseeded sampling draws the same seeds as without it."""
    from rstitch_engine import policies

    params = SamplingParams(max_tokens=10, temperature=0.9)
    outs = {}
    for warm in (False, True):
        eng = Engine(slm=pair[0], llm=pair[1], device="cpu", kv_cache_gb=0.02, max_num_seqs=20, warm_up=warm)
        assert eng.num_free_blocks == eng.sched.num_blocks and not eng.has_unfinished_requests()
        outs[warm] = [o.token_ids for o in eng.generate([[7, 8, 9], [5]], params, policies.RStitch(tau=0.5),
                                                        use_tqdm=False)]
    assert outs[True] == outs[False]
    with pytest.raises(ValueError, match="warm_up"):
        Engine(llm=pair[1], device="cpu", warm_up="yes")
