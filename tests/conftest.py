"""Shared fixtures: tiny random checkpoints made once per session, and the Triton interpreter on the CPU."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be chosen before they are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (sim_device, reference) import by name

import pytest  # noqa: E402

_CACHE: dict = {}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, **kw) -> path of a tiny random checkpoint, written once per distinct argument set."""

    def make(arch: str = "qwen2", **kw) -> Path:
        from rstitch_engine.tiny import make_tiny

        key = (arch, tuple(sorted(kw.items())))
        if key not in _CACHE:
            name = "-".join([arch] + [f"{k}{v}" for k, v in sorted(kw.items())])
            _CACHE[key] = make_tiny(tmp_path_factory.mktemp(name), arch, **kw)
        return _CACHE[key]

    return make


@pytest.fixture(scope="session")
def pair(tiny):
    """(slm_dir, llm_dir): two tiny qwen2 models of different sizes sharing the tokenizer, with peaky
    enough distributions that both models produce tokens at moderate thresholds."""
    slm = tiny("qwen2", seed=1, init_std=0.3, hidden=32, heads=4, kv_heads=2, layers=2)
    llm = tiny("qwen2", seed=2, init_std=0.3, hidden=64, heads=4, kv_heads=1, layers=3, vocab_pad=13)
    return slm, llm


@pytest.fixture(scope="session")
def close_pair(tiny, tmp_path_factory):
    """(slm_dir, llm_dir) where the LLM is the SLM with perturbed weights: the two agree on most greedy
    tokens but not all, as a speculative-decoding pair should."""
    from safetensors.torch import load_file, save_file

    slm = tiny("qwen2", seed=1, init_std=0.3, hidden=32, heads=4, kv_heads=2, layers=2)
    llm = tmp_path_factory.mktemp("close-llm")
    for f in slm.iterdir():
        (llm / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(7)
    weights = {n: t + 0.08 * t.std() * torch.randn(t.shape, generator=g)
               for n, t in load_file(slm / "model.safetensors").items()}
    save_file(weights, llm / "model.safetensors")
    return slm, llm


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly where there is no CUDA device, tests marked `demo_pair` where the demo
    pair is not installed."""
    from rstitch_engine.demo_pair import demo_pair_installed

    missing = {"cuda": (not torch.cuda.is_available(), "needs a CUDA device"),
               "demo_pair": (not demo_pair_installed(), "demo pair not installed: pip install -e '.[demo]'")}
    for marker, (absent, reason) in missing.items():
        if absent:
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))
    for item in items:  # one worker runs them one after another: each holds ~10 GB of fp32 weights
        if "demo_pair" in item.keywords:
            item.add_marker(pytest.mark.xdist_group("demo_pair"))
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        for item in items:
            groups = sorted({str(m.args[0]) for m in item.iter_markers("xdist_group")})
            if groups and "@" not in item.nodeid:
                _group_node_id(item, "_".join(groups))


def _group_node_id(item, group: str) -> None:
    """xdist's loadgroup sends the tests whose node ids end in '@group' to one worker. xdist 3.8 writes that
    suffix to `item._nodeid`, where pytest 9 no longer keeps the id, so there the groups fell apart (the demo
    pair loaded by two workers at once, two Ray applications): write it where this pytest keeps it."""
    if hasattr(item, "_id"):  # pytest >= 9 (where xdist may have set a `_nodeid` nothing reads)
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(f"{item.nodeid}@{group}")
    else:
        item._nodeid = f"{item.nodeid}@{group}"


MAX_WORKERS = 4  # each worker imports torch and builds its own tiny models: more cost memory, gain little


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core this process may use, at most MAX_WORKERS."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
