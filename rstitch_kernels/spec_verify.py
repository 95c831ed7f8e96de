"""Speculative-decoding verification on the device, batched, without a host sync.

A verify group is the k + 1 logits rows of one request in the LLM sub-batch: row j (j < k) predicts the
position of draft j, row k the bonus position. The stitch step has already produced, per row, the LLM's own
token (greedy, or a sample keyed by (seed, position)). This op decides the accepted prefix:
- greedy: draft j is accepted while it equals the LLM's token;
- sampling: draft j is accepted with probability min(1, q_j(d) / p_j(d)) (uniforms of stream 1); the first
  rejected row resamples from norm(max(q - p, 0)) (Gumbel noise of stream 2), so the output is distributed
  exactly as the LLM's (Leviathan et al., Chen et al.).
Rows are kept up to and including the first non-accepted one; that row's token is final and is written to
the token table. Rows outside verify groups pass through unchanged. Temperatures below GREEDY_TEMPERATURE
(sampling_params.py) verify greedily, as the stitch step samples greedily there.
"""
from __future__ import annotations

import torch

from rstitch_engine.protocol import ResultFlag, Stream
from rstitch_engine.sampling_params import GREEDY_TEMPERATURE

from .random import gumbel_noise, uniform_noise
from .stitch_step import sampling_cutoff

KEEP, NAN = int(ResultFlag.KEEP), int(ResultFlag.NAN)


def _masked_probs(logits: torch.Tensor, temperature: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    x = logits.float() / temperature.clamp(min=GREEDY_TEMPERATURE)[:, None]
    x = x.masked_fill(logits.float() < cutoff[:, None], float("-inf"))
    return torch.softmax(x, dim=-1)


def verify_drafts(logits, vocab_limit: int, *, tokens, flags, verify_start, spec_index, sample_pos, out_slot,
                  seed, temperature, top_k, top_p, cutoff, token_table, draft_logits=None,
                  accept_rate=None) -> None:
    """Rewrites `tokens` and `flags` of verify rows in place and writes each group's final token to
    `token_table`. `draft_logits[slot, j]` holds the SLM logits draft j was sampled from (needed only
    when some row samples). Rows with `accept_rate >= 0` (benchmarks) accept each draft with that
    probability instead of verifying it, to time speculative decoding at a chosen acceptance rate."""
    is_verify = verify_start >= 0
    next_start = torch.cat([verify_start[1:], verify_start.new_full((1,), -2)])
    has_draft = is_verify & (next_start == verify_start)  # every row but the group's last
    draft = token_table[out_slot, sample_pos]
    accept = tokens == draft
    final_token = tokens
    if draft_logits is not None:
        cols = torch.arange(vocab_limit, device=logits.device)
        q = _masked_probs(logits[:, :vocab_limit], temperature, cutoff)
        # A group of k drafts has k + 1 rows: the bonus row (spec index k) has no draft, and `draft_logits`
        # only k slots; it reads slot k - 1 (ignored: `has_draft` masks the row's acceptance and resample).
        p_logits = draft_logits[out_slot, spec_index.clamp(0, draft_logits.shape[1] - 1)]
        p = _masked_probs(p_logits, temperature, sampling_cutoff(p_logits, temperature, top_k, top_p, vocab_limit))
        d = draft.long().clamp(0, vocab_limit - 1)[:, None]
        u = uniform_noise(seed, sample_pos, cols[:1], stream=Stream.SPEC_ACCEPT)[:, 0]
        sampled_accept = u * p.gather(1, d)[:, 0] < q.gather(1, d)[:, 0]
        residual = (q - p).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, q)
        resampled = (residual.log() + gumbel_noise(seed, sample_pos, cols, stream=Stream.SPEC_RESAMPLE)).argmax(-1).to(tokens.dtype)
        sampling = temperature >= GREEDY_TEMPERATURE  # below: greedy, as in the stitch step
        accept = torch.where(sampling, sampled_accept, accept)
        final_token = torch.where(sampling & has_draft, resampled, tokens)
    if accept_rate is not None:
        forced = uniform_noise(seed, sample_pos, sample_pos.new_zeros(1), stream=Stream.SPEC_ACCEPT)[:, 0] < accept_rate
        accept = torch.where(accept_rate >= 0, forced, accept)
    accept = accept & has_draft & ((flags & NAN) == 0)
    # A row is kept when no row before it in its group was rejected.
    rejected = (is_verify & ~accept).int()
    before = torch.cumsum(rejected, 0) - rejected
    kept = is_verify & (before == before[verify_start.clamp(min=0)])
    new_token = torch.where(accept, draft, final_token)
    tokens.copy_(torch.where(is_verify, new_token, tokens))
    flags.copy_(torch.where(is_verify, (flags & NAN) | kept.int() * KEEP, flags))
    # Rows after a group's final row write throw-away tokens past the committed sequence; other rows
    # rewrite the token they already wrote.
    token_table[out_slot, sample_pos] = tokens
