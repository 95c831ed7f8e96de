"""stitch_step (Triton) against stitch_step_ref and float64 math; sampling_cutoff; sampling statistics."""
import math

import pytest
import torch

from kernel_test_utils import DEVICE, poison, randn, rel_err
from rstitch_engine.kernels import sampling_cutoff, stitch_step, stitch_step_ref

TEMPERATURES = [0.0, 0.7, 1.0, 1.3, 0.0, 0.5]
TOP_K = [0, 0, 50, 0, 0, 5]
TOP_P = [1.0, 0.9, 1.0, 0.8, 1.0, 1.0]


def cycle(values, n, dtype):
    return torch.tensor([values[i % len(values)] for i in range(n)], dtype=dtype, device=DEVICE)


def make_args(n_rows, vocab, vocab_limit, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = randn(n_rows, vocab, dtype=dtype, scale=scale, generator=gen)
    temperature = cycle(TEMPERATURES, n_rows, torch.float32)
    cutoff = sampling_cutoff(logits, temperature, cycle(TOP_K, n_rows, torch.int32),
                             cycle(TOP_P, n_rows, torch.float32), vocab_limit)
    return dict(
        logits=logits, vocab_limit=vocab_limit, temperature=temperature, cutoff=cutoff,
        seed=torch.randint(0, 2 ** 62, (n_rows,), generator=gen).to(DEVICE),
        sample_pos=torch.randint(0, 4096, (n_rows,), generator=gen, dtype=torch.int32).to(DEVICE),
        tau_up=torch.rand(n_rows, generator=gen).to(DEVICE),
        tau_down=torch.rand(n_rows, generator=gen).to(DEVICE))


def entropy_fp64(logits):
    logp = torch.log_softmax(logits.double(), dim=-1)
    plogp = torch.where(logp > float("-inf"), logp.exp() * logp, 0.0)
    return -plogp.sum(-1) / math.log(logits.shape[-1])


def run_poisoned(args, is_llm, **kw):
    n = args["logits"].shape[0]
    out = (poison(torch.empty(n, dtype=torch.int32, device=DEVICE)),
           poison(torch.empty(n, dtype=torch.float32, device=DEVICE)),
           poison(torch.empty(n, dtype=torch.int32, device=DEVICE)))
    got = stitch_step(**args, is_llm=is_llm, out=out, **kw)
    assert all(g is o for g, o in zip(got, out))
    return got


def check_matches_ref(args, is_llm, num_splits=None):
    tokens, entropy, flags = run_poisoned(args, is_llm, num_splits=num_splits)
    ref_tokens, ref_entropy, ref_flags = stitch_step_ref(**args, is_llm=is_llm)
    assert torch.equal(tokens, ref_tokens)
    assert rel_err(entropy, ref_entropy) < 1e-5
    assert rel_err(entropy, entropy_fp64(args["logits"])) < 1e-5
    assert torch.equal(flags, ref_flags)
    return tokens, entropy, flags


@pytest.mark.parametrize("n_rows, vocab, vocab_limit, dtype, num_splits", [
    (1, 1000, 1000, torch.float32, None),
    (3, 1000, 997, torch.bfloat16, None),
    (4, 4099, 4096, torch.float32, 3),
    (6, 4099, 4099, torch.bfloat16, 1),
    (7, 4099, 4000, torch.float16, None),
    (2, 152064, 151936, torch.bfloat16, None),
])
@pytest.mark.parametrize("is_llm", [0, 1])
def test_matches_reference(n_rows, vocab, vocab_limit, dtype, num_splits, is_llm):
    check_matches_ref(make_args(n_rows, vocab, vocab_limit, dtype, seed=n_rows + vocab), is_llm, num_splits)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_greedy_ties_pick_lowest_id_and_respect_vocab_limit(num_splits):
    vocab, vocab_limit = 4099, 3000
    args = make_args(3, vocab, vocab_limit, torch.float32)
    args["temperature"].zero_()
    logits = args["logits"]
    logits[:, vocab_limit + 7] = 100.0  # beyond the tokenizer: never sampled
    logits[0, [2500, 1200, 2999]] = 50.0  # ties across chunks and splits
    logits[1, [5, 2048]] = 50.0
    tokens, _, _ = check_matches_ref(args, 0, num_splits)
    assert tokens[:2].tolist() == [1200, 5]
    assert tokens[2] < vocab_limit


def test_sampled_token_independent_of_batch_and_splits():
    args = make_args(6, 4099, 4099, torch.bfloat16, seed=3)
    batched, _, _ = stitch_step(**args, is_llm=0)
    for r in range(6):
        alone = {k: (v[r:r + 1] if torch.is_tensor(v) else v) for k, v in args.items()}
        for splits in (1, 3):
            tokens, _, _ = stitch_step(**alone, is_llm=0, num_splits=splits)
            assert tokens.item() == batched[r].item()


def test_cutoff_restricts_sampling():
    args = make_args(6, 1000, 1000, torch.float32, seed=4)
    args["temperature"].fill_(5.0)  # flat: without the cutoff almost any id could win
    tokens, _, _ = check_matches_ref(args, 0)
    logits = args["logits"].float()
    chosen = logits.gather(1, tokens.long()[:, None]).squeeze(1)
    assert (chosen >= args["cutoff"]).all()
    assert (args["cutoff"][2::3] > float("-inf")).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN
def test_nan_and_inf_rows_are_flagged():
    args = make_args(5, 4099, 4099, torch.float32, seed=5)
    logits = args["logits"]
    logits[1, 3000] = float("nan")
    logits[3, 17] = float("inf")
    logits[2, ::3] = float("-inf")  # sampled row
    logits[4, :2048] = float("-inf")  # greedy row: whole chunks and a padded tail of -inf
    logits[4, 4000:] = float("-inf")
    args["cutoff"] = sampling_cutoff(logits, args["temperature"], cycle(TOP_K, 5, torch.int32),
                                     cycle(TOP_P, 5, torch.float32), 4099)
    tokens, entropy, flags = run_poisoned(args, 0, num_splits=3)
    ref_tokens, ref_entropy, ref_flags = stitch_step_ref(**args, is_llm=0)
    assert tokens[[1, 3]].tolist() == [-1, -1] and flags[[1, 3]].tolist() == [4, 4]
    assert entropy[[1, 3]].isnan().all()
    assert torch.equal(tokens, ref_tokens) and torch.equal(flags, ref_flags)
    ok = [0, 2, 4]
    assert rel_err(entropy[ok], entropy_fp64(logits[ok])) < 1e-5


@pytest.mark.parametrize("is_llm, tau, expected_flags", [
    (0, float("inf"), 1), (0, float("-inf"), 2), (1, float("inf"), 1), (1, float("-inf"), 3)])
def test_infinite_thresholds(is_llm, tau, expected_flags):
    args = make_args(4, 1000, 1000, torch.float32, seed=6)
    args["tau_up"].fill_(tau)
    args["tau_down"].fill_(tau)
    _, _, flags = check_matches_ref(args, is_llm)
    assert (flags == expected_flags).all()


def test_decision_follows_entropy():
    args = make_args(6, 1000, 1000, torch.float32, seed=7)
    entropy = entropy_fp64(args["logits"]).float()
    args["tau_up"] = entropy + torch.tensor([0.01, -0.01] * 3, device=DEVICE)
    args["tau_down"] = entropy + torch.tensor([-0.01, 0.01] * 3, device=DEVICE)
    _, _, slm = check_matches_ref(args, 0)
    _, _, llm = check_matches_ref(args, 1)
    assert slm.tolist() == [1, 2] * 3  # SLM: keep when H <= tau_up, else hand over
    assert llm.tolist() == [3, 1] * 3  # LLM: always keep; stay with the LLM unless H <= tau_down


def test_token_table_written_only_where_out_pos_is_set():
    args = make_args(5, 1000, 1000, torch.bfloat16, seed=8)
    table = poison(torch.empty(4, 9, dtype=torch.int32, device=DEVICE))
    ref_table = table.clone()
    out_slot = torch.tensor([2, -1, 0, 3, 1], dtype=torch.int32, device=DEVICE)
    out_pos = torch.tensor([5, -1, 0, -1, 8], dtype=torch.int32, device=DEVICE)
    tokens, _, _ = stitch_step(**args, is_llm=0, token_table=table, out_slot=out_slot, out_pos=out_pos)
    stitch_step_ref(**args, is_llm=0, token_table=ref_table, out_slot=out_slot, out_pos=out_pos)
    assert torch.equal(table, ref_table)
    expected = poison(torch.empty_like(table))
    for r, (s, p) in enumerate(zip(out_slot.tolist(), out_pos.tolist())):
        if p >= 0:
            expected[s, p] = tokens[r]
    assert torch.equal(table, expected)


def _cutoff_loop(logits, temperature, top_k, top_p, vocab_limit):
    """Row-by-row sampling cutoff, written out plainly."""
    result = []
    for x, t, k, p in zip(logits[:, :vocab_limit].double(), temperature.tolist(), top_k.tolist(), top_p.tolist()):
        if t <= 0 or (k <= 0 and p >= 1):
            result.append(float("-inf"))
            continue
        values = x.sort(descending=True).values
        values = values[:k] if k > 0 else values
        probs = torch.softmax(values / t, dim=0)
        n, mass = 0, 0.0
        while n < len(values) and (mass < p or p >= 1 or n == 0):
            mass += probs[n].item()
            n += 1
        result.append(values[n - 1].item())
    return torch.tensor(result, dtype=torch.float32)


def test_sampling_cutoff_matches_loop():
    gen = torch.Generator().manual_seed(9)
    logits = randn(8, 300, scale=2.0, generator=gen).round(decimals=1)  # rounded: many ties
    temperature = torch.tensor([0.0, 0.7, 0.7, 1.0, 1.5, 0.7, 1.0, 0.3], device=DEVICE)
    top_k = torch.tensor([5, 0, 10, 1, 0, 400, 20, 0], dtype=torch.int32, device=DEVICE)
    top_p = torch.tensor([0.5, 1.0, 1.0, 1.0, 0.5, 0.95, 0.3, 0.99], device=DEVICE)
    got = sampling_cutoff(logits, temperature, top_k, top_p, 290)
    want = _cutoff_loop(logits.cpu(), temperature.cpu(), top_k.cpu(), top_p.cpu(), 290)
    assert torch.equal(got.cpu(), want)


def _chi2_critical(dof, z=3.719):
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.719: p = 1e-4)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def check_distribution(step, n, top_k, top_p, vocab=16, temperature=0.7):
    """Sample n rows of one tiny-vocab distribution with different seeds; chi-square against
    softmax(logits / T) restricted to the cutoff; returns the tokens."""
    base = randn(vocab, scale=0.7, generator=torch.Generator().manual_seed(10))
    logits = base.expand(n, vocab).contiguous()
    temp = torch.full((n,), temperature, device=DEVICE)
    cutoff = sampling_cutoff(logits, temp, torch.full((n,), top_k, dtype=torch.int32, device=DEVICE),
                             torch.full((n,), top_p, device=DEVICE), vocab)
    args = dict(logits=logits, vocab_limit=vocab, temperature=temp, cutoff=cutoff,
                seed=torch.arange(n, device=DEVICE) * 7919 + 11, sample_pos=torch.full((n,), 3, device=DEVICE),
                tau_up=torch.zeros(n, device=DEVICE), tau_down=torch.zeros(n, device=DEVICE))
    tokens, _, _ = step(**args, is_llm=0)
    allowed = (base >= cutoff[0]).cpu()
    assert allowed[tokens.long().cpu()].all()
    if top_k:
        assert allowed.sum() == top_k if top_p >= 1 else allowed.sum() <= top_k
    probs = torch.softmax(torch.where(allowed, base.cpu() / temperature, float("-inf")).double(), dim=0)
    counts = torch.bincount(tokens.long().cpu(), minlength=vocab).double()
    expected = probs * n
    big = expected >= 5  # pool the rare allowed tokens into one bin
    observed = torch.cat([counts[big], counts[~big & allowed].sum()[None]])
    expected = torch.cat([expected[big], expected[~big & allowed].sum()[None]])
    keep = expected > 0
    chi2 = (((observed - expected) ** 2)[keep] / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    assert dof >= 2 and chi2 < _chi2_critical(dof), f"chi2 {chi2:.1f} over {dof} dof"
    return tokens, args


CUTOFFS = [(0, 1.0), (5, 1.0), (0, 0.8), (6, 0.9)]


@pytest.mark.parametrize("top_k, top_p", CUTOFFS)
def test_reference_sampling_distribution(top_k, top_p):
    check_distribution(stitch_step_ref, 20000, top_k, top_p)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (6, 0.9)])
def test_sampling_distribution(top_k, top_p):
    tokens, args = check_distribution(stitch_step, 300, top_k, top_p)
    assert torch.equal(tokens, stitch_step_ref(**args, is_llm=0)[0])


@pytest.mark.slow
@pytest.mark.parametrize("top_k, top_p", CUTOFFS)
def test_sampling_distribution_many_seeds(top_k, top_p):
    check_distribution(stitch_step, 1000, top_k, top_p)


@pytest.mark.cuda
@pytest.mark.parametrize("n_rows", [1, 8, 64, 256])
@pytest.mark.parametrize("is_llm", [0, 1])
def test_real_shapes_cuda(n_rows, is_llm):
    check_matches_ref(make_args(n_rows, 152064, 151936, torch.bfloat16, seed=n_rows), is_llm)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_tiny_temperatures_are_greedy(num_splits):
    """T below GREEDY_TEMPERATURE (1e-5) is greedy in the kernel, its reference and the cutoff: logits / T
    overflows float32 for tiny T (1e-39 is a denormal whose inverse is inf)."""
    args = make_args(6, 4099, 4000, torch.float32, seed=8)
    args["temperature"] = torch.tensor([1e-39, 1e-30, 1e-20, 9e-6, 1e-39, 0.0], device=DEVICE)
    args["cutoff"] = sampling_cutoff(args["logits"], args["temperature"], cycle([0, 5], 6, torch.int32),
                                     cycle([1.0, 0.5], 6, torch.float32), 4000)
    assert (args["cutoff"] == float("-inf")).all(), "greedy rows have no cutoff"
    greedy = args["logits"][:, :4000].float().argmax(-1).int()
    tokens, _, flags = check_matches_ref(args, 0, num_splits)
    assert torch.equal(tokens, greedy) and not (flags & 4).any()


@pytest.mark.parametrize("num_splits", [1, 3])
def test_nonfinite_rows_are_flagged_whatever_their_logits(num_splits):
    """`nonfinite_slots[out_slot[row]]` (set by the layers' rope + KV store where q/k/v held a NaN) flags a
    row NAN even when its logits are finite, on the Triton path and the reference alike."""
    args = make_args(4, 4099, 4099, torch.float32, seed=9)
    out_slot = torch.tensor([2, 0, 3, 5], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([1, 0, 0, 0, 0, 7, 0], dtype=torch.int32, device=DEVICE)  # nonzero: bad
    kw = dict(out_slot=out_slot, nonfinite_slots=slots)
    tokens, entropy, flags = run_poisoned(args, 1, num_splits=num_splits, **kw)
    ref = stitch_step_ref(**args, is_llm=1, **kw)
    clean = stitch_step_ref(**args, is_llm=1)
    assert tokens[[1, 3]].tolist() == [-1, -1] and flags[[1, 3]].tolist() == [4, 4]
    assert entropy[[1, 3]].isnan().all()
    assert torch.equal(tokens, ref[0]) and torch.equal(flags, ref[2])
    assert torch.equal(tokens[[0, 2]], clean[0][[0, 2]]) and torch.equal(flags[[0, 2]], clean[2][[0, 2]])
