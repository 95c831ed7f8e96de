"""Straightforward reference decoders on transformers models: full recomputation at every position, no
cache, the rules of method.md written out directly. Greedy, fp32."""
from __future__ import annotations

import math

import torch


def next_distribution(model, seq: list[int], vocab_limit: int) -> tuple[int, float]:
    """(greedy token among ids < vocab_limit, normalised entropy over the model's full logits width)."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    entropy = float(-(logp.exp() * logp).sum() / math.log(logits.shape[-1]))
    return int(logits[:vocab_limit].argmax()), entropy


def rstitch(slm, llm, prompt, max_tokens, eos_ids, vocab_limit, tau, tau_down=None, handover_after=None):
    """R-Stitch: returns (tokens, sources)."""
    tau_down = tau if tau_down is None else tau_down
    seq, out, src, active, run = list(prompt), [], [], 0, 0
    while len(out) < max_tokens:
        token, h = next_distribution(slm if active == 0 else llm, seq, vocab_limit)
        if active == 0:
            if h > tau:  # discard the SLM's token; the LLM produces this position
                active = 1
                continue
            seq.append(token), out.append(token), src.append(0)
        else:
            seq.append(token), out.append(token), src.append(1)
            run += 1
            if (run >= handover_after) if handover_after else (h <= tau_down):
                active, run = 0, 0
        if token in eos_ids:
            break
    return out, src
