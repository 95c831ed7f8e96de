"""The same engine through its other execution paths: Triton kernels (the interpreter on the CPU, real
kernels on CUDA), padded static-shape decode steps (emulated graphs on the CPU, CUDA graphs on a GPU),
one-step-late results; each must give the torch path's tokens and sources. On CUDA, the steady-state loop
runs under torch.cuda.set_sync_debug_mode("error")."""
import pytest
import torch

from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.protocol import SLM

PROMPTS = [[5, 17, 200], list(range(40, 52))]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
POLICIES = [policies.RStitch(tau=0.72), policies.SpecDecode(k=3), policies.LLMOnly()]


def _same(a, b):
    for x, y in zip(a, b):
        assert (x.token_ids, x.sources) == (y.token_ids, y.sources)
        assert x.entropies == pytest.approx(y.entropies, abs=1e-4)


@pytest.fixture(scope="module")
def reference_outputs(pair):
    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01, kernels="torch")
    return {p.name: eng.generate(PROMPTS, GREEDY, p, use_tqdm=False) for p in POLICIES}


def test_emulated_graphs_match_eager(pair, reference_outputs):
    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01, cuda_graphs="emulate",
                 overlap=True)
    replays = []
    for runner in eng.core.executor.worker.runners.values():
        original = runner.graphs.replay
        runner.graphs.replay = lambda key, original=original: (replays.append(key), original(key))
    for p in POLICIES:
        _same(eng.generate(PROMPTS, GREEDY, p, use_tqdm=False), reference_outputs[p.name])
    rows = {key[0] for key in replays}
    spans = {key[1] for key in replays}
    assert rows <= {1, 2} and 1 in spans, "decode steps must go through the padded graph path"
    assert spans & {2, 4, 8, 16}, "catch-up extends must go through the padded extend graphs"


def test_emulated_graph_variants_match_eager(pair):
    """Steps with top-p cutoffs, the R-Stitch+ router (a new router drops the old one's graphs), sampled
    drafts and their verification replay their own graph variants, with the eager path's tokens."""
    from rstitch_engine.router import Router

    kw = dict(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01)
    graphs, eager = Engine(**kw, cuda_graphs="emulate"), Engine(**kw)
    torch.manual_seed(0)
    routers = [Router(32, width=16), Router(32, width=16)]
    sampled = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    runs = [(sampled, policies.RStitch(tau=0.72)), (sampled, policies.SpecDecode(k=3)), (GREEDY, policies.SpecDecode(k=2)),
            (GREEDY, policies.RStitchPlus(router=routers[0], tau=0.5)),
            (GREEDY, policies.RStitchPlus(router=routers[1], tau=0.5))]
    replayed = []
    for runner in graphs.core.executor.worker.runners.values():
        original = runner.graphs.replay
        runner.graphs.replay = lambda key, original=original: (replayed.append(key[2]), original(key))
    slm_graphs = graphs.core.executor.worker.runners[SLM].graphs.graphs
    for i, (params, policy) in enumerate(runs):
        if i == len(runs) - 1:
            first_router = {k: v for k, v in slm_graphs.items() if k[2].router}
        _same(graphs.generate(PROMPTS, params, policy, use_tqdm=False),
              eager.generate(PROMPTS, params, policy, use_tqdm=False))
    assert any(f.top_k_top_p and not f.router for f in replayed)
    assert any(f.router for f in replayed) and any(f.sampled_drafts for f in replayed)
    assert any(f.verify and f.sampling for f in replayed) and any(f.verify and not f.sampling for f in replayed)
    assert first_router and all(slm_graphs.get(k) is not v for k, v in first_router.items()), \
        "graphs of the first router must not serve the second"


@pytest.mark.slow
def test_triton_kernels_match_the_torch_path(pair, reference_outputs):
    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01, kernels="triton",
                 cuda_graphs="emulate", overlap=True)
    for p in POLICIES:
        _same(eng.generate(PROMPTS, GREEDY, p, use_tqdm=False), reference_outputs[p.name])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_replay_equals_eager(pair, dtype):
    kw = dict(slm=pair[0], llm=pair[1], device="cuda", dtype=dtype, block_size=16, kv_cache_gb=0.05, overlap=True)
    graphs, eager = Engine(**kw), Engine(**kw, cuda_graphs=False)
    prompts = PROMPTS + [[7] * 40, [300, 301]]
    for p in POLICIES:
        _same(graphs.generate(prompts, GREEDY, p, use_tqdm=False), eager.generate(prompts, GREEDY, p, use_tqdm=False))


@pytest.mark.cuda
def test_cuda_path_matches_cpu_reference(pair, reference_outputs):
    eng = Engine(slm=pair[0], llm=pair[1], device="cuda", dtype="float32", block_size=4, kv_cache_gb=0.01)
    for p in POLICIES:
        _same(eng.generate(PROMPTS, GREEDY, p, use_tqdm=False), reference_outputs[p.name])


@pytest.mark.cuda
def test_steady_state_loop_never_syncs(pair):
    eng = Engine(slm=pair[0], llm=pair[1], device="cuda", dtype="bfloat16", overlap=True)
    params = SamplingParams(max_tokens=64, temperature=0.8, seed=1, ignore_eos=True)
    eng.generate(PROMPTS, params, policies.RStitch(tau=0.72), use_tqdm=False)  # warm-up: compile, allocate
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = eng.generate(PROMPTS, params, policies.RStitch(tau=0.72), use_tqdm=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(len(o.token_ids) == 64 for o in outs)


def test_extend_padding_places_each_rows_tokens_last(pair):
    """HostPlan.pad: two rows deciding one token each (3 new tokens, then 1) into the (4 rows, span 4)
    shape: each row's tokens end its segment, logits read each segment's last token, the rest writes nothing."""
    from rstitch_engine.engine.plan import HostPlan

    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01)
    host = HostPlan(eng.core.layout, pin=False)
    v = host.views
    v.query_start_loc[:3] = [0, 3, 4]
    v.input_ids[:4], v.positions[:4], v.slot_mapping[:4] = [11, 12, 13, 21], [5, 6, 7, 9], [50, 51, 52, 60]
    v.token_index[:4] = [-1, -1, 700, 800]
    v.logits_indices[:2], v.seq_lens[:2], v.seq_slot[:2] = [2, 3], [8, 10], [0, 1]
    host.pad(2, 4, 4, sink_slot=63)
    assert v.input_ids[:16].tolist() == [0, 11, 12, 13, 0, 0, 0, 21] + [0] * 8
    assert v.positions[:8].tolist() == [0, 5, 6, 7, 0, 0, 0, 9]
    assert v.slot_mapping[:16].tolist() == [-1, 50, 51, 52, -1, -1, -1, 60] + [-1] * 8
    assert v.token_index[:8].tolist() == [-1, -1, -1, 700, -1, -1, -1, 800]
    assert v.query_start_loc[:5].tolist() == [0, 4, 8, 12, 16]
    assert v.logits_indices[:4].tolist() == [3, 7, 11, 15]
    assert v.seq_lens[:4].tolist() == [8, 10, 0, 0] and v.seq_slot[:4].tolist() == [0, 1, 63, 63]


def test_verify_padding_moves_every_logits_row_with_its_token(pair):
    """HostPlan.pad(every_token=True): two verify rows (3 tokens, then 2) into the (2 rows, span 4) shape:
    each token keeps its logits row, the group's first row is renumbered, and `order` tells where each
    logits row went."""
    from rstitch_engine.engine.plan import HostPlan

    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01)
    host = HostPlan(eng.core.layout, pin=False)
    v = host.views
    v.query_start_loc[:3] = [0, 3, 5]
    v.positions[:5], v.slot_mapping[:5] = [5, 6, 7, 9, 10], [50, 51, 52, 60, 61]
    v.logits_indices[:5], v.verify_start[:5], v.spec_index[:5] = range(5), [0, 0, 0, 3, 3], [0, 1, 2, 0, 1]
    v.sample_pos[:5], v.out_slot[:5] = [6, 7, 8, 10, 11], [0, 0, 0, 1, 1]
    v.seq_lens[:2], v.seq_slot[:2] = [8, 11], [0, 1]
    order = host.pad(2, 2, 4, sink_slot=63, every_token=True)
    assert order.tolist() == [1, 2, 3, 6, 7]
    assert v.positions[:8].tolist() == [0, 5, 6, 7, 0, 0, 9, 10]
    assert v.logits_indices[:8].tolist() == list(range(8))
    assert v.verify_start[:8].tolist() == [-1, 1, 1, 1, -1, -1, 6, 6]
    assert v.spec_index[:8].tolist() == [-1, 0, 1, 2, -1, -1, 0, 1]
    assert v.sample_pos[:8].tolist() == [0, 6, 7, 8, 0, 0, 10, 11]
    assert v.out_slot[:8].tolist() == [63, 0, 0, 0, 63, 63, 1, 1]
    assert v.out_pos[[0, 4, 5]].tolist() == [-1, -1, -1]
