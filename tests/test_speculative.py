"""Speculative decoding in the engine: greedy output is the LLM-only output for several k, batched; with
sampling, the output distribution is the LLM's (chi-square over many seeded runs on a tiny vocabulary)."""

import pytest
import torch

from helpers import hf_model
from rstitch_engine import Engine, SamplingParams, policies

PROMPTS = [[5, 17, 200], list(range(40, 61)), [9] * 7 + [250, 3], [100], list(range(300, 340, 3))]


@pytest.fixture(scope="module", params=["sync", "overlap"])
def engine(request, close_pair):
    return Engine(slm=close_pair[0], llm=close_pair[1], device="cpu", dtype="float32", block_size=4, kv_cache_gb=0.02,
                  overlap=request.param == "overlap")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_decoding_is_llm_only(engine, k):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    free = engine.num_free_blocks
    ref = engine.generate(PROMPTS, params, policies.LLMOnly(), use_tqdm=False)
    outs = engine.generate(PROMPTS, params, policies.SpecDecode(k=k), use_tqdm=False)
    accepted = 0
    for r, o in zip(ref, outs):
        assert o.token_ids == r.token_ids and o.finish_reason == r.finish_reason
        s = o.stats
        assert s["accepted"] <= s["drafted"] <= k * s["verify_steps"]
        assert o.sources.count(1) == s["verify_steps"], "each verification emits one LLM token"
        assert o.sources.count(0) == s["accepted"]
        accepted += s["accepted"]
    assert accepted > 0, "some drafts must be accepted for the test to mean anything"
    assert engine.num_free_blocks == free


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test, cells of small expectation merged into one."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat.double() / 2))


def _llm_joint(model, prompt, vocab, temperature, top_k, length):
    """Exact joint distribution of the first `length` tokens under the LLM's sampling rule (flattened,
    first token most significant)."""
    def dist(seq):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1].double() / temperature
        if top_k:
            logits[logits < logits.topk(top_k).values[-1]] = float("-inf")
        return torch.softmax(logits, -1)

    if length == 0:
        return torch.ones(1, dtype=torch.float64)
    first = dist(prompt)
    return torch.cat([first[a] * _llm_joint(model, prompt + [a], vocab, temperature, top_k, length - 1)
                      for a in range(vocab)])


# NOTE: a round drafts min(k, max_tokens - emitted - 1) tokens. With k = 3 and max_tokens = 2 (the only
# case this test had) every round drafted one token, so no group ever held k drafts and the bonus row
# never read draft slot k (the IndexError of sampled SpecDecode at max_tokens > k + 1). max_tokens = k + 1
# makes the first round a full group of k drafts; the test asserts that some of them were all accepted.
@pytest.mark.parametrize("temperature, top_k, k, max_tokens", [(1.0, 0, 3, 2), (1.0, 0, 1, 2), (0.7, 5, 2, 3)])
def test_sampled_speculative_decoding_follows_the_llm_distribution(tiny, temperature, top_k, k, max_tokens):
    vocab, n = 8, 3000
    slm = tiny("qwen2", vocab_size=vocab, seed=3, init_std=0.6, hidden=32)
    llm = tiny("qwen2", vocab_size=vocab, seed=4, init_std=0.6, hidden=32, layers=3)
    eng = Engine(slm=slm, llm=llm, device="cpu", dtype="float32", max_num_seqs=256, kv_cache_gb=0.05)
    prompt = [1, 5, 3]
    joint = _llm_joint(hf_model(llm), prompt, vocab, temperature, top_k, max_tokens)
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=s, ignore_eos=True)
              for s in range(n)]

    def counts(policy):
        outs = eng.generate([prompt] * n, params, policy, use_tqdm=False)
        c = torch.zeros(vocab ** max_tokens, dtype=torch.float64)
        for o in outs:
            assert len(o.token_ids) == max_tokens, o.error
            c[sum(t * vocab ** (max_tokens - 1 - j) for j, t in enumerate(o.token_ids))] += 1
        return c, outs

    spec, outs = counts(policies.SpecDecode(k=k))
    drafted = sum(o.stats["drafted"] for o in outs)
    accepted = sum(o.stats["accepted"] for o in outs)
    assert 0.1 < accepted / drafted < 0.95, "acceptance must be partial for rejections to be tested"
    group = min(k, max_tokens - 1)  # drafts of the first round: all k where max_tokens = k + 1
    full = sum(o.stats["verify_steps"] == 1 and o.stats["accepted"] == group for o in outs)
    assert full > 0, f"some verify group must accept all of its {group} drafts (the bonus row is then sampled)"
    assert _chi_square_p(spec, joint) > 1e-3
    slm_only, _ = counts(policies.SLMOnly())
    assert _chi_square_p(slm_only, joint) < 1e-6, "the test must be able to tell the SLM's distribution apart"
    assert eng.num_free_blocks == eng.core.scheduler_config.num_blocks


@pytest.mark.demo_pair
@pytest.mark.slow
def test_greedy_speculative_decoding_is_llm_only_on_the_real_pair():
    """Real weights and entropies (Qwen2.5-Coder 0.5B/1.5B) in fp32; the questions are ones where the bf16
    eval's speculative and LLM-only answers parted (bf16 rounds a verify extend and a decode step apart)."""
    from rstitch_engine.evaluation.answers import build_messages

    questions = ["Jonas has 42 marbles. Jonas buys 4 packs with 3 marbles in each pack, then shares all the marbles "
                 "equally among 6 friends. How many marbles does each friend get?",
                 "Jonas is 2 times as old as Carla. Carla is 5 years old. In 2 years, what will be the sum of their ages?"]
    engine = Engine(slm="demo:slm", llm="demo:llm", device="cpu", dtype="float32", kv_cache_gb=0.2, max_model_len=256)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    messages = [build_messages(q) for q in questions]
    ref = engine.chat(messages, params, policy=policies.LLMOnly(), use_tqdm=False)
    for k in (2, 4):
        outs = engine.chat(messages, params, policy=policies.SpecDecode(k=k), use_tqdm=False)
        assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
        assert all(o.stats["accepted"] > 0 for o in outs)


def test_sampled_speculation_joins_a_running_batch(close_pair):
    """With overlap a step is in flight between Engine.step calls: a sampled speculative request joins the
    running batch whether its drafts fit the draft-logits buffer or it must grow (the engine then finishes
    the in-flight step first and delivers its tokens)."""
    eng = Engine(slm=close_pair[0], llm=close_pair[1], device="cpu", dtype="float32", block_size=4,
                 kv_cache_gb=0.02, overlap=True)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=3)
    eng.generate([PROMPTS[0]], sampled, policies.SpecDecode(k=3), use_tqdm=False)  # the buffer holds 3 drafts
    free, seen = eng.num_free_blocks, []
    running = eng.add_requests([PROMPTS[1]], [SamplingParams(max_tokens=12, temperature=0.0)], [policies.LLMOnly()],
                               seen.append)
    joined = []
    for prompt, k in ((PROMPTS[2], 2), (PROMPTS[3], 5)):
        eng.step()
        assert eng.core.inflight, "the test needs a step in flight"
        joined += eng.add_requests([prompt], [sampled], [policies.SpecDecode(k=k)], seen.append)
    assert eng.core.draft_k == 5
    while eng.has_unfinished_requests():
        eng.step()
    assert [o.finish_reason for o in running + joined] == ["length"] * 3
    assert all(o.stats["verify_steps"] > 0 for o in joined) and eng.num_free_blocks == free
    alone = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0.0), policies.LLMOnly(),
                         use_tqdm=False)
    assert running[0].token_ids == alone[0].token_ids  # the drained step's tokens all reached the request
