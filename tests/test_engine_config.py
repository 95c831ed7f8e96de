"""EngineConfig: one home for the engine's options, their validation, and the scheduler config built from them."""
import logging

import pytest
import torch

from rstitch_engine import Engine, SamplingParams, _C
from rstitch_engine.engine_config import EngineConfig
from rstitch_engine.protocol import LLM, SLM, Model, ResultFlag


@pytest.fixture(scope="module")
def llm(tiny):
    return tiny("qwen2")


@pytest.mark.parametrize("option, value, message", [
    ("block_size", 0, "block_size must be an integer in"),
    ("max_num_seqs", -1, "max_num_seqs must be an integer in"),
    ("max_num_seqs", 2**31, "max_num_seqs must be an integer in"),
    ("max_num_batched_tokens", 1.5, "max_num_batched_tokens must be an int"),
    ("max_model_len", 0, "max_model_len must be an integer in"),
    ("llm_min_batch", True, "llm_min_batch must be an int"),
    ("kv_cache_gb", 0, "kv_cache_gb must be a positive"),
    ("kv_cache_gb", float("nan"), "kv_cache_gb must be a positive"),
    ("gpu_memory_utilization", 1.5, r"gpu_memory_utilization must be a number in \(0, 1\]"),
    ("kernels", "cuda", "kernels must be one of"),
    ("cuda_graphs", "yes", "cuda_graphs must be"),
    ("overlap", 1, "overlap must be true or false"),
    ("dtype", "float64", "unknown dtype"),
    ("dtype", torch.float64, "dtype torch.float64 is not supported"),
    ("slm", 3, "slm must be a path"),
])
def test_bad_options_name_the_option(option, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EngineConfig(llm="some/dir", **{option: value})


def test_needs_a_model_and_rejects_unknown_options(llm):
    with pytest.raises(ValueError, match="llm=..., slm=..., or both"):
        EngineConfig()
    with pytest.raises(TypeError, match="unknown option.*kv_cache_size"):
        Engine(llm=llm, kv_cache_size=1)
    with pytest.raises(ValueError, match="not both"):
        Engine(llm=llm, config=EngineConfig(llm=llm))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        _ = EngineConfig(llm="x", device="cuda").torch_device
    with pytest.raises(ValueError, match="only 'cuda' and 'cpu'"):
        _ = EngineConfig(llm="x", device="meta").torch_device


def test_cpu_defaults_resolve():
    cfg = EngineConfig(llm="x", device="cpu")
    assert (cfg.torch_dtype, cfg.use_overlap, cfg.use_triton, cfg.graph_mode) == (torch.float32, False, False, None)
    assert EngineConfig(llm="x", device="cpu", cuda_graphs=True).graph_mode == "emulate"
    assert EngineConfig(llm="x", device="cpu", dtype="bf16").torch_dtype == torch.bfloat16


def test_scheduler_config_carries_every_option():
    cfg = EngineConfig(llm="x", device="cpu", block_size=8, max_num_seqs=5, max_num_batched_tokens=77, overlap=True,
                       optimistic_llm=False, llm_min_batch=3, llm_max_wait=9)
    sc = cfg.scheduler_config(_C, num_blocks=300, max_model_len=123, vocab_size=50, has_model=(True, False))
    assert (sc.num_blocks, sc.block_size, sc.max_num_seqs, sc.max_model_len) == (300, 8, 5, 123)
    assert (sc.max_step_tokens, sc.max_logits_rows, sc.vocab_size) == (77, 20, 50)
    assert (sc.max_inflight, sc.optimistic_llm, sc.watermark_blocks) == (2, False, 3)
    assert (sc.llm_min_batch, sc.llm_max_wait, tuple(sc.has_model)) == (3, 9, (True, False))


def test_config_and_keywords_build_the_same_engine(pair):
    params = SamplingParams(max_tokens=8, temperature=0.0)
    by_keywords = Engine(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01)
    by_config = Engine(config=EngineConfig(slm=pair[0], llm=pair[1], device="cpu", block_size=4, kv_cache_gb=0.01))
    assert by_config.config == by_keywords.config
    a, b = (e.generate([[5, 6, 7]], params, use_tqdm=False)[0] for e in (by_keywords, by_config))
    assert (a.token_ids, a.sources) == (b.token_ids, b.sources)


def test_lowered_context_is_explained(llm, caplog):
    with caplog.at_level(logging.INFO, logger="rstitch_engine"):
        eng = Engine(llm=llm, device="cpu", block_size=4, kv_cache_gb=2e-5)
    [record] = [r for r in caplog.records if "max_model_len lowered" in r.message]
    assert record.levelno == logging.INFO  # the models' default context: information, not a warning
    assert "kv_cache_gb" in record.message and str(eng.max_model_len) in record.message
    with pytest.raises(ValueError, match="kv_cache_gb: a KV budget of .* holds no block"):
        Engine(llm=llm, device="cpu", kv_cache_gb=1e-9)


def test_protocol_mirrors_the_extension():
    assert (int(SLM), int(LLM)) == (_C.SLM, _C.LLM) and list(Model) == [SLM, LLM]
    assert (ResultFlag.KEEP, ResultFlag.NEXT_LLM, ResultFlag.NAN) == (_C.KEEP, _C.NEXT_LLM, _C.NAN)
