"""Tensor parallelism. The model level: a rank's shard of the shapes (ModelConfig.shard) and of the weights
(load_weights(shard=...)), and the forward with an all-reduce after o_proj and down, run in spawned gloo
processes (never forked; each test under a timeout, so a hang fails) against the unsharded forward. The
engine level: Engine(tensor_parallel_size=2) against one rank, errors, a killed rank, Ctrl-C."""
from __future__ import annotations

import dataclasses
import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from helpers import engine_logits
from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.cli import DEMO_QUESTION
from rstitch_engine.config import ModelConfig
from rstitch_engine.engine.mp_executor import MultiprocExecutor, RankError, free_port
from rstitch_engine.protocol import SLM
from rstitch_engine.router.model import Router

RANK_TIMEOUT_S = 120
IDS = [5, 17, 200, 9, 31, 64, 3, 120, 77, 8, 250, 14, 99]


def _rank_logits(rank: int, size: int, port: int, path: str, ids: list[int], out) -> None:
    """One rank: its shard of the weights, the forward with gloo all-reduces; rank 0 sends the logits."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        logits = engine_logits(path, ids, shard=(rank, size), all_reduce=dist.all_reduce)
        if rank == 0:
            out.put(logits)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _sharded_logits(path, size: int) -> torch.Tensor:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    ranks = [ctx.Process(target=_rank_logits, args=(r, size, port, str(path), IDS, out)) for r in range(size)]
    for p in ranks:
        p.start()
    try:
        logits = out.get(timeout=RANK_TIMEOUT_S)
        for p in ranks:
            p.join(RANK_TIMEOUT_S)
            assert p.exitcode == 0, f"rank {ranks.index(p)} exited with {p.exitcode}"
        return logits
    finally:
        for p in ranks:  # a hang or a failure leaves no process behind
            if p.is_alive():
                p.kill()
                p.join()


@pytest.mark.parametrize("arch, kw", [("qwen2", {}),                      # qkv bias, 4 heads / 2 KV heads
                                      ("qwen3", {"kv_heads": 1}),         # q/k norm, 1 KV head replicated
                                      ("llama", {"heads": 8, "kv_heads": 4, "tied": True})])
def test_two_ranks_give_the_unsharded_logits(tiny, arch, kw):
    path = tiny(arch, init_std=0.2, **kw)
    want = engine_logits(path, IDS)
    got = _sharded_logits(path, 2)
    # fp32: the all-reduce only reorders sums, ~1e-6 relative; the argmax must agree everywhere
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_shard_shapes_and_errors(tiny):
    cfg = ModelConfig.from_dir(tiny("qwen2", heads=8, kv_heads=2, intermediate=96))
    two = cfg.shard(2)
    assert (two.num_heads, two.num_kv_heads, two.intermediate_size) == (4, 1, 48)
    four = cfg.shard(4)  # fewer KV heads than ranks: one each, replicated
    assert (four.num_heads, four.num_kv_heads, four.intermediate_size) == (2, 1, 24)
    assert cfg.shard(1) == cfg
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's 8 attention heads"):
        cfg.shard(3)
    with pytest.raises(ValueError, match="tensor_parallel_size 8 does not divide the model's 100 intermediate_size"):
        dataclasses.replace(cfg, intermediate_size=100).shard(8)
    odd = ModelConfig.from_dir(tiny("qwen2", heads=6, kv_heads=3, intermediate=96))
    with pytest.raises(ValueError, match="neither divides the model's 3 KV heads nor is a multiple of them"):
        odd.shard(2)
    with pytest.raises(ValueError, match="must be >= 1"):
        cfg.shard(0)


# ---- the engine with tensor-parallel ranks (engine/mp_executor.py) ------------------------------------------
# Each test is bounded without a test timeout: every collective times out (COLLECTIVE_TIMEOUT_S) and every
# pipe read polls with a timeout, so a hang becomes an error.
PROMPTS = [[5, 17, 200], list(range(40, 61)), [9] * 7 + [250, 3], [100], list(range(300, 340, 3)), [77, 78] * 5,
           [3, 1, 4, 1, 5, 9, 2, 6], list(range(120, 150))]
TAU = 0.72  # both models produce tokens with this pair (tests/test_rstitch.py)


@pytest.fixture(scope="module")
def tp_engines(pair):
    kw = dict(slm=pair[0], llm=pair[1], device="cpu", dtype="float32", block_size=4, kv_cache_gb=0.02)
    with Engine(**kw, tensor_parallel_size=2) as two:
        yield Engine(**kw), two


def _policies(pair, tmp_path_factory):
    router = Router(ModelConfig.from_dir(pair[0]).hidden_size, init_switch_prob=0.5)
    path = router.save(tmp_path_factory.mktemp("router") / "router.safetensors")
    return [policies.LLMOnly(), policies.RStitch(tau=TAU), policies.SpecDecode(k=3),
            policies.RStitchPlus(router=path, tau=0.6)]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_two_ranks_give_the_tokens_of_one(tp_engines, pair, tmp_path_factory, batch, sampled):
    """fp32 over gloo: the all-reduces only reorder the sums of o_proj and down (about 1e-6 relative), so the
    tokens, sources and decisions are the same unless a logit pair or an entropy sits that close to a tie or
    to tau; these prompts have none (tolerance: none)."""
    one, two = tp_engines
    params = (SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7) if sampled
              else SamplingParams(max_tokens=12, temperature=0.0))
    free = two.num_free_blocks
    for policy in _policies(pair, tmp_path_factory):
        want = one.generate(PROMPTS[:batch], params, policy, use_tqdm=False)
        got = two.generate(PROMPTS[:batch], params, policy, use_tqdm=False)
        assert [(o.token_ids, o.sources) for o in got] == [(o.token_ids, o.sources) for o in want], policy.name
    if not sampled:
        assert {s for o in two.generate(PROMPTS, params, policies.RStitch(tau=TAU), use_tqdm=False)
                for s in o.sources} == {0, 1}, "this tau must let both models produce tokens"
    assert two.num_free_blocks == free


def test_the_slm_split_too(pair):
    kw = dict(slm=pair[0], llm=pair[1], device="cpu", dtype="float32", block_size=4, kv_cache_gb=0.01)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    want = Engine(**kw).generate(PROMPTS[:4], params, policies.RStitch(tau=TAU), use_tqdm=False)
    with Engine(**kw, tensor_parallel_size=2, slm_tensor_parallel_size=2) as two:
        assert two.core.executor.worker.models[SLM].num_heads == 2
        got = two.generate(PROMPTS[:4], params, policies.RStitch(tau=TAU), use_tqdm=False)
    assert [(o.token_ids, o.sources) for o in got] == [(o.token_ids, o.sources) for o in want]


def test_sizes_that_cannot_split_are_refused_before_any_process_starts(pair):
    kw = dict(slm=pair[0], llm=pair[1], device="cpu", kv_cache_gb=0.01)
    before = set(mp.active_children())
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's 4 attention heads"):
        Engine(**kw, tensor_parallel_size=3)
    with pytest.raises(ValueError, match=r"slm_tensor_parallel_size must be 1 or tensor_parallel_size \(2\)"):
        Engine(**kw, tensor_parallel_size=2, slm_tensor_parallel_size=4)
    with pytest.raises(ValueError, match="random weights"):
        Engine(llm="random:tiny", device="cpu", tensor_parallel_size=2)
    assert set(mp.active_children()) == before


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    """The device count is checked before anything starts (faked here: no GPU on the CI machine)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = SimpleNamespace(tensor_parallel_size=2, torch_device=torch.device("cuda"))
    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs 2 GPUs; this machine has 1"):
        MultiprocExecutor(config, {}, {}, vocab_limit=8)


def test_a_killed_rank_fails_the_requests_naming_it_and_close_leaves_nothing(pair):
    kw = dict(slm=pair[0], llm=pair[1], device="cpu", dtype="float32", block_size=4, kv_cache_gb=0.01)
    before = set(mp.active_children())
    eng = Engine(**kw, tensor_parallel_size=2)
    ranks = list(eng.core.executor.ranks)
    assert eng.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0].token_ids
    os.kill(ranks[0].pid, signal.SIGKILL)
    ranks[0].join(RANK_TIMEOUT_S)
    outputs = []
    with pytest.raises(RankError, match="tensor-parallel rank 1"):
        eng.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=8), policies.LLMOnly(), use_tqdm=False,
                     on_tokens=lambda *a: outputs.append(a))
    assert not eng.has_unfinished_requests() and eng.num_free_blocks == eng.sched.num_blocks
    eng.close()
    assert all(p.exitcode is not None for p in ranks) and set(mp.active_children()) == before


_CTRL_C_SCRIPT = """
import sys
from rstitch_engine import Engine, SamplingParams
eng = Engine(slm=sys.argv[1], llm=sys.argv[2], device="cpu", kv_cache_gb=0.01, tensor_parallel_size=2)
print(*[p.pid for p in eng.core.executor.ranks], flush=True)
eng.generate([[5, 6, 7]], SamplingParams(max_tokens=100000, ignore_eos=True), use_tqdm=False)
"""


def test_ctrl_c_leaves_no_rank_behind(pair):
    proc = subprocess.Popen([sys.executable, "-c", _CTRL_C_SCRIPT, str(pair[0]), str(pair[1])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        proc.wait(RANK_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in pids:
        for _ in range(RANK_TIMEOUT_S * 10):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid), f"rank process {pid} outlived the engine"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.demo_pair
@pytest.mark.slow
def test_the_demo_pair_split_over_two_ranks_answers_like_one():
    """The demo's question (rstitch demo) on the real pair in fp32: two ranks give the one rank's answer. Both
    models split, and the one-rank engine freed first, so that no more than one copy of the fp32 weights
    (8 GB) is held at a time."""
    conversation = [[{"role": "user", "content": DEMO_QUESTION}]]
    params = SamplingParams(max_tokens=40, temperature=0.0)
    kw = dict(slm="demo:slm", llm="demo:llm", device="cpu", dtype="float32", kv_cache_gb=0.1)
    with Engine(**kw) as one:
        want = one.chat(conversation, params, policies.RStitch(tau=0.05), use_tqdm=False)[0]
    del one
    gc.collect()
    with Engine(**kw, tensor_parallel_size=2, slm_tensor_parallel_size=2) as two:
        got = two.chat(conversation, params, policies.RStitch(tau=0.05), use_tqdm=False)[0]
    assert (got.text, got.sources) == (want.text, want.sources) and 0 < sum(want.sources) < len(want.sources)
