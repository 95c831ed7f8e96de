"""Broken checkpoints fail with one CheckpointError naming the file (and field, tensor or index entry) and
what is wrong: corrupt or truncated safetensors, bad or unsafe shard indexes, and every config.json field
the engine reads (type and range), never a raw exception from inside safetensors, transformers or the math.
Each case is a real file corrupted in tmp_path."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from rstitch_engine import Engine
from rstitch_engine.config import CheckpointError, ModelConfig
from rstitch_engine.loader import load_weights


@pytest.fixture
def ckpt(tmp_path, tiny):
    """A writable copy of a tiny qwen2 checkpoint (config, weights, tokenizer)."""
    return Path(shutil.copytree(tiny("qwen2"), tmp_path / "ckpt"))


def patch_config(path: Path, **changes) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del cfg[key]
    (path / "config.json").write_text(json.dumps(cfg))
    return cfg


_DROP = object()


def load(path: Path):
    return Engine(llm=path, device="cpu")


def config_error(path: Path, field: str):
    """pytest.raises for a CheckpointError naming path/config.json and `field`."""
    return pytest.raises(CheckpointError, match=re.escape(str(path / "config.json")) + ":.*" + re.escape(field))


# config.json


def test_config_that_is_a_json_list(ckpt):
    (ckpt / "config.json").write_text(json.dumps([json.loads((ckpt / "config.json").read_text())]))
    with pytest.raises(CheckpointError, match=r"config.json: the top level must be a JSON object.*not a list"):
        load(ckpt)


def test_config_that_is_not_utf8(ckpt):
    (ckpt / "config.json").write_bytes(b'{"hidden_size": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load(ckpt)


def test_zero_heads_without_head_dim(ckpt):
    patch_config(ckpt, num_attention_heads=0, head_dim=_DROP)
    with config_error(ckpt, "num_attention_heads must be a positive integer, got 0"):
        load(ckpt)


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "max_position_embeddings"])
@pytest.mark.parametrize("value", [0, -4, "64", 64.5, True, [64]])
def test_size_fields_must_be_positive_integers(ckpt, field, value):
    patch_config(ckpt, **{field: value})
    with config_error(ckpt, f"{field} must be a positive integer, got {value!r}"):
        ModelConfig.from_dir(ckpt)


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads"])
def test_required_fields(ckpt, field):
    patch_config(ckpt, **{field: _DROP})
    with config_error(ckpt, f"missing field {field!r}"):
        ModelConfig.from_dir(ckpt)


def test_heads_not_dividing_hidden_size_without_head_dim(ckpt):
    patch_config(ckpt, num_attention_heads=5, num_key_value_heads=1, head_dim=_DROP)
    with config_error(ckpt, "hidden_size 64 is not a multiple of num_attention_heads 5"):
        ModelConfig.from_dir(ckpt)


@pytest.mark.parametrize("kv_heads", [3, 8])
def test_heads_not_a_multiple_of_kv_heads(ckpt, kv_heads):
    patch_config(ckpt, num_key_value_heads=kv_heads)
    with config_error(ckpt, f"num_attention_heads 4 is not a multiple of num_key_value_heads {kv_heads}"):
        ModelConfig.from_dir(ckpt)


def test_odd_head_dim(ckpt):
    patch_config(ckpt, head_dim=15)
    with config_error(ckpt, "head_dim 15 is odd"):
        ModelConfig.from_dir(ckpt)


def test_head_dim_that_does_not_match_the_weights(ckpt):
    patch_config(ckpt, head_dim=8)  # consistent on its own (qwen3 sizes heads freely); the tensors disagree
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' "
                                              r"has shape \(64, 64\), expected \(32, 64\)"):
        load(ckpt)


@pytest.mark.parametrize("field, value, expected", [
    ("rms_norm_eps", 0, "a positive number"), ("rms_norm_eps", "1e-6", "a positive number"),
    ("rms_norm_eps", math.nan, "a positive number"), ("rope_theta", -1.0, "a positive number"),
    ("tie_word_embeddings", "false", "true or false"), ("use_sliding_window", 0, "true or false"),
    ("mlp_bias", "no", "true or false"), ("hidden_act", 3, "a string"),
])
def test_scalar_field_types(ckpt, field, value, expected):
    patch_config(ckpt, **{field: value}, rope_parameters=_DROP)
    with config_error(ckpt, f"{field} must be {expected}"):
        ModelConfig.from_dir(ckpt)


def test_rope_theta_inside_rope_parameters(ckpt):
    patch_config(ckpt, rope_parameters={"rope_type": "default", "rope_theta": "big"})
    with config_error(ckpt, "rope_parameters.rope_theta must be a positive number, got 'big'"):
        ModelConfig.from_dir(ckpt)


@pytest.mark.parametrize("value", ["float", 16, ["bfloat16"]])
def test_dtype(ckpt, value):
    patch_config(ckpt, dtype=value)
    with config_error(ckpt, "dtype must be one of float32"):
        ModelConfig.from_dir(ckpt)


def test_architectures_not_a_list(ckpt):
    patch_config(ckpt, architectures={"Qwen2ForCausalLM": 1})
    with config_error(ckpt, "architectures must be a list of model class names"):
        ModelConfig.from_dir(ckpt)


# Errors the tokenizer load used to report ("the tokenizer files could not be loaded") as transformers reads
# config.json too: they are now the config's, named with the field.


def test_layer_types_count_mismatch(ckpt):
    patch_config(ckpt, layer_types=["full_attention"])
    with config_error(ckpt, "layer_types lists 1 layers but num_hidden_layers is 2"):
        load(ckpt)


def test_layer_types_other_than_full_attention(ckpt):
    patch_config(ckpt, layer_types=["full_attention", "sliding_attention"])
    with config_error(ckpt, "layer_types[1] is 'sliding_attention'"):
        load(ckpt)


@pytest.mark.parametrize("rope, field", [
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}}, "rope_parameters.factor"),
    ({"rope_parameters": _DROP, "rope_scaling": {"type": "linear"}}, "rope_scaling.factor"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}}, "rope_parameters.low_freq_factor"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0}}, "rope_parameters.original_max_position_embeddings"),
])
def test_missing_rope_factor(ckpt, rope, field):
    patch_config(ckpt, **rope)
    with config_error(ckpt, f"missing field {field!r}"):
        load(ckpt)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": 0}, "rope_parameters.factor must be a positive number"),
    ({"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, "high_freq_factor 4.0 must be greater than low_freq_factor 4.0"),
    ({"full_attention": {"rope_type": "default"}}, "rope_parameters given per layer type"),
])
def test_bad_rope_parameters(ckpt, rope, message):
    patch_config(ckpt, rope_parameters=rope)
    with config_error(ckpt, message):
        load(ckpt)


@pytest.mark.parametrize("eos", ["2", [2, "3"], 384, -1, 2.0])
def test_eos_token_id(ckpt, eos):
    patch_config(ckpt, eos_token_id=eos)
    with config_error(ckpt, "eos_token_id must be a token id (an integer in 0..383) or a list of them"):
        load(ckpt)


def test_config_field_only_transformers_reads_is_blamed_on_the_config(ckpt):
    patch_config(ckpt, bos_token_id="zero")  # the engine does not read it; transformers' tokenizer load does
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / "config.json")) + ": transformers rejects it"
                                              ".*bos_token_id"):
        load(ckpt)


def test_real_configs_load_unchanged(tiny):
    """make_tiny's configs (transformers 5 layout) of every architecture and the demo pair's imported ones."""
    for arch in ("qwen2", "llama", "qwen3"):
        cfg = ModelConfig.from_dir(tiny(arch))
        assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (64, 4, 2, 16, 2)
        assert (cfg.rope_theta, cfg.rope_scaling, cfg.eos_token_ids, cfg.dtype) == (1e4, None, (2,), torch.float32)
    demo = Path.home() / ".cache" / "rstitch_engine" / "demo"
    for config in sorted(demo.glob("*/config.json")) if demo.is_dir() else []:
        cfg = ModelConfig.from_dir(config.parent)
        assert cfg.architecture == "Qwen2ForCausalLM" and cfg.rope_theta == 1e6 and cfg.eos_token_ids == (151645,)
        assert cfg.max_position_embeddings == 32768 and cfg.dtype == torch.bfloat16


def test_transformers_4_layout_still_loads(ckpt):
    patch_config(ckpt, rope_parameters=_DROP, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2},
                 dtype=_DROP, torch_dtype="bfloat16", num_key_value_heads=None, head_dim=None)
    cfg = ModelConfig.from_dir(ckpt)
    assert (cfg.rope_theta, cfg.rope_scaling) == (5e5, {"type": "linear", "factor": 2.0, "rope_type": "linear"})
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.dtype) == (4, 16, torch.bfloat16)


# model.safetensors


@pytest.mark.parametrize("damage, what", [("empty", "empty"), ("truncated", "truncated or corrupt"),
                                          ("header only", "truncated or corrupt"), ("random", "truncated or corrupt")])
def test_corrupt_single_file(ckpt, damage, what):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    f.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "header only": data[:header],
                   "random": os.urandom(4096)}[damage])
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + f": not a readable safetensors file: {what}"):
        load(ckpt)


def test_integer_tensor_is_not_cast(ckpt):
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' has dtype I32; weights must be floating"):
        load(ckpt)


def test_every_missing_tensor_is_named(ckpt):
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    gone = sorted(n for n in tensors if n.startswith("model.layers.1."))
    save_file({n: t for n, t in tensors.items() if n not in gone}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{len(gone)} tensor\(s\) the config implies are missing: "
                                              rf"'model.layers.1.*and {len(gone) - 5} more"):
        load(ckpt)


# sharded checkpoints: model.safetensors.index.json


@pytest.fixture
def sharded(ckpt):
    """`ckpt` split into two shards a.safetensors / b.safetensors with an index; returns (dir, index dict)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for f, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, ckpt / f)
    index = {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}
    write_index(ckpt, index)
    return ckpt, index


def write_index(path: Path, index) -> Path:
    f = path / "model.safetensors.index.json"
    f.write_text(index if isinstance(index, str) else json.dumps(index))
    return f


def test_sharded_loads(sharded, tiny):
    path, _ = sharded
    cfg = ModelConfig.from_dir(path)
    a, b = load_weights(path, cfg, torch.float32, torch.device("cpu")), \
        load_weights(tiny("qwen2"), cfg, torch.float32, torch.device("cpu"))
    assert torch.equal(a.layers[1].qkv, b.layers[1].qkv) and torch.equal(a.lm_head, b.lm_head)


@pytest.mark.parametrize("index, message", [
    ("{not json", "not a safetensors index (not valid JSON"),
    ("[1, 2]", "not a safetensors index (it needs a non-empty \"weight_map\""),
    ('{"weight_map": ["a.safetensors"]}', "not a safetensors index (it needs a non-empty \"weight_map\""),
    ('{"weight_map": {}}', "not a safetensors index (it needs a non-empty \"weight_map\""),
    ('{"weight_map": {"model.norm.weight": 3}}', "the entry 'model.norm.weight': 3 is not a shard file name"),
    ('{"weight_map": {"model.norm.weight": "weights.bin"}}',
     "the entry 'model.norm.weight': 'weights.bin' is not a .safetensors"),
])
def test_bad_index(sharded, index, message):
    path, _ = sharded
    f = write_index(path, index)
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: {message}")):
        load(path)


def test_index_naming_a_missing_shard(sharded):
    path, index = sharded
    (path / "b.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"b.safetensors: listed in model.safetensors.index.json .* but missing"):
        load(path)


def test_shard_missing_a_tensor_the_index_names(sharded):
    path, index = sharded
    name = next(n for n, f in index["weight_map"].items() if f == "b.safetensors")
    index["weight_map"][name] = "a.safetensors"  # the tensor is in b, the index says a
    write_index(path, index)
    with pytest.raises(CheckpointError, match=re.escape(f"{path / 'a.safetensors'}: has no tensor {name!r}, which "
                                                        "model.safetensors.index.json says it holds")):
        load(path)


def test_shard_with_a_tensor_of_the_wrong_shape(sharded):
    from safetensors.torch import load_file, save_file

    path, index = sharded
    shard = path / index["weight_map"]["model.layers.0.mlp.down_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: tensor 'model.layers.0.mlp.down_proj.weight' "
                                                        "has shape (64, 100), expected (64, 128)")):
        load(path)


def test_truncated_shard(sharded):
    path, _ = sharded
    shard = path / "b.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: not a readable safetensors file: truncated")):
        load(path)


# loading safety: an index cannot make the loader read files outside the checkpoint directory


def _move_shard_out(path: Path, index: dict, entry_for, outside: Path) -> Path:
    outside.mkdir(parents=True, exist_ok=True)
    shutil.move(path / "b.safetensors", outside / "model.safetensors")
    index["weight_map"] = {n: (entry_for if f == "b.safetensors" else f) for n, f in index["weight_map"].items()}
    return write_index(path, index)


def test_index_entry_climbing_out_of_the_directory(sharded, tmp_path):
    path, index = sharded
    f = _move_shard_out(path, index, "../elsewhere/model.safetensors", tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: the entry ") + r".*'\.\./elsewhere/model\.safetensors'"
                                              r" names a file outside the checkpoint directory"):
        load(path)


def test_index_entry_with_an_absolute_path(sharded, tmp_path):
    path, index = sharded
    outside = tmp_path / "elsewhere"
    f = _move_shard_out(path, index, str(outside / "model.safetensors"), outside)
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: the entry ") + ".*names a file outside the checkpoint"):
        load(path)


def test_index_entry_that_is_a_symlink_out_of_the_directory(sharded, tmp_path):
    path, index = sharded
    f = _move_shard_out(path, index, "b.safetensors", tmp_path / "elsewhere")
    (path / "b.safetensors").symlink_to(tmp_path / "elsewhere" / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: the entry ") + ".*'b.safetensors' is a symlink to "
                                              ".*outside the checkpoint directory"):
        load(path)


def test_symlinks_inside_the_directory_and_hub_snapshots_load(sharded, tmp_path):
    path, index = sharded
    (path / "shards").mkdir()
    shutil.move(path / "b.safetensors", path / "shards" / "b.safetensors")
    (path / "b.safetensors").symlink_to(path / "shards" / "b.safetensors")
    cfg = ModelConfig.from_dir(path)
    load_weights(path, cfg, torch.float32, torch.device("cpu"))
    # the Hugging Face hub cache: snapshots/<revision>/<file> are symlinks to ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(p for p in sorted(path.rglob("*")) if p.is_file() and not p.is_symlink()):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    load_weights(snapshot, cfg, torch.float32, torch.device("cpu"))
