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


def stitch(next_token, prompt, max_tokens, eos_ids, *, tau_up, tau_down=None, start=0, handover_after=None,
           forced=None):
    """The rules of method.md by full recomputation. `next_token(model, seq) -> (token, entropy)` is the
    model (0 SLM, 1 LLM); `forced[i]` (optional) names the model of output i instead of the entropy.
    Returns (tokens, sources)."""
    tau_down = tau_up if tau_down is None else tau_down
    seq, out, src, active, run = list(prompt), [], [], start, 0
    while len(out) < max_tokens:
        token, h = next_token(active, seq)
        i = len(out)
        if active == 0:
            switch = (i < len(forced) and forced[i] == 1) if forced is not None else h > tau_up
            if switch:  # discard the SLM's token; the LLM produces this position
                active = 1
                continue
            seq.append(token), out.append(token), src.append(0)
        else:
            seq.append(token), out.append(token), src.append(1)
            run += 1
            if forced is not None:
                back = not (i + 1 < len(forced) and forced[i + 1] == 1)
            elif handover_after:
                back = run >= handover_after
            else:
                back = h <= tau_down
            if back:
                active, run = 0, 0
        if token in eos_ids:
            break
    return out, src


def rstitch(slm, llm, prompt, max_tokens, eos_ids, vocab_limit, tau, tau_down=None, handover_after=None):
    """R-Stitch on two transformers models: returns (tokens, sources)."""
    models = (slm, llm)
    return stitch(lambda m, seq: next_distribution(models[m], seq, vocab_limit), prompt, max_tokens, eos_ids,
                  tau_up=tau, tau_down=tau_down, handover_after=handover_after)
