"""R-Stitch in the engine against the reference of tests/reference.py (transformers models, full recompute):
identical tokens and sources for several thresholds, batched and one at a time, with and without
one-step-late results; the threshold extremes give exactly the single-model outputs."""
import gc

import pytest

import reference
from helpers import hf_model
from rstitch_engine import Engine, SamplingParams, policies

PROMPTS = [[5, 17, 200], list(range(40, 61)), [9] * 7 + [250, 3], [100], list(range(300, 340, 3))]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0)
TAUS = [0.66, 0.72, 0.78]  # SLM entropies of this pair: 0.69-0.81 (10-90%), LLM: 0.43-0.70


@pytest.fixture(scope="module")
def engines(pair):
    slm, llm = pair
    kw = dict(slm=slm, llm=llm, device="cpu", dtype="float32", block_size=4, kv_cache_gb=0.02)
    return {"sync": Engine(**kw), "overlap": Engine(**kw, overlap=True)}


@pytest.fixture(scope="module")
def hf_pair(pair):
    return hf_model(pair[0]), hf_model(pair[1])


def expected(hf_pair, eng, prompt, tau, **kw):
    return reference.rstitch(*hf_pair, prompt, GREEDY.max_tokens, set(eng.eos_ids), eng.vocab_limit, tau, **kw)


@pytest.mark.parametrize("mode", ["sync", "overlap"])
@pytest.mark.parametrize("tau", TAUS)
def test_batched_matches_reference(engines, hf_pair, tau, mode):
    eng = engines[mode]
    free = eng.num_free_blocks
    outs = eng.generate(PROMPTS, GREEDY, policies.RStitch(tau=tau), use_tqdm=False)
    sources = []
    for p, o in zip(PROMPTS, outs):
        tokens, src = expected(hf_pair, eng, p, tau)
        assert (o.token_ids, o.sources) == (tokens, src)
        sources += src
        s = o.stats
        assert s["slm_tokens"] + s["llm_tokens"] == len(o.token_ids)
        assert s["discarded_slm_tokens"] == s["switches_to_llm"]
        assert len(o.entropies) == len(o.token_ids)
    assert {0, 1} <= set(sources), "this tau must let both models produce tokens"
    assert eng.num_free_blocks == free


def test_teacher_forced_reference_is_the_reference(engines, hf_pair):
    """reference.rstitch_along (one forward per model, used on the real pair) agrees with the prefix-by-prefix
    reference where the output under test is right, and fails where it is not."""
    eng, tau = engines["sync"], TAUS[1]
    for p in PROMPTS[:3]:
        tokens, src = expected(hf_pair, eng, p, tau)
        along = reference.rstitch_along(lambda m: hf_pair[m], tokens, p, GREEDY.max_tokens, set(eng.eos_ids),
                                        eng.vocab_limit, tau)
        assert along == (tokens, src)
    wrong = tokens[:5] + [(tokens[5] + 1) % eng.vocab_limit] + tokens[6:]
    with pytest.raises(AssertionError, match="reference's output 5"):
        reference.rstitch_along(lambda m: hf_pair[m], wrong, p, GREEDY.max_tokens, set(eng.eos_ids),
                                eng.vocab_limit, tau)


def test_one_at_a_time_equals_batched(engines):
    eng = engines["sync"]
    policy = policies.RStitch(tau=TAUS[1])
    batched = eng.generate(PROMPTS, GREEDY, policy, use_tqdm=False)
    for p, b in zip(PROMPTS, batched):
        (alone,) = eng.generate([p], GREEDY, policy, use_tqdm=False)
        assert (alone.token_ids, alone.sources) == (b.token_ids, b.sources)
        # batched matmuls round differently in the last bits
        assert alone.entropies == pytest.approx(b.entropies, abs=1e-5)


def test_separate_hand_back_threshold_and_handover(engines, hf_pair):
    eng = engines["overlap"]
    for policy, kw in [(policies.RStitch(tau=0.75, tau_down=0.6), dict(tau_down=0.6)),
                       (policies.RStitch(tau=0.75, handover_after=1), dict(handover_after=1)),
                       (policies.RStitch(tau=0.75, min_llm_run=3), dict(min_llm_run=3)),
                       (policies.parse_policy("rstitch:0.75:down0.6:min2"), dict(tau_down=0.6, min_llm_run=2))]:
        for p, o in zip(PROMPTS, eng.generate(PROMPTS, GREEDY, policy, use_tqdm=False)):
            assert (o.token_ids, o.sources) == expected(hf_pair, eng, p, 0.75, **kw)
    plain = eng.generate(PROMPTS, GREEDY, policies.RStitch(tau=0.75), use_tqdm=False)
    longer = eng.generate(PROMPTS, GREEDY, policies.RStitch(tau=0.75, min_llm_run=3), use_tqdm=False)
    assert [o.sources for o in plain] != [o.sources for o in longer], "the minimum run must matter here"


@pytest.mark.parametrize("mode", ["sync", "overlap"])
def test_threshold_extremes_are_the_single_models(engines, hf_pair, mode):
    eng = engines[mode]
    llm_only = eng.generate(PROMPTS, GREEDY, policies.LLMOnly(), use_tqdm=False)
    slm_only = eng.generate(PROMPTS, GREEDY, policies.SLMOnly(), use_tqdm=False)
    low = eng.generate(PROMPTS, GREEDY, policies.RStitch(tau=-1.0), use_tqdm=False)
    high = eng.generate(PROMPTS, GREEDY, policies.RStitch(tau=1.0), use_tqdm=False)
    for p, a, b, lo, hi in zip(PROMPTS, llm_only, slm_only, low, high):
        assert lo.token_ids == a.token_ids and set(lo.sources) == {1}
        assert hi.token_ids == b.token_ids and set(hi.sources) == {0}
        # the LLM pads its logits past the tokenizer: its greedy choice is restricted to the tokenizer
        assert (a.token_ids, a.sources) == expected(hf_pair, eng, p, -1.0)
        assert (b.token_ids, b.sources) == expected(hf_pair, eng, p, 1.0)


def test_policy_per_request(engines):
    eng = engines["sync"]
    pols = [policies.LLMOnly(), policies.SLMOnly(), policies.RStitch(tau=0.72)] * 2
    outs = eng.generate(PROMPTS + [[7, 8]], GREEDY, pols, use_tqdm=False)
    assert set(outs[0].sources) == {1} and set(outs[1].sources) == {0}


def test_logit_widths_differ_but_sampling_stays_in_the_tokenizer(engines):
    eng = engines["sync"]
    assert eng.configs[1].vocab_size == eng.configs[0].vocab_size + 13
    assert eng.vocab_limit == len(eng.tokenizer)
    params = SamplingParams(max_tokens=30, temperature=1.5, seed=3)
    for o in eng.generate(PROMPTS, params, policies.RStitch(tau=0.72), use_tqdm=False):
        assert max(o.token_ids) < eng.vocab_limit


def test_one_model_policies_are_refused_clearly(pair):
    eng = Engine(slm=pair[0], device="cpu", dtype="float32", kv_cache_gb=0.01)
    for pol in (policies.LLMOnly(), policies.RStitch(tau=0.1), policies.SpecDecode(k=2)):
        with pytest.raises(ValueError, match="needs the LLM"):
            eng.generate([[1, 2]], GREEDY, pol, use_tqdm=False)


def test_pair_with_different_vocabularies_is_refused(tiny, pair):
    from rstitch_engine.tiny import make_tokenizer

    other = tiny("qwen2", seed=5, hidden=32)
    make_tokenizer(vocab_size=300).save_pretrained(other.parent / "other-tok")
    for f in (other.parent / "other-tok").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="tokenizers differ"):
        Engine(slm=other, llm=pair[1], device="cpu", kv_cache_gb=0.01)


def test_sampling_is_seeded_and_batch_independent(engines):
    eng = engines["overlap"]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=11)
    policy = policies.RStitch(tau=0.72)
    batch = eng.generate(PROMPTS, params, policy, use_tqdm=False)
    alone = eng.generate([PROMPTS[2]], params, policy, use_tqdm=False)[0]
    again = eng.generate([PROMPTS[2]], params, policy, use_tqdm=False)[0]
    assert alone.token_ids == again.token_ids == batch[2].token_ids
    other = eng.generate([PROMPTS[2]], SamplingParams(max_tokens=16, temperature=0.9, seed=12), policy,
                         use_tqdm=False)[0]
    assert other.token_ids != alone.token_ids


@pytest.mark.demo_pair
@pytest.mark.slow
def test_real_pair_matches_reference():
    """Real weights and real entropies (Qwen2.5-Coder 0.5B/1.5B, fp32): the engine's R-Stitch equals the
    full-recompute reference, with both models producing tokens."""
    from rstitch_engine.evaluation.answers import build_messages
    from rstitch_engine.model_source import resolve_model

    slm, llm = (resolve_model(f"demo:{name}", progress=False) for name in ("slm", "llm"))
    eng = Engine(slm=slm, llm=llm, device="cpu", dtype="float32", kv_cache_gb=0.2, max_model_len=256)
    question = ("Jonas has 42 marbles. Jonas buys 4 packs with 3 marbles in each pack, then shares all the "
                "marbles equally among 6 friends. How many marbles does each friend get?")
    text = eng.tokenizer.apply_chat_template(build_messages(question), add_generation_prompt=True, tokenize=False)
    prompt = eng.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=32, temperature=0.0)
    out = eng.generate([prompt], params, policies.RStitch(tau=0.02), use_tqdm=False)[0]
    eos_ids, vocab_limit = set(eng.eos_ids), eng.vocab_limit
    del eng  # the fp32 reference models take as much memory again: never both at once
    gc.collect()
    ref = reference.rstitch_along(lambda m: hf_model((slm, llm)[m]), out.token_ids, prompt, 32, eos_ids,
                                  vocab_limit, 0.02)
    assert (out.token_ids, out.sources) == ref
    assert 0 < sum(out.sources) < len(out.sources)
