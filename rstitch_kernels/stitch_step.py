"""The fused per-step kernel: normalised entropy, next token and the SLM/LLM routing decision per row.

One read of each logits row gives
  * H = (-sum p log p) / ln V over all V columns (softmax at temperature 1, online: m, S0, S1),
  * the next token: greedy argmax, or Gumbel-max sampling with the counter-based noise of random.py,
  * flags = KEEP | NEXT_LLM (rstitch_engine.protocol.ResultFlag; NAN alone: the row has a NaN or +inf
    logit, or the caller's `nonfinite_slots[out_slot[row]]` says its request's attention inputs had one;
    token -1, H NaN).

`nonfinite_slots` exists because NaN detection must not depend on how an attention backend treats NaN
(torch's CPU SDPA and the reference's nan_to_num turn a NaN query into zeros, so the logits can stay
finite): the rope + KV-store op marks the sequence slots whose q/k/v held one (rstitch_kernels/rope_store.py).

Temperatures below GREEDY_TEMPERATURE (sampling_params.py, 1e-5) are greedy: logits / T overflows for tiny T.

NOTE: split-V. A single program streaming a 300 KB row is latency-bound, so for small L each row is
cut into `splits` contiguous ranges of whole chunks: each program writes one partial (m, S0, S1, best
score, best id, bad) per range, and the last of a row's programs to arrive (common.last_arrival)
combines them: one launch. `num_splits=None` aims at about
PROGRAMS_PER_SM programs per SM (L=1 -> one chunk per program; L >= 4 * SMs -> one fused pass).
The choice depends only on L, V and the device, so a launch is CUDA-graph capturable.
"""
import math

import torch
import triton
import triton.language as tl

from rstitch_engine.protocol import ResultFlag, Stream

from rstitch_engine.sampling_params import GREEDY_TEMPERATURE

from .common import arrival_counters, last_arrival, num_sms
from .random import gumbel_from_hash, gumbel_noise, hash_u32

NUM_WARPS = 8
NUM_STAGES = 3  # cp.async pipelining of the chunk loads (loads ahead of use)
BYTES_PER_THREAD = 16  # one 16-byte load per thread per chunk
PROGRAMS_PER_SM = 4
STITCH_STREAM = int(Stream.STITCH)
FLAG_NAN = tl.constexpr(int(ResultFlag.NAN))
FLAG_NEXT_LLM = tl.constexpr(int(ResultFlag.NEXT_LLM))
FLAG_KEEP = tl.constexpr(int(ResultFlag.KEEP))
NEG_BIG = tl.constexpr(-1.0e30)  # finite stand-in for -inf in the online sums (no inf - inf)
MIN_SAMPLING_T = tl.constexpr(GREEDY_TEMPERATURE)  # below: greedy
FIELDS = tl.constexpr(6)  # per partial: m, S0, S1, best score, best id, bad (ids < 2**24: exact in f32)


@triton.jit
def _merge_softmax_stats(m, s0, s1):
    """Merge vectors of (m, S0 = sum e^(x-m), S1 = sum e^(x-m)(x-m)) into one triple."""
    m_all = tl.max(m, axis=0)
    w = tl.exp(m - m_all)
    return m_all, tl.sum(w * s0, axis=0), tl.sum(w * (s1 + (m - m_all) * s0), axis=0)


@triton.jit
def _merge_argmax(best, best_id):
    """Max of `best` and the lowest id reaching it (torch.argmax tie rule)."""
    top = tl.max(best, axis=0)
    return top, tl.min(tl.where(best == top, best_id, 2147483647), axis=0)


@triton.jit
def _finish_row(row, m, s0, s1, best_id, bad, inv_log_v, tau_up_ptr, tau_down_ptr,
                tokens_ptr, entropy_ptr, flags_ptr, table_ptr, table_stride, out_slot_ptr, out_pos_ptr,
                IS_LLM: tl.constexpr, HAS_TABLE: tl.constexpr):
    entropy = (tl.log(s0) - s1 / s0) * inv_log_v
    if IS_LLM:
        keep = 1
        next_llm = tl.where(entropy <= tl.load(tau_down_ptr + row), 0, 1)
    else:
        keep = tl.where(entropy <= tl.load(tau_up_ptr + row), 1, 0)
        next_llm = 1 - keep
    token = tl.where(bad, -1, best_id)
    tl.store(tokens_ptr + row, token)
    tl.store(entropy_ptr + row, tl.where(bad, float("nan"), entropy))
    tl.store(flags_ptr + row, tl.where(bad, FLAG_NAN, keep * FLAG_KEEP + next_llm * FLAG_NEXT_LLM))
    if HAS_TABLE:
        pos = tl.load(out_pos_ptr + row)
        slot = tl.load(out_slot_ptr + row).to(tl.int64)
        tl.store(table_ptr + slot * table_stride + pos, token, mask=pos >= 0)


@triton.jit
def _stitch_scan_kernel(logits_ptr, V, vocab_limit, inv_log_v, chunks_per_split, splits,
                        temperature_ptr, cutoff_ptr, seed_ptr, sample_pos_ptr, tau_up_ptr, tau_down_ptr,
                        tokens_ptr, entropy_ptr, flags_ptr, partials_ptr, counter_ptr,
                        table_ptr, table_stride, out_slot_ptr, out_pos_ptr, nonfinite_slots_ptr,
                        IS_LLM: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_NONFINITE: tl.constexpr,
                        FUSED: tl.constexpr, SPLITS_PAD: tl.constexpr,
                        BLOCK_V: tl.constexpr, STREAM: tl.constexpr, NUM_STAGES: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    cutoff = tl.load(cutoff_ptr + row)
    seed = tl.load(seed_ptr + row)
    pos = tl.load(sample_pos_ptr + row)
    sampled = temperature >= MIN_SAMPLING_T
    inv_temperature = tl.div_rn(1.0, tl.where(sampled, temperature, 1.0))  # IEEE, as torch
    row_ptr = logits_ptr + row.to(tl.int64) * V
    col_begin = split * chunks_per_split * BLOCK_V
    col_end = tl.minimum(col_begin + chunks_per_split * BLOCK_V, V)

    # NOTE: per-lane running state, reduced across lanes once at the end: no block-wide
    # reduction (and barrier) per chunk on the hot path.
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], NEG_BIG, tl.float32)
    s0 = tl.zeros([BLOCK_V], tl.float32)
    s1 = tl.zeros([BLOCK_V], tl.float32)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK_V], tl.int32)
    bad = tl.zeros([BLOCK_V], tl.int1)
    for start in tl.range(col_begin, col_end, BLOCK_V, num_stages=NUM_STAGES):
        cols = start + lanes
        x = tl.load(row_ptr + cols, mask=cols < col_end, other=float("-inf")).to(tl.float32)
        bad = bad | (x != x) | (x == float("inf"))
        # online softmax statistics, one exp per element: e = e^-|x - m|
        xc = tl.maximum(x, NEG_BIG)
        d = xc - m
        up = d > 0
        e = tl.exp(-tl.abs(d))
        s1 = tl.where(up, e * (s1 - d * s0), s1 + e * d)
        s0 = tl.where(up, e * s0 + 1.0, s0 + e)
        m = tl.where(up, xc, m)
        # next-token score: the logit (greedy) or logit / T + Gumbel noise among ids above the cutoff
        allowed = cols < vocab_limit
        if sampled:
            allowed = allowed & (x >= cutoff)
            if tl.max(allowed.to(tl.int32), axis=0) > 0:  # top-k/top-p leave most chunks empty
                noise = gumbel_from_hash(hash_u32(seed, pos, cols, STREAM))
                score = tl.where(allowed, x * inv_temperature + noise, float("-inf"))
            else:
                score = tl.full([BLOCK_V], float("-inf"), tl.float32)
        else:
            score = tl.where(allowed, x, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_id = tl.where(better, cols, best_id)

    m_row, s0_row, s1_row = _merge_softmax_stats(m, s0, s1)
    best_row, best_id_row = _merge_argmax(best, best_id)
    bad_row = tl.max(bad.to(tl.int32), axis=0) > 0
    if HAS_NONFINITE:
        bad_row = bad_row | (tl.load(nonfinite_slots_ptr + tl.load(out_slot_ptr + row)) != 0)
    if FUSED:
        _finish_row(row, m_row, s0_row, s1_row, best_id_row, bad_row, inv_log_v, tau_up_ptr, tau_down_ptr,
                    tokens_ptr, entropy_ptr, flags_ptr, table_ptr, table_stride, out_slot_ptr, out_pos_ptr,
                    IS_LLM, HAS_TABLE)
    else:
        part = partials_ptr + row * FIELDS * splits
        tl.store(part + split, m_row)
        tl.store(part + splits + split, s0_row)
        tl.store(part + 2 * splits + split, s1_row)
        tl.store(part + 3 * splits + split, best_row)
        tl.store(part + 4 * splits + split, best_id_row.to(tl.float32))
        tl.store(part + 5 * splits + split, bad_row.to(tl.float32))
        if last_arrival(counter_ptr + row, splits):
            _combine_row(row, part, splits, inv_log_v, tau_up_ptr, tau_down_ptr, tokens_ptr, entropy_ptr, flags_ptr,
                         table_ptr, table_stride, out_slot_ptr, out_pos_ptr, IS_LLM, HAS_TABLE, SPLITS_PAD)


@triton.jit
def _combine_row(row, part, splits, inv_log_v, tau_up_ptr, tau_down_ptr,
                 tokens_ptr, entropy_ptr, flags_ptr, table_ptr, table_stride, out_slot_ptr, out_pos_ptr,
                 IS_LLM: tl.constexpr, HAS_TABLE: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """Merges a row's `splits` partials (part: its [FIELDS, splits] block) and finishes the row."""
    idx = tl.arange(0, SPLITS_PAD)
    valid = idx < splits
    m = tl.load(part + idx, mask=valid, other=NEG_BIG, cache_modifier=".cg")
    s0 = tl.load(part + splits + idx, mask=valid, other=0.0, cache_modifier=".cg")
    s1 = tl.load(part + 2 * splits + idx, mask=valid, other=0.0, cache_modifier=".cg")
    best = tl.load(part + 3 * splits + idx, mask=valid, other=float("-inf"), cache_modifier=".cg")
    best_id = tl.load(part + 4 * splits + idx, mask=valid, other=0.0, cache_modifier=".cg").to(tl.int32)
    bad = tl.load(part + 5 * splits + idx, mask=valid, other=0.0, cache_modifier=".cg")
    m_row, s0_row, s1_row = _merge_softmax_stats(m, s0, s1)
    _, best_id_row = _merge_argmax(best, best_id)
    _finish_row(row, m_row, s0_row, s1_row, best_id_row, tl.max(bad, axis=0) > 0, inv_log_v,
                tau_up_ptr, tau_down_ptr, tokens_ptr, entropy_ptr, flags_ptr,
                table_ptr, table_stride, out_slot_ptr, out_pos_ptr, IS_LLM, HAS_TABLE)


def _outputs(logits: torch.Tensor, out):
    if out is not None:
        return out
    n = logits.shape[0]
    return (torch.empty(n, dtype=torch.int32, device=logits.device),
            torch.empty(n, dtype=torch.float32, device=logits.device),
            torch.empty(n, dtype=torch.int32, device=logits.device))


def stitch_step(logits, vocab_limit, *, temperature, cutoff, seed, sample_pos, tau_up, tau_down, is_llm,
                token_table=None, out_slot=None, out_pos=None, out=None, num_splits=None, nonfinite_slots=None):
    """Triton launcher: -> (tokens [L] int32, entropy [L] float32, flags [L] int32).
    `num_splits` (rows cut into that many ranges) is chosen from L, V and the device when None.
    `nonfinite_slots` ([sequence slots] int32, nonzero: flag the rows of that slot NAN whatever their
    logits; read at `out_slot`) is optional."""
    n_rows, vocab = logits.shape
    assert logits.is_contiguous() and 0 < vocab_limit <= vocab
    assert nonfinite_slots is None or out_slot is not None, "nonfinite_slots is read at out_slot"
    tokens, entropy, flags = outputs = _outputs(logits, out)
    if n_rows == 0:
        return outputs
    block_v = NUM_WARPS * 32 * BYTES_PER_THREAD // logits.element_size()
    n_chunks = triton.cdiv(vocab, block_v)
    if num_splits is None:
        num_splits = triton.cdiv(PROGRAMS_PER_SM * num_sms(logits.device), n_rows)
    chunks_per_split = triton.cdiv(n_chunks, max(1, min(num_splits, n_chunks)))
    splits = triton.cdiv(n_chunks, chunks_per_split)
    partials = counters = entropy
    if splits > 1:
        partials = torch.empty((n_rows, FIELDS.value, splits), dtype=torch.float32, device=logits.device)
        counters = arrival_counters(logits.device, n_rows)
    has_table = token_table is not None
    table_args = (token_table if has_table else tokens, token_table.stride(0) if has_table else 0,
                  tokens if out_slot is None else out_slot, out_pos if has_table else tokens)
    has_nonfinite = nonfinite_slots is not None
    _stitch_scan_kernel[(n_rows, splits)](
        logits, vocab, vocab_limit, 1.0 / math.log(vocab), chunks_per_split, splits,
        temperature, cutoff, seed, sample_pos, tau_up, tau_down,
        tokens, entropy, flags, partials, counters, *table_args, nonfinite_slots if has_nonfinite else tokens,
        IS_LLM=bool(is_llm), HAS_TABLE=has_table, HAS_NONFINITE=has_nonfinite, FUSED=splits == 1,
        SPLITS_PAD=triton.next_power_of_2(splits), BLOCK_V=block_v, STREAM=STITCH_STREAM, NUM_STAGES=NUM_STAGES,
        num_warps=NUM_WARPS)
    return outputs


def stitch_step_ref(logits, vocab_limit, *, temperature, cutoff, seed, sample_pos, tau_up, tau_down, is_llm,
                    token_table=None, out_slot=None, out_pos=None, out=None, num_splits=None, nonfinite_slots=None):
    """Plain-torch reference (the CPU runtime's implementation); `num_splits` is ignored."""
    x = logits.float()
    n_rows, vocab = x.shape
    logp = torch.log_softmax(x, dim=-1)
    plogp = torch.where(logp > float("-inf"), logp.exp() * logp, 0.0)
    entropy = -plogp.sum(-1) / math.log(vocab)
    bad = (x.isnan() | (x == float("inf"))).any(-1)
    if nonfinite_slots is not None:
        bad = bad | (nonfinite_slots[out_slot.long()] != 0)

    head = x[:, :vocab_limit]
    sampled = temperature >= GREEDY_TEMPERATURE
    cols = torch.arange(vocab_limit, device=x.device)
    # NOTE: the engine runs this reference on the CPU only, where reading the flag costs nothing; skipping
    # the noise of all-greedy steps halves their time.
    noise = gumbel_noise(seed, sample_pos, cols, STITCH_STREAM) if bool(sampled.any()) else 0.0
    inv_temperature = 1.0 / torch.where(sampled, temperature, 1.0)
    score = torch.where(head >= cutoff[:, None], head * inv_temperature[:, None] + noise, float("-inf"))
    token = torch.where(sampled, score.argmax(-1), head.argmax(-1)).int()

    if is_llm:
        keep = torch.ones_like(token)
        next_llm = (~(entropy <= tau_down)).int()
    else:
        keep = (entropy <= tau_up).int()
        next_llm = 1 - keep
    token = torch.where(bad, -1, token)
    entropy = torch.where(bad, float("nan"), entropy)
    flags = torch.where(bad, FLAG_NAN.value, keep * FLAG_KEEP.value + next_llm * FLAG_NEXT_LLM.value).int()
    if token_table is not None:
        write = out_pos >= 0  # NOTE: boolean indexing syncs; fine for the CPU runtime this serves
        token_table[out_slot[write].long(), out_pos[write].long()] = token[write]
    tokens, entropies, flag_out = _outputs(logits, out)
    tokens.copy_(token), entropies.copy_(entropy), flag_out.copy_(flags)
    return tokens, entropies, flag_out


def sampling_cutoff(logits, temperature, top_k, top_p, vocab_limit):
    """Smallest logit a row may sample ([L] float32): top-k, then top-p over the survivors, in
    probabilities at the row's temperature over ids < vocab_limit; ties at the cutoff are kept.
    -inf for greedy rows (temperature < GREEDY_TEMPERATURE) and rows without top-k/top-p. Plain torch, sort-based, no host sync."""
    x = logits[:, :vocab_limit].float()
    sorted_x = x.sort(dim=-1, descending=True).values
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_limit), vocab_limit).long()
    in_top_k = torch.arange(vocab_limit, device=x.device)[None, :] < k[:, None]
    sampled = temperature >= GREEDY_TEMPERATURE
    temp = torch.where(sampled, temperature, 1.0)
    probs = torch.softmax((sorted_x / temp[:, None]).masked_fill(~in_top_k, float("-inf")), dim=-1)
    mass_before = probs.cumsum(-1) - probs
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)  # float sums may reach 1 early
    n_keep = (in_top_p & in_top_k).sum(-1).clamp(min=1)
    cutoff = sorted_x.gather(1, (n_keep - 1)[:, None]).squeeze(1)
    active = sampled & ((top_k > 0) | (top_p < 1))
    return torch.where(active, cutoff, float("-inf"))
