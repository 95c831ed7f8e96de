"""A simulated device for scheduler tests: it executes plans like the runtime does, but its "models" are
hash functions of the token ids actually stored in their simulated paged KV caches.

Because each output depends on the cache contents read through the block table, any planning error (a
stale token left in the cache, a wrong slot, a missed catch-up, a bad rollback) changes the tokens, and
the outputs stop matching the reference rules applied by full recomputation.
"""
from __future__ import annotations

import numpy as np

from reference import stitch
from rstitch_engine import _C

KEEP, NEXT_LLM = _C.KEEP, _C.NEXT_LLM


def model_output(model: int, context: list[int], vocab: int) -> tuple[int, float]:
    """(next token, normalised entropy) of a fake model that has seen `context`."""
    h = hash((model, tuple(context))) & 0xFFFFFFFF
    token = h % vocab
    entropy = ((h >> 8) % 10007) / 10007.0
    return token, entropy


def reference(prompt: list[int], max_tokens: int, eos: int, vocab: int, *, tau_up: float, tau_down: float,
              start: int = 0, handover_after: int = 0, forced=None, spec_k: int = 0):
    """The rules of docs/method.md ('The R-Stitch rule', 'Speculative decoding (baseline)') on the fake models
    (greedy speculative decoding emits the LLM's tokens)."""
    if spec_k:
        tau_up, tau_down, start = float("inf"), float("-inf"), 1
    return stitch(lambda m, seq: model_output(m, seq, vocab), prompt, max_tokens, {eos}, tau_up=tau_up,
                  tau_down=tau_down, start=start, handover_after=handover_after, forced=forced)


class SimDevice:
    """Runs plans against simulated KV pools (token ids instead of vectors)."""

    def __init__(self, sched: _C.Scheduler, num_slots: int, max_model_len: int, vocab: int):
        self.sched, self.vocab, self.max_len = sched, vocab, max_model_len
        self.bs = sched.block_size
        layout = {name: (kind, off, n) for name, kind, off, n in sched.layout()}
        self.layout = layout
        self.pools = {m: np.full(sched.num_blocks * self.bs, -1, dtype=np.int64) for m in (0, 1)}
        self.blocks = np.zeros((num_slots + 1) * sched.max_blocks_per_seq, dtype=np.int64)
        self.tokens = np.zeros((num_slots + 1, max_model_len), dtype=np.int64)
        cap = layout["logits_indices"][2]
        self.i32 = {m: np.zeros(sched.i32_size, np.int32) for m in (0, 1)}
        self.f32 = {m: np.zeros(sched.f32_size, np.float32) for m in (0, 1)}
        self.updates = np.zeros(sched.table_update_size, np.int32)
        self.rows_run = {0: [], 1: []}  # rows of each executed sub-batch
        self.nan_slots: set[int] = set()  # sequence slots whose logits come out NaN
        self.results = {m: (np.zeros(cap, np.int32), np.zeros(cap, np.float32), np.zeros(cap, np.int32))
                        for m in (0, 1)}

    def field(self, m: int, name: str) -> np.ndarray:
        kind, off, n = self.layout[name]
        return (self.i32[m] if kind == "i" else self.f32[m])[off:off + n]

    def plan(self, step: int, models=(0, 1)) -> int:
        args = []
        for m in (0, 1):
            args += [self.i32[m], self.f32[m]] if m in models else [None, None]
        rows = self.sched.plan(step, *args, self.updates)
        n, cap = self.updates[0], self.sched.table_update_capacity
        self.blocks[self.updates[1:1 + n]] = self.updates[1 + cap:1 + cap + n]
        return rows

    def run(self, m: int) -> None:
        f = lambda name: self.field(m, name)  # noqa: E731
        header = f("header")
        T, R, L = header[_C.HEADER["num_tokens"]], header[_C.HEADER["num_rows"]], header[_C.HEADER["num_logits"]]
        self.rows_run[m].append(int(R))
        ids, tix, pos, slots = f("input_ids"), f("token_index"), f("positions"), f("slot_mapping")
        for t in range(T):
            token = ids[t] if tix[t] < 0 else self.tokens.flat[tix[t]]
            self.pools[m][slots[t]] = token
        qsl, seq_slot = f("query_start_loc"), f("seq_slot")
        row_of_token = np.zeros(T, np.int64)
        for r in range(R):
            row_of_token[qsl[r]:qsl[r + 1]] = r
        tok, ent, flags = self.results[m]
        mb = self.sched.max_blocks_per_seq
        for li in range(L):
            t = f("logits_indices")[li]
            slot = seq_slot[row_of_token[t]]
            table = self.blocks[slot * mb:(slot + 1) * mb]
            ctx = [int(self.pools[m][table[q // self.bs] * self.bs + q % self.bs]) for q in range(pos[t] + 1)]
            tok[li], ent[li] = model_output(m, ctx, self.vocab)
            if m == 0:
                keep = ent[li] <= f("tau_up")[li]
                flags[li] = KEEP if keep else NEXT_LLM
            else:
                flags[li] = KEEP | (0 if ent[li] <= f("tau_down")[li] else NEXT_LLM)
            if slot in self.nan_slots:
                tok[li], ent[li], flags[li] = -1, float("nan"), _C.NAN
            if f("out_pos")[li] >= 0:
                self.tokens[f("out_slot")[li], f("out_pos")[li]] = tok[li]
        self._verify(m, L, tok, flags)

    def _verify(self, m, L, tok, flags):
        """Greedy verification, as rstitch_kernels/spec_verify.py does it."""
        f = lambda name: self.field(m, name)  # noqa: E731
        vs, sp, slot = f("verify_start"), f("sample_pos"), f("out_slot")
        li = 0
        while li < L:
            if vs[li] < 0:
                li += 1
                continue
            end = li
            while end + 1 < L and vs[end + 1] == vs[li]:
                end += 1
            rejected = False
            for j in range(li, end + 1):
                if rejected:
                    flags[j] = 0
                    continue
                draft = self.tokens[slot[j], sp[j]]
                if j < end and tok[j] == draft:
                    flags[j] = KEEP
                else:
                    flags[j] = KEEP
                    self.tokens[slot[j], sp[j]] = tok[j]
                    rejected = True
            li = end + 1

    def commit(self, step: int, ran: list[int]):
        args = []
        for m in (0, 1):
            args += list(self.results[m]) if m in ran else [None, None, None]
        return self.sched.commit(step, *args, 0.0, 0.0)


def make_scheduler(*, num_blocks=64, block_size=4, max_num_seqs=8, max_model_len=128, max_step_tokens=64,
                   max_logits_rows=32, vocab=50, max_inflight=1, optimistic_llm=True, models=(0, 1),
                   llm_min_batch=1, llm_max_wait=0, llm_batch_share=0.0):
    c = _C.SchedulerConfig()
    c.num_blocks, c.block_size, c.max_num_seqs, c.max_model_len = num_blocks, block_size, max_num_seqs, max_model_len
    c.max_step_tokens, c.max_logits_rows, c.vocab_size = max_step_tokens, max_logits_rows, vocab
    c.has_model = (0 in models, 1 in models)
    c.max_inflight, c.optimistic_llm = max_inflight, optimistic_llm
    c.llm_min_batch, c.llm_max_wait, c.llm_batch_share = llm_min_batch, llm_max_wait, llm_batch_share
    return _C.Scheduler(c)


def run_to_completion(sched, dev: SimDevice, max_inflight: int, models=(0, 1), max_steps: int = 10000):
    """The step loop of engine/core.py, against the simulated device."""
    inflight, events, step = [], [], 0
    while sched.has_unfinished() or inflight:
        rows = dev.plan(step, models)
        if rows:
            ran = [m for m in models if dev.field(m, "header")[_C.HEADER["num_rows"]] > 0]
            for m in ran:
                dev.run(m)
            # results of step `step` are copied out now; the buffers are reused next step
            inflight.append((step, ran, {m: tuple(a.copy() for a in dev.results[m]) for m in ran}))
        while inflight and (len(inflight) >= max_inflight or not rows):
            s, ran, res = inflight.pop(0)
            saved = {m: dev.results[m] for m in ran}
            dev.results.update(res)
            events += dev.commit(s, ran)
            dev.results.update(saved)
        step += 1
        assert step < max_steps, "no progress"
    return events
