"""Automatic prefix caching over both models' KV (docs/design.md, 'Prefix caching'): outputs equal to the
full-recompute reference and to an engine without the cache, cold and warm, greedy and seeded; hits counted
per model, a prefix the LLM computed reused by the SLM's request and the other way round; eviction under a
small pool; a NaN in shared KV fails every request that read it; blocks always return."""
import pytest
import torch

import reference
from helpers import hf_model, nan_embedding_copy
from rstitch_engine import Engine, SamplingParams, policies

BS = 4
SYSTEM = list(range(200, 219))  # a shared "system prompt": 4 full blocks and 3 tokens
PROMPTS = [SYSTEM + [5, 17], SYSTEM + [5, 18, 33], SYSTEM[:10] + [7], SYSTEM + list(range(60, 70)), SYSTEM]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
TAU = 0.72  # both models produce tokens with this pair (tests/test_rstitch.py)


def cacheable(prompt) -> int:
    """Prompt tokens a warm cache holds for a request: full blocks short of the last token."""
    return (len(prompt) - 1) // BS * BS


@pytest.fixture(scope="module")
def engines(pair):
    kw = dict(slm=pair[0], llm=pair[1], device="cpu", dtype="float32", block_size=BS, kv_cache_gb=0.02)
    return {"sync": Engine(**kw), "overlap": Engine(**kw, overlap=True), "off": Engine(**kw, prefix_caching=False)}


@pytest.fixture(scope="module")
def hf_pair(pair):
    return hf_model(pair[0]), hf_model(pair[1])


def expected(hf_pair, eng, prompt, tau=TAU):
    return reference.rstitch(*hf_pair, prompt, GREEDY.max_tokens, set(eng.eos_ids), eng.vocab_limit, tau)


@pytest.mark.parametrize("mode", ["sync", "overlap"])
def test_cold_and_warm_match_the_reference(engines, hf_pair, mode):
    eng = engines[mode]
    assert eng.reset_prefix_cache()
    free = eng.num_free_blocks
    want = [expected(hf_pair, eng, p) for p in PROMPTS]
    cold = eng.generate(PROMPTS, GREEDY, policies.RStitch(tau=TAU), use_tqdm=False)
    warm = eng.generate(PROMPTS, GREEDY, policies.RStitch(tau=TAU), use_tqdm=False)
    for p, c, w, (tokens, sources) in zip(PROMPTS, cold, warm, want):
        assert (c.token_ids, c.sources) == (tokens, sources)
        assert (w.token_ids, w.sources) == (tokens, sources)
        assert w.stats["prefix_queries"] == len(p)
        # R-Stitch starts on the SLM, which computed every prompt block in the cold run
        assert w.stats["prefix_hits_slm"] == cacheable(p)
        assert w.stats["extend_tokens_slm"] <= c.stats["extend_tokens_slm"]
    assert sum(w.stats["extend_tokens_slm"] for w in warm) < sum(c.stats["extend_tokens_slm"] for c in cold)
    # one batch admitted in one step: the later requests already share the first one's system prompt
    assert sum(c.stats["prefix_hits_slm"] for c in cold) >= 3 * 16
    assert {0, 1} <= {s for c in cold for s in c.sources}, "this tau must let both models produce tokens"
    assert eng.num_free_blocks == free


def test_a_prefix_one_model_computed_serves_the_other_models_request(engines, hf_pair):
    """LLM-only fills the LLM's KV of the system prompt; an R-Stitch request then hits it for the LLM, computes
    the SLM's KV into the shared blocks itself, and a third request hits both."""
    eng = engines["sync"]
    assert eng.reset_prefix_cache()
    free = eng.num_free_blocks
    [llm_only] = eng.generate([SYSTEM + [1]], GREEDY, policies.LLMOnly(), use_tqdm=False)
    assert llm_only.token_ids == reference.rstitch(*hf_pair, SYSTEM + [1], GREEDY.max_tokens, set(eng.eos_ids),
                                                   eng.vocab_limit, -1.0)[0]
    second, third = (eng.generate([SYSTEM + [t]], GREEDY, policies.RStitch(tau=TAU), use_tqdm=False)[0]
                     for t in (2, 3))
    assert (second.stats["prefix_hits_llm"], second.stats["prefix_hits_slm"]) == (16, 0)
    assert (third.stats["prefix_hits_llm"], third.stats["prefix_hits_slm"]) == (16, 16)
    for t, out in ((2, second), (3, third)):
        assert (out.token_ids, out.sources) == expected(hf_pair, eng, SYSTEM + [t])
    assert eng.num_free_blocks == free


@pytest.mark.parametrize("policy", [policies.RStitch(tau=TAU), policies.SpecDecode(k=3), policies.LLMOnly()],
                         ids=["rstitch", "spec", "llm"])
def test_seeded_sampling_is_the_same_with_and_without_the_cache(engines, policy):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=5)
    off = engines["off"].generate(PROMPTS, params, policy, use_tqdm=False)
    for _ in range(2):  # cold (for this policy's model mix) and warm
        on = engines["overlap"].generate(PROMPTS, params, policy, use_tqdm=False)
        assert [(o.token_ids, o.sources) for o in on] == [(o.token_ids, o.sources) for o in off]
    assert all(o.stats["prefix_hits_slm"] + o.stats["prefix_hits_llm"] == 0 for o in off)


def test_eviction_in_a_small_pool_keeps_outputs_and_blocks(pair):
    """A pool of a few dozen blocks, two sequence slots, many distinct prompts: cached blocks are evicted and
    reused all the time, and every output equals the engine's without the cache."""
    kw = dict(slm=pair[0], llm=pair[1], device="cpu", dtype="float32", block_size=BS, kv_cache_gb=1e-4,
              max_num_seqs=2, max_model_len=64)
    on, off = Engine(**kw), Engine(**kw, prefix_caching=False)
    gen = torch.Generator().manual_seed(3)
    prompts = [SYSTEM[:8] + torch.randint(0, 300, (int(n),), generator=gen).tolist()
               for n in torch.randint(4, 20, (12,), generator=gen)] + [SYSTEM[:8] + [9, 9]]
    free = on.num_free_blocks
    assert free < 3 * len(prompts), "the pool must be too small to cache every prompt"
    for _ in range(2):
        a = on.generate(prompts, GREEDY, policies.RStitch(tau=TAU), use_tqdm=False)
        b = off.generate(prompts, GREEDY, policies.RStitch(tau=TAU), use_tqdm=False)
        assert [(o.token_ids, o.sources) for o in a] == [(o.token_ids, o.sources) for o in b]
    assert sum(o.stats["prefix_hits_slm"] for o in a) > 0
    assert on.num_free_blocks == free


@pytest.fixture(scope="module")
def nan_pair(pair, tmp_path_factory):
    """The tiny pair with one token's embedding row NaN in the SLM."""
    return nan_embedding_copy(pair[0], tmp_path_factory.mktemp("nan-slm")), pair[1]


def test_nan_in_shared_kv_fails_every_request_that_read_it(nan_pair):
    """The torch attention reference turns NaN keys into zeros, so a request that only reads a poisoned shared
    block would go on with finite garbage: it fails with the request that computed the block, and the block
    is not offered again."""
    eng = Engine(slm=nan_pair[0], llm=nan_pair[1], device="cpu", dtype="float32", block_size=BS, kv_cache_gb=0.02)
    free = eng.num_free_blocks
    poisoned = [1, 77] + SYSTEM
    outs = eng.generate([poisoned + [5], poisoned + [6], SYSTEM + [7]], GREEDY, policies.SLMOnly(), use_tqdm=False)
    assert [o.finish_reason for o in outs[:2]] == ["error", "error"]
    assert "NaN" in outs[0].error and "NaN" in outs[1].error
    assert outs[1].stats["prefix_hits_slm"] == 20, "the second request read the first one's blocks"
    assert outs[2].finish_reason != "error", "a request that shares nothing with them runs"
    [again] = eng.generate([poisoned + [8]], GREEDY, policies.SLMOnly(), use_tqdm=False)
    assert again.finish_reason == "error" and again.stats["prefix_hits_slm"] == 0
    assert eng.num_free_blocks == free


def test_cache_off_registers_nothing(pair):
    eng = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=BS, kv_cache_gb=0.01, prefix_caching=False)
    assert eng.sched.num_cached_blocks == 0
    eng.generate([SYSTEM], GREEDY, use_tqdm=False)
    assert eng.sched.num_cached_blocks == 0, "nothing is registered with the cache off"
    with pytest.raises(TypeError, match="prefix_caching"):
        Engine(slm=pair[0], llm=pair[1], device="cpu", prefix_caching="yes")


def test_a_request_that_skips_the_cache_neither_reads_nor_offers(engines, hf_pair):
    """SamplingParams(skip_prefix_cache=True): the request computes its whole prompt whatever is cached, and
    leaves nothing for later requests; its trace is that of an engine without the cache."""
    eng, off = engines["sync"], engines["off"]
    assert eng.reset_prefix_cache()
    free = eng.num_free_blocks
    skip = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0.0, skip_prefix_cache=True)
    rstitch = policies.RStitch(tau=TAU)
    [first] = eng.generate([PROMPTS[0]], skip, rstitch, use_tqdm=False)
    assert eng.sched.num_cached_blocks == 0, "a skipping request offers none of its blocks"
    [shared] = eng.generate([PROMPTS[0]], GREEDY, rstitch, use_tqdm=False)
    assert shared.stats["prefix_hits_slm"] == 0, "nothing was left by the skipping request"
    [again] = eng.generate([PROMPTS[0]], skip, rstitch, use_tqdm=False)
    [alone] = off.generate([PROMPTS[0]], GREEDY, rstitch, use_tqdm=False)
    tokens, sources = expected(hf_pair, eng, PROMPTS[0])
    for out in (first, again):
        assert (out.token_ids, out.sources) == (tokens, sources)
        assert out.trace == alone.trace, "the skipping request ran the forwards of a cache-free engine"
        assert out.stats["prefix_queries"] == out.stats["prefix_hits_slm"] == out.stats["prefix_hits_llm"] == 0
    assert eng.sched.num_cached_blocks > 0, "the request that did not skip offered its blocks"
    assert eng.num_free_blocks == free
    with pytest.raises(TypeError, match="skip_prefix_cache"):
        SamplingParams(skip_prefix_cache="yes")
