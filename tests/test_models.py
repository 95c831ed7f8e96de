"""Own model implementations against transformers: logits of a full forward, and batched greedy generation
token for token, for tiny random Qwen2, Llama and Qwen3 checkpoints (GQA, tied and untied heads)."""
import json

import pytest
import torch

from helpers import engine_logits, hf_logits, hf_model
from rstitch_engine import Engine, SamplingParams
from rstitch_engine.config import CheckpointError, ModelConfig

ARCH_CASES = [("qwen2", False), ("qwen2", True), ("llama", False), ("llama", True), ("qwen3", False),
              ("qwen3", True)]


@pytest.mark.parametrize("arch, tied", ARCH_CASES)
def test_full_forward_logits_match_transformers(tiny, arch, tied):
    path = tiny(arch, tied=tied, init_std=0.3, layers=3)
    ids = torch.randint(3, 384, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, ref = engine_logits(path, ids), hf_logits(path, ids)
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() < 1e-4


def test_llama3_rope_scaling_matches_transformers(tiny):
    path = tiny("llama", init_std=0.3)
    scaled = path.parent / "llama3-scaled"
    scaled.mkdir(exist_ok=True)
    for f in path.iterdir():
        (scaled / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    (scaled / "config.json").write_text(json.dumps(cfg))
    ids = list(range(5, 60))
    assert (engine_logits(scaled, ids) - hf_logits(scaled, ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch, tied", ARCH_CASES[::2] + [("qwen2", True)])
def test_batched_greedy_generation_matches_transformers(tiny, arch, tied):
    path = tiny(arch, tied=tied, init_std=0.3, layers=3)
    prompts = [[5, 17, 200], list(range(40, 71)), [9] * 12 + [250, 3], [100]]
    eng = Engine(llm=path, device="cpu", dtype="float32", block_size=4, kv_cache_gb=0.01)
    free = eng.num_free_blocks
    outs = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    model = hf_model(path)
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=eng.eos_ids,
                             pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref
        assert o.finish_reason == ("stop" if ref[-1] in eng.eos_ids else "length")
    assert eng.num_free_blocks == free


def test_unsupported_checkpoints_fail_clearly(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        ModelConfig.from_dir(tmp_path)
    base = json.loads((tiny("qwen2") / "config.json").read_text())
    for patch, msg in [({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
                       ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
                       ({"use_sliding_window": True}, "sliding-window")]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **patch}))
        with pytest.raises(CheckpointError, match=msg):
            ModelConfig.from_dir(tmp_path)


def test_checkpoint_errors_name_file_and_problem(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    src = tiny("qwen2")
    for f in ("config.json",):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Engine(llm=tmp_path, device="cpu")
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \(7,\)"):
        Engine(llm=tmp_path, device="cpu")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.norm.weight' is missing"):
        Engine(llm=tmp_path, device="cpu")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only safetensors"):
        Engine(llm=tmp_path, device="cpu")


def test_sharded_checkpoint_loads(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    src = tiny("qwen2", init_std=0.3)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for f, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, tmp_path / f)
    index = {"weight_map": {n: f for f, ns in shards.items() for n in ns}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    ids = [3, 4, 5, 6, 7]
    # the same weights: equal up to the CPU GEMM's alignment-dependent summation order (engine/ops.py)
    torch.testing.assert_close(engine_logits(tmp_path, ids), engine_logits(src, ids), rtol=1e-6, atol=1e-5)


def test_cpu_linear_is_f_linear(monkeypatch):
    """engine/ops.py's CPU products compute F.linear, bias included: 2..16 float32 rows as weight @ x^T, and 3 or
    more half-precision rows in float32 over weight chunks in both orientations (a weight whose rows are not a
    whole number of chunks included), rounded to the input's dtype."""
    import torch.nn.functional as F

    from rstitch_engine.engine import ops
    from rstitch_engine.engine.ops import (HALF_CHUNKED_MIN_ROWS, HALF_TRANSPOSED_MIN_ROWS, SKINNY_MAX_ROWS,
                                           WEIGHT_CHUNK, cpu_linear)

    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(300, 70, generator=g), torch.randn(300, generator=g)
    for rows in (1, 2, 5, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1):
        x = torch.randn(rows, 70, generator=g)
        for bias in (None, b):
            got = cpu_linear(x, w, bias)
            assert got.is_contiguous() and got.shape == (rows, 300)
            torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(ops, "_slow_half_gemm", lambda dtype: True)  # as on AVX2, whatever this CPU has
    chunked_rows = []  # which products took the chunked path, and in which orientation (via its float32 mm)
    real_chunked = ops._chunked_half_linear
    monkeypatch.setattr(ops, "_chunked_half_linear", lambda x, *a: chunked_rows.append(x.shape[0]) or real_chunked(x, *a))
    w_half = torch.randn(WEIGHT_CHUNK // 70 + 44, 70, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        for rows in (1, HALF_CHUNKED_MIN_ROWS - 1, HALF_CHUNKED_MIN_ROWS, HALF_TRANSPOSED_MIN_ROWS - 1,
                     HALF_TRANSPOSED_MIN_ROWS, 41):
            x = torch.randn(rows, 70, generator=g).to(dtype)
            for bias in (None, torch.randn(w_half.shape[0], generator=g).to(dtype)):  # per output: chunked too
                got = cpu_linear(x, w_half.to(dtype), bias)
                assert got.dtype == dtype and got.is_contiguous() and got.shape == (rows, w_half.shape[0])
                want = F.linear(x.float(), w_half.to(dtype).float(), None if bias is None else bias.float())
                torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    # each row count took the chunked path iff it is HALF_CHUNKED_MIN_ROWS or more (2 dtypes x 2 biases)
    assert chunked_rows == [r for r in (1, HALF_CHUNKED_MIN_ROWS - 1, HALF_CHUNKED_MIN_ROWS, HALF_TRANSPOSED_MIN_ROWS - 1,
                                        HALF_TRANSPOSED_MIN_ROWS, 41) if r >= HALF_CHUNKED_MIN_ROWS for _ in range(2)] * 2
    x16 = torch.randn(HALF_CHUNKED_MIN_ROWS - 1, 70, generator=g).bfloat16()
    assert torch.equal(cpu_linear(x16, w.bfloat16()), F.linear(x16, w.bfloat16()))  # few half rows: F.linear


def test_cpu_product_bounds_follow_cpu_linear(monkeypatch):
    """The step-cost regimes (evaluation/step_cost.py) start where cpu_linear changes algorithm."""
    from rstitch_engine.engine import ops

    assert ops.cpu_product_bounds(torch.float32) == (2, ops.SKINNY_MAX_ROWS + 1)
    monkeypatch.setattr(ops, "_slow_half_gemm", lambda dtype: True)
    assert ops.cpu_product_bounds(torch.bfloat16) == (ops.HALF_CHUNKED_MIN_ROWS, ops.HALF_TRANSPOSED_MIN_ROWS)
    monkeypatch.setattr(ops, "_slow_half_gemm", lambda dtype: False)
    assert ops.cpu_product_bounds(torch.float16) == ()
