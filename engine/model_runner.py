"""Runs one model's sub-batch of a step: plan -> inputs -> forward -> logits -> stitch step (-> verify).

Everything reads the device copy of the plan and writes persistent output buffers (token, entropy,
flags per logits row), so a step can be replayed from a CUDA graph; sizes come from the host copy of the
plan header, never from the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rstitch_engine.config import ModelConfig
from rstitch_engine.models.decoder import ModelWeights, forward
from rstitch_engine.models.rope import cos_sin_table
from rstitch_engine.kernels.spec_verify import verify_drafts

from .kv_pool import KVPool
from .ops import AttentionMeta, Ops
from .plan import DevicePlan, HostPlan


class DeviceTables:
    """Per sequence slot, shared by both models: the block table, and the tokens produced on the device
    (the next step may need a token before the host has read it). Row `num_slots` is a sink for padding."""

    def __init__(self, num_slots: int, max_blocks: int, max_model_len: int, device):
        self.blocks = torch.zeros(num_slots + 1, max_blocks, dtype=torch.int32, device=device)
        self.tokens = torch.zeros(num_slots + 1, max_model_len, dtype=torch.int32, device=device)

    def apply_updates(self, host_updates: torch.Tensor, capacity: int) -> None:
        """Writes the block-table entries the scheduler allocated since the last step."""
        n = int(host_updates[0])  # NOTE: a pinned host tensor: no device sync
        if n == 0:
            return
        index = host_updates[1:1 + n].to(self.blocks.device, non_blocking=True)
        value = host_updates[1 + capacity:1 + capacity + n].to(self.blocks.device, non_blocking=True)
        self.blocks.view(-1)[index.long()] = value


@dataclass(frozen=True)
class StepFlags:
    """Which optional parts of the step run (read from the host copy of the plan header)."""
    top_k_top_p: bool = False
    router: bool = False
    sampled_drafts: bool = False
    verify: bool = False
    sampling: bool = False

    @classmethod
    def of(cls, host: HostPlan) -> "StepFlags":
        sampling = bool(host.count("any_sampling"))
        return cls(top_k_top_p=bool(host.count("any_top_k_top_p")), router=bool(host.count("any_router")),
                   sampled_drafts=sampling and bool(host.count("any_draft")),
                   verify=bool(host.count("any_verify")), sampling=sampling)


class ModelRunner:
    def __init__(self, model: int, cfg: ModelConfig, weights: ModelWeights, pool: KVPool, ops: Ops,
                 tables: DeviceTables, sched, vocab_limit: int, max_model_len: int, device):
        self.model, self.cfg, self.weights, self.pool, self.ops = model, cfg, weights, pool, ops
        self.tables, self.vocab_limit, self.device, self.sched = tables, vocab_limit, device, sched
        self.plan = DevicePlan(sched, device)
        cap = self.plan.views.logits_indices.shape[0]
        self.tokens = torch.zeros(cap, dtype=torch.int32, device=device)
        self.entropies = torch.zeros(cap, dtype=torch.float32, device=device)
        self.flags = torch.zeros(cap, dtype=torch.int32, device=device)
        self.no_cutoff = torch.full((cap,), float("-inf"), device=device)
        # NaN/inf detection independent of the attention backend (models/decoder.py `check`): a per-token
        # sum over q/k/v and the final hidden state, and per sequence slot whether this model's KV of the
        # request holds a non-finite value (sticky across steps: a chunked prefill decides nothing).
        self.check = torch.zeros(self.plan.views.input_ids.shape[0], dtype=torch.float32, device=device)
        self.nonfinite_slots = torch.zeros(tables.tokens.shape[0], dtype=torch.bool, device=device)
        self.cos_sin = cos_sin_table(cfg, max_model_len, device)
        self.scale = cfg.head_dim ** -0.5
        self.num_slots = tables.tokens.shape[0] - 1
        self.router = None  # R-Stitch+: decides SLM rows with H > tau
        self.graphs = None  # StepGraphs, once captured

    def run(self, host: HostPlan, draft_logits: torch.Tensor | None = None) -> int:
        """Executes the planned sub-batch; returns its number of logits rows (outputs [:n] are valid)."""
        T, R, L = host.count("num_tokens"), host.count("num_rows"), host.count("num_logits")
        key = self.graphs.key(host) if self.graphs is not None else None
        if key is not None:
            host.pad(R, *key, self.num_slots)
            self.plan.load(host)
            self.graphs.replay(key)
        else:
            self.plan.load(host)
            self.compute(T, R, L, host.count("max_query_len"), StepFlags.of(host), draft_logits,
                         max_seq_len=host.count("max_seq_len"))
        return L

    def compute(self, T: int, R: int, L: int, max_query_len: int, flags: "StepFlags",
                draft_logits: torch.Tensor | None = None, max_seq_len: int | None = None) -> None:
        """The step on the device plan's first T tokens / R rows / L logits rows (static shapes: graphs
        capture it with T = R = L = bucket over padded rows). An eager step passes its longest context,
        and attention then sees only the block-table columns it needs."""
        v = self.plan.views
        blocks = self.tables.blocks
        if max_seq_len is not None:
            blocks = blocks[:, :-(-max_seq_len // self.pool.block_size)]
        token_index = v.token_index[:T]
        input_ids = torch.where(token_index >= 0, self.tables.tokens.view(-1)[token_index.clamp(min=0)],
                                v.input_ids[:T])
        meta = AttentionMeta(slot_mapping=v.slot_mapping[:T], block_tables=blocks,
                             seq_slot=v.seq_slot[:R], query_start_loc=v.query_start_loc[:R + 1],
                             seq_lens=v.seq_lens[:R], max_query_len=max_query_len, scale=self.scale)
        check = self.check[:T]
        check.zero_()
        hidden = forward(self.cfg, self.weights, self.ops, input_ids, v.positions[:T], self.pool.layers, meta,
                         self.cos_sin, check=check)
        nonfinite = self._nonfinite_rows(check, T, R, L)
        if L:
            selected = hidden[v.logits_indices[:L]]
            self.decide(self.ops.lm_head(selected, self.weights.lm_head), selected, flags, L, draft_logits,
                        nonfinite)

    def _nonfinite_rows(self, check: torch.Tensor, T: int, R: int, L: int) -> torch.Tensor:
        """[L] bool: the logits rows whose request has had a NaN/inf in this model's q/k/v or final hidden
        states, in this step or since its KV was last built from position 0 (a row whose span holds a real
        token at position 0 resets its slot). The stitch step flags those rows NAN, so the request fails
        with an error naming the model. On the device, without a host sync (graph-capturable)."""
        v = self.plan.views
        bad = ~torch.isfinite(check)
        fresh = (v.positions[:T] == 0) & (v.slot_mapping[:T] >= 0)  # padding tokens write no KV (slot -1)
        counts = torch.nn.functional.pad(torch.stack([bad, fresh]).int().cumsum(-1), (1, 0))  # [2, T + 1]
        qsl = v.query_start_loc[:R + 1].long()
        per_row = (counts[:, qsl[1:]] - counts[:, qsl[:-1]]) > 0  # [2, R]: any bad / any fresh token
        slot = v.seq_slot[:R].long()
        self.nonfinite_slots[slot] = (self.nonfinite_slots[slot] & ~per_row[1]) | per_row[0]
        return self.nonfinite_slots[v.out_slot[:L].long()]

    def decide(self, logits: torch.Tensor, hidden: torch.Tensor, flags: "StepFlags", L: int,
               draft_logits: torch.Tensor | None, nonfinite: torch.Tensor | None = None) -> None:
        v, rows = self.plan.views, slice(0, L)
        temperature, top_k, top_p = v.temperature[rows], v.top_k[rows], v.top_p[rows]
        cutoff = self.no_cutoff[rows]
        if flags.top_k_top_p:
            cutoff = self.ops.sampling_cutoff(logits, temperature, top_k, top_p, self.vocab_limit)
        tau_up = v.tau_up[rows]
        if flags.router:
            if self.router is None:
                raise RuntimeError("a request asked for the R-Stitch+ router, but none is loaded")
            keep = self.router.keeps(hidden, v.router_features[rows], v.seed[rows], v.sample_pos[rows])
            tau_up = torch.where((v.use_router[rows] != 0) & keep, float("inf"), tau_up)
        tokens, result_flags = self.tokens[rows], self.flags[rows]
        self.ops.stitch_step(logits, self.vocab_limit, temperature=temperature, cutoff=cutoff, seed=v.seed[rows],
                             sample_pos=v.sample_pos[rows], tau_up=tau_up, tau_down=v.tau_down[rows],
                             is_llm=int(self.model), token_table=self.tables.tokens, out_slot=v.out_slot[rows],
                             out_pos=v.out_pos[rows], out=(tokens, self.entropies[rows], result_flags),
                             nonfinite=nonfinite)
        if flags.sampled_drafts:
            # Keep each draft's distribution for the rejection rule; other rows go to the sink slot.
            spec_index = v.spec_index[rows]
            slot = torch.where(spec_index >= 0, v.out_slot[rows], self.num_slots)
            draft_logits[slot.long(), spec_index.clamp(min=0).long()] = logits[:, :self.vocab_limit].to(draft_logits.dtype)
        if flags.verify:
            verify_drafts(logits, self.vocab_limit, tokens=tokens, flags=result_flags,
                          verify_start=v.verify_start[rows], spec_index=v.spec_index[rows],
                          sample_pos=v.sample_pos[rows], out_slot=v.out_slot[rows], seed=v.seed[rows],
                          temperature=temperature, top_k=top_k, top_p=top_p, cutoff=cutoff,
                          token_table=self.tables.tokens, draft_logits=draft_logits if flags.sampling else None,
                          accept_rate=v.accept_rate[rows])
