"""Straightforward reference decoders on transformers models: full recomputation at every position, no
cache, the rules of docs/method.md ('The R-Stitch rule', 'Hand-back rule') written out directly. Greedy,
fp32."""
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
           min_llm_run=None, forced=None):
    """The rules of docs/method.md ('The R-Stitch rule', 'Hand-back rule', 'Forced routing') by full
    recomputation. `next_token(model, seq) -> (token, entropy)` is the model (0 SLM, 1 LLM); `forced[i]`
    (optional) names the model of output i instead of the entropy. Returns (tokens, sources)."""
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
                back = h <= tau_down and run >= (min_llm_run or 0)
            if back:
                active, run = 0, 0
        if token in eos_ids:
            break
    return out, src


def rstitch(slm, llm, prompt, max_tokens, eos_ids, vocab_limit, tau, tau_down=None, handover_after=None,
            min_llm_run=None):
    """R-Stitch on two transformers models: returns (tokens, sources)."""
    models = (slm, llm)
    return stitch(lambda m, seq: next_distribution(models[m], seq, vocab_limit), prompt, max_tokens, eos_ids,
                  tau_up=tau, tau_down=tau_down, handover_after=handover_after, min_llm_run=min_llm_run)


def teacher_forced(model, seq: list[int], vocab_limit: int) -> list[tuple[int, float]]:
    """next_distribution at every prefix of `seq` longer than one token, from one causal forward of `seq`
    (the same full recomputation, all positions at once): entry j is for the prefix seq[:j + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
    return list(zip(logits[:, :vocab_limit].argmax(-1).tolist(), entropy.tolist()))


def rstitch_along(load_model, tokens: list[int], prompt, max_tokens, eos_ids, vocab_limit, tau, tau_down=None):
    """R-Stitch by the rules of `stitch`, with each model's distributions taken teacher-forced along
    prompt + `tokens` (the output under test): one forward per model, the models loaded one at a time by
    `load_model(m)`. While the rules produce `tokens`, this is the full-recompute reference; where they
    leave it, it fails naming the output index. Returns (tokens, sources)."""
    seq = list(prompt) + list(tokens)
    tables = {}
    for m in (0, 1):
        model = load_model(m)
        tables[m] = teacher_forced(model, seq, vocab_limit)
        del model

    def next_token(m, prefix):
        if prefix != seq[:len(prefix)]:
            wrong = next(i for i, (a, b) in enumerate(zip(prefix, seq)) if a != b) - len(prompt)
            raise AssertionError(f"the reference's output {wrong} is {prefix[len(prompt) + wrong]}, the "
                                 f"engine's {tokens[wrong]}")
        return tables[m][len(prefix) - 1]

    return stitch(next_token, prompt, max_tokens, eos_ids, tau_up=tau, tau_down=tau_down)
