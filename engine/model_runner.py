"""Runs one model's sub-batch of a step: plan -> inputs -> forward -> logits -> stitch step (-> verify).

Everything reads the device copy of the plan and writes persistent output buffers (token, entropy,
flags per logits row), so a step can be replayed from a CUDA graph; sizes come from the host copy of the
plan header, never from the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rstitch_engine.config import ModelConfig
from rstitch_engine.models.decoder import ModelWeights, forward
from rstitch_engine.models.rope import cos_sin_table
from rstitch_engine.protocol import MODELS
from rstitch_engine.kernels.spec_verify import verify_drafts

from .kv_pool import KVPool
from .ops import AttentionMeta, Ops
from .plan import DevicePlan, HostPlan, PlanLayout
from .readback import result_views


class DeviceTables:
    """Per sequence slot, shared by both models: the block table, the tokens produced on the device (the
    next step may need a token before the host has read it), and per model whether the request's KV holds a
    non-finite value. Row `num_slots` is a sink for padding.

    The NaN flags (models/decoder.py `forward`) are set by the layers through each token's slot, read by the
    stitch step, sticky across steps (a chunked prefill decides nothing), and cleared when a slot gets a new
    occupant: the step whose block-table update writes the slot's first entry. (Not where a model's KV is
    rebuilt from position 0: with prefix caching a request may never compute position 0 itself.)"""

    def __init__(self, num_slots: int, max_blocks: int, max_model_len: int, device):
        self.blocks = torch.zeros(num_slots + 1, max_blocks, dtype=torch.int32, device=device)
        self.tokens = torch.zeros(num_slots + 1, max_model_len, dtype=torch.int32, device=device)
        self.nonfinite = torch.zeros(len(MODELS), num_slots + 1, dtype=torch.int32, device=device)

    def apply_updates(self, host_updates: torch.Tensor, capacity: int) -> None:
        """Writes the block-table entries the scheduler allocated since the last step."""
        n = int(host_updates[0])  # NOTE: a pinned host tensor: no device sync
        if n == 0:
            return
        # one copy: [indices (capacity) | values], of which the first n of each are used
        both = host_updates[1:1 + capacity + n].to(self.blocks.device, non_blocking=True)
        entries = both[:n].long()
        self.blocks.view(-1)[entries] = both[capacity:]
        # a min with 0 for a slot whose first entry is written (a new occupant), with 1 (kept) for the others;
        # int32 throughout, so that no dtype conversion adds a copy
        max_blocks = self.blocks.shape[1]
        kept = (both[:n] % max_blocks).clamp_(max=1).expand(len(MODELS), n)
        self.nonfinite.scatter_reduce_(1, (entries // max_blocks).expand(len(MODELS), n), kept, reduce="amin")


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

    @property
    def uses_draft_logits(self) -> bool:
        """The step writes (sampled drafts) or reads (sampled verification) the draft-logits buffer."""
        return self.sampled_drafts or (self.verify and self.sampling)


class ModelRunner:
    def __init__(self, model: int, cfg: ModelConfig, weights: ModelWeights, pool: KVPool, ops: Ops,
                 tables: DeviceTables, layout: PlanLayout, vocab_limit: int, max_model_len: int, device,
                 all_reduce=None):
        """`cfg`, `weights` and `pool` are this rank's shard when the model is tensor-parallel, and `all_reduce`
        sums its partial outputs over the ranks (models/decoder.py `forward`)."""
        self.model, self.cfg, self.weights, self.pool, self.ops = model, cfg, weights, pool, ops
        self.all_reduce = all_reduce
        self.tables, self.vocab_limit, self.device, self.layout = tables, vocab_limit, device, layout
        self.plan = DevicePlan(layout, device)
        self.logits_capacity = cap = self.plan.views.logits_indices.shape[0]  # logits rows a step can have
        # token, entropy and flags per logits row, packed so that one copy brings them to the host
        self.results = torch.zeros(3 * cap, dtype=torch.int32, device=device)
        self.tokens, self.entropies, self.flags = result_views(self.results, cap)
        self.no_cutoff = torch.full((cap,), float("-inf"), device=device)
        # NaN/inf detection independent of the attention backend (DeviceTables.nonfinite)
        self.token_slot = torch.zeros(self.plan.views.input_ids.shape[0], dtype=torch.int32, device=device)
        self.nonfinite_slots = tables.nonfinite[model]
        self.cos_sin = cos_sin_table(cfg, max_model_len, device)
        self.scale = cfg.head_dim ** -0.5
        self.num_slots = tables.tokens.shape[0] - 1
        self.router = None  # R-Stitch+: decides SLM rows with H > tau (set_router)
        self.graphs = None  # StepGraphs, once captured

    def prepare(self, host: HostPlan, draft_logits: torch.Tensor | None = None):
        """The graph key of this plan (None: it runs eagerly), with its graph captured if it was not yet:
        before the step's timing starts, as a first-use capture is no part of the step."""
        key = self.graphs.key(host) if self.graphs is not None else None
        if key is not None:
            self.graphs.ensure(key, draft_logits if key[2].uses_draft_logits else None)
        return key

    def run(self, host: HostPlan, key, draft_logits: torch.Tensor | None = None) -> tuple[int, np.ndarray | None]:
        """Executes the planned sub-batch (`key` from `prepare`) -> (n, order): outputs [:n] hold its logits
        rows, in plan order, or, where a padded verify graph moved them, logits row l at outputs[order[l]]."""
        T, R, L = host.count("num_tokens"), host.count("num_rows"), host.count("num_logits")
        if key is None:
            self.plan.load(host)
            self.compute(T, R, L, host.count("max_query_len"), StepFlags.of(host), draft_logits,
                         max_seq_len=host.count("max_seq_len"))
            return L, None
        rows, span, flags = key
        order = host.pad(R, rows, span, self.num_slots, every_token=flags.verify)
        self.plan.load(host)
        self.graphs.replay(key)
        return (L, None) if order is None else (rows * span, order)

    def set_router(self, router) -> None:
        """Installs an R-Stitch+ DeviceRouter; graphs captured with the previous one are dropped."""
        self.router = router
        if self.graphs is not None:
            self.graphs.forget(lambda flags: flags.router)

    def compute(self, T: int, R: int, L: int, max_query_len: int, flags: "StepFlags",
                draft_logits: torch.Tensor | None = None, max_seq_len: int | None = None) -> None:
        """The step on the device plan's first T tokens / R rows / L logits rows (static shapes: graphs
        capture it with T = R = L = bucket over padded rows). An eager step passes its longest context,
        and attention then sees only the block-table columns it needs."""
        v = self.plan.views
        blocks = self.tables.blocks
        if max_seq_len is not None:
            blocks = blocks[:, :-(-max_seq_len // self.pool.block_size)]
        token_slot = self.token_slot[:T]
        h = self.ops.embed_tokens(self.weights.embed, v.input_ids[:T], v.token_index[:T], self.tables.tokens.view(-1),
                                  query_start_loc=v.query_start_loc[:R + 1], seq_slot=v.seq_slot[:R],
                                  token_slot=token_slot)
        meta = AttentionMeta(slot_mapping=v.slot_mapping[:T], block_tables=blocks,
                             seq_slot=v.seq_slot[:R], query_start_loc=v.query_start_loc[:R + 1],
                             seq_lens=v.seq_lens[:R], max_query_len=max_query_len, scale=self.scale)
        selected = forward(self.cfg, self.weights, self.ops, h, v.positions[:T], self.pool.layers, meta,
                           self.cos_sin, logits_rows=v.logits_indices[:L], nonfinite=(token_slot, self.nonfinite_slots),
                           all_reduce=self.all_reduce)
        if L:
            self.decide(self.ops.lm_head(selected, self.weights.lm_head), selected, flags, L, draft_logits)

    def decide(self, logits: torch.Tensor, hidden: torch.Tensor, flags: "StepFlags", L: int,
               draft_logits: torch.Tensor | None) -> None:
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
                             nonfinite_slots=self.nonfinite_slots)
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
