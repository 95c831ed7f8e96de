"""Kernels per step, counted on the CPU (Triton kernels under the interpreter, emulated graphs): what a
captured decode step or catch-up extend of the 1.5B shape puts on the GPU. Target (docs/design.md,
'Kernels per step'): at most 6 per layer and 4 outside the layers, at H200 settings (132 SMs: the split
GEMVs, split attention and split stitch step each stay one launch, merged by their last program).

Counted: every Triton launch, and every torch op that launches a kernel on a GPU (not views, not
allocations). Layers are told apart from the rest by the two models of the tiny pair (2 and 3 layers).
Steps of more than FUSED_MAX_ROWS tokens take cuBLAS plus separate norm/activation kernels (engine/ops.py)
and are not bounded here.
"""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.engine.ops import FUSED_MAX_ROWS
from rstitch_engine.protocol import LLM, SLM

MAX_PER_LAYER, MAX_OUTSIDE = 6, 4
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


class LaunchCounter(TorchDispatchMode):
    """Records the kernels an eager call would launch on a GPU: Triton launches by kernel name, torch ops by
    op name (views and allocations launch nothing; the interpreter's own tensor work inside a launch is
    not counted)."""

    def __init__(self):
        super().__init__()
        self.launches: list[str] = []
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_triton and not _launches_nothing(func):
            self.launches.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def triton_launch(self, name, run):
        if not self.inside_triton:
            self.launches.append(name)
        self.inside_triton += 1
        try:
            return run()
        finally:
            self.inside_triton -= 1


def _launches_nothing(func) -> bool:
    returns = func._schema.returns
    views = returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return bool(views) or func.overloadpacket.__name__ in ALLOCATIONS


@pytest.fixture
def counted(monkeypatch):
    """A LaunchCounter that also sees Triton launches (the interpreter's run), at H200 settings."""
    from triton.runtime.interpreter import InterpretedFunction

    for name in ("decode_attention", "fused_linear", "stitch_step"):  # modules, not the re-exported functions
        monkeypatch.setattr(importlib.import_module(f"rstitch_engine.kernels.{name}"), "num_sms", lambda device: 132)
    counter = LaunchCounter()
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **kw: counter.triton_launch(
        self.fn.__name__, lambda: run(self, *a, **kw)))
    return counter


def _steps(eng, counter, runs):
    """{(model, (rows, span) of the graph): launches of the last step that replayed it} over `runs`, a list of
    (policy, prompts, max_tokens); the last step of a key is the steady state (allocations done)."""
    steps = {}
    for model, runner in eng.core.executor.worker.runners.items():
        def replay(key, model=model, original=runner.graphs.replay):
            start = len(counter.launches)
            with counter:
                original(key)
            steps[model, key[:2]] = counter.launches[start:]  # greedy steps: the plain variant only
        runner.graphs.replay = replay
    for policy, prompts, max_tokens in runs:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        eng.generate(prompts, params, policy, use_tqdm=False)
    return steps


def _per_layer_and_outside(steps, key, layers):
    slm, llm = steps[SLM, key], steps[LLM, key]
    per_layer = (len(llm) - len(slm)) / (layers[LLM] - layers[SLM])
    return per_layer, len(slm) - layers[SLM] * per_layer


@pytest.fixture
def engine(pair):
    return Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01, kernels="triton",
                  cuda_graphs="emulate")


@pytest.mark.parametrize("rows", [1, 2])
def test_kernels_per_step(engine, counted, rows):
    layers = {m: len(r.weights.layers) for m, r in engine.core.executor.worker.runners.items()}
    prompts = [[5, 17, 200, 9], [40, 41, 42, 43, 44]][:rows]
    steps = _steps(engine, counted, [(policies.SLMOnly(), prompts, 3), (policies.LLMOnly(), prompts, 3),
                                     (policies.RStitch(tau=0.72), prompts[:1], 10)])  # short catch-up extends
    per_layer, outside = _per_layer_and_outside(steps, (rows, 1), layers)
    assert per_layer == int(per_layer) and per_layer <= MAX_PER_LAYER, steps[SLM, (rows, 1)]
    assert outside <= MAX_OUTSIDE, steps[SLM, (rows, 1)]
    assert any(span > 1 for _, (_, span) in steps), "R-Stitch's catch-up extends replay extend graphs"
    fused = [(model, key) for model, key in steps if key[0] * key[1] <= FUSED_MAX_ROWS]
    assert any(key[1] > 1 for _, key in fused), sorted(steps)
    for model, key in fused:  # decode and catch-up extend graphs alike, wherever the skinny GEMVs run
        launches = steps[model, key]
        assert len(launches) <= MAX_PER_LAYER * layers[model] + MAX_OUTSIDE, (model, key, launches)


class CopyCounter(TorchDispatchMode):
    """Counts tensor copies (copy_, .to) outside the graph bodies."""

    def __init__(self):
        super().__init__()
        self.copies, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.overloadpacket.__name__ in ("copy_", "_to_copy"):
            self.copies += 1
        return func(*args, **(kwargs or {}))


def test_one_copy_each_way_per_model_and_step(engine):
    """The plan goes up in one copy and the results come back in one, per model and step; block-table
    updates, on the steps that allocate a block, in one more."""
    counter, per_step, updates = CopyCounter(), [], []
    core, worker = engine.core, engine.core.executor.worker
    for runner in worker.runners.values():
        def replay(key, original=runner.graphs.replay):
            counter.paused = True
            try:
                original(key)
            finally:
                counter.paused = False
        runner.graphs.replay = replay
    apply_updates, step = worker.tables.apply_updates, core.step

    def counted_updates(host_updates, capacity):
        updates.append(int(host_updates[0]) > 0)
        return apply_updates(host_updates, capacity)

    def counted_step():
        before, n_updates = counter.copies, len(updates)
        with counter:
            events = step()
        per_step.append((counter.copies - before, sum(updates[n_updates:])))
        return events

    worker.tables.apply_updates, core.step = counted_updates, counted_step
    engine.generate([[5, 17, 200, 9]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                    policies.SLMOnly(), use_tqdm=False)
    decode_steps = per_step[1:]  # after the prompt's step, one model decodes per step
    assert decode_steps and all(copies == 2 + allocated for copies, allocated in decode_steps), per_step
    assert any(allocated for _, allocated in decode_steps) and any(not a for _, a in decode_steps)
