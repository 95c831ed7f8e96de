"""Model configuration read from a HF checkpoint's config.json (transformers 4.x and 5.x layouts).

Every field the engine reads is checked for its type and range here, so that a bad config.json fails with
one error naming the file and the field, not deep inside the loader, the tokenizer or the kernels.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checks

# architecture -> (q/k/v projections carry a bias, per-head RMSNorm on q and k)
ARCHITECTURES = {
    "Qwen2ForCausalLM": (True, False),
    "LlamaForCausalLM": (False, False),
    "Qwen3ForCausalLM": (False, True),
}
ROPE_TYPES = ("default", "linear", "llama3")
# a checkpoint's config.json dtype ("torch_dtype" / "dtype") -> the dtype its weights are taken to have
CHECKPOINT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                     "float64": torch.float32, "auto": torch.bfloat16}
_REQUIRED = object()


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the problem."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    dtype: torch.dtype = torch.bfloat16

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.kv_size * dtype.itemsize

    def shard(self, size: int) -> "ModelConfig":
        """The shapes one of `size` tensor-parallel ranks holds: its share of the attention heads and of the
        MLP's intermediate width; KV heads split too, or, when there are fewer than ranks, each rank keeps
        the one its query heads read (replicated). Raises ValueError naming what does not divide."""
        if size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
        for name, value in (("attention heads", self.num_heads), ("intermediate_size", self.intermediate_size)):
            if value % size:
                raise ValueError(f"tensor_parallel_size {size} does not divide the model's {value} {name}")
        if self.num_kv_heads % size and size % self.num_kv_heads:
            raise ValueError(f"tensor_parallel_size {size} neither divides the model's {self.num_kv_heads} KV heads "
                             f"nor is a multiple of them")
        return dataclasses.replace(self, num_heads=self.num_heads // size,
                                   num_kv_heads=max(1, self.num_kv_heads // size),
                                   intermediate_size=self.intermediate_size // size)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: not found (a checkpoint directory needs config.json)")
        try:
            raw = json.loads(file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{file}: not valid JSON (not UTF-8 text: {e})") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{file}: cannot be read ({e})") from None
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        """The config in `raw` (a parsed config.json). Raises CheckpointError naming `source` and the field
        for a missing field, a value of the wrong type or out of range, or a feature the engine lacks."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: the top level must be a JSON object of config fields, "
                                  f"not a {_json_type(raw)}")
        v = _Fields(raw, source)
        archs = raw.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise CheckpointError(f"{source}: architectures must be a list of model class names, not {archs!r}")
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                                  f"supported: {', '.join(ARCHITECTURES)}")
        hidden, heads = v.integer("hidden_size"), v.integer("num_attention_heads")
        vocab, layers = v.integer("vocab_size"), v.integer("num_hidden_layers")
        intermediate = v.integer("intermediate_size")
        kv_heads = v.integer("num_key_value_heads", default=heads)
        if kv_heads > heads or heads % kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of "
                                  f"num_key_value_heads {kv_heads}")
        if raw.get("head_dim") is None and hidden % heads:
            raise CheckpointError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads "
                                  f"{heads} and there is no head_dim field giving the head size")
        head_dim = v.integer("head_dim", default=hidden // heads)
        if head_dim % 2:
            raise CheckpointError(f"{source}: head_dim {head_dim} is odd; rotary embeddings need an even head size")
        qkv_bias, qk_norm = ARCHITECTURES[arch]
        if arch == "LlamaForCausalLM":
            qkv_bias = v.flag("attention_bias", default=False)
        if v.text("hidden_act", default="silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
        if v.flag("use_sliding_window", default=False):
            raise CheckpointError(f"{source}: sliding-window attention is not implemented")
        if v.flag("mlp_bias", default=False):
            raise CheckpointError(f"{source}: mlp_bias is not implemented")
        _check_layer_types(raw.get("layer_types"), layers, source)
        max_positions = v.integer("max_position_embeddings", default=4096)
        theta, scaling = _rope(raw, source)
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=v.number("rms_norm_eps", default=1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=v.flag("tie_word_embeddings", default=False),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            eos_token_ids=_ids(raw.get("eos_token_id"), vocab, source),
            dtype=_dtype(raw, source),
        )


class _Fields:
    """Typed reads of config fields; a field that is absent or null takes `default` (else it is missing)."""

    def __init__(self, raw: dict, source: str, prefix: str = ""):
        self.raw, self.source, self.prefix = raw, source, prefix

    def _read(self, key: str, default, check, *args, **kw):
        value = self.raw.get(key)
        if value is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.source}: missing field {self.prefix + key!r}")
            return default
        try:
            return check(self.prefix + key, value, *args, **kw)
        except checks.InvalidValue as e:  # the file's own words: JSON types
            raise CheckpointError(f"{self.source}: {e} ({_json_type(value)})") from None

    def integer(self, key: str, default=_REQUIRED) -> int:
        return self._read(key, default, checks.integer, 1, 2**63 - 1)

    def number(self, key: str, default=_REQUIRED) -> float:
        return self._read(key, default, checks.number, 0, low_open=True, high_open=True)

    def flag(self, key: str, default=_REQUIRED) -> bool:
        return self._read(key, default, checks.flag)

    def text(self, key: str, default=_REQUIRED) -> str:
        return self._read(key, default, checks.text)


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_layer_types(layer_types, num_layers: int, source: str) -> None:
    """transformers 5 lists each layer's attention type; the engine implements full attention only."""
    if layer_types is None:
        return
    if not isinstance(layer_types, list):
        raise CheckpointError(f"{source}: layer_types must be a list of attention types, one per layer, "
                              f"not {layer_types!r}")
    if len(layer_types) != num_layers:
        raise CheckpointError(f"{source}: layer_types lists {len(layer_types)} layers but num_hidden_layers is "
                              f"{num_layers}")
    for i, kind in enumerate(layer_types):
        if kind != "full_attention":
            raise CheckpointError(f"{source}: layer_types[{i}] is {kind!r}; only 'full_attention' layers are "
                                  "implemented")


def _rope(raw: dict, source: str) -> tuple[float, dict | None]:
    """(theta, scaling or None) from transformers 5's `rope_parameters` or 4.x's `rope_theta`/`rope_scaling`."""
    for key in ("rope_parameters", "rope_scaling"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise CheckpointError(f"{source}: {key} must be an object or null, not {raw[key]!r}")
    params = dict(raw.get("rope_parameters") or {})
    if params and "rope_type" not in params and "type" not in params and any(isinstance(p, dict)
                                                                            for p in params.values()):
        raise CheckpointError(f"{source}: rope_parameters given per layer type ({', '.join(params)}) are not "
                              "supported; the engine implements one rotary embedding for all layers")
    theta = _Fields(params, source, "rope_parameters.").number(
        "rope_theta", default=_Fields(raw, source).number("rope_theta", default=10000.0))
    params.pop("rope_theta", None)
    where = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    scaling = dict(raw.get("rope_scaling") or params or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{source}: rope scaling type {kind!r} ({where}) is not implemented; "
                              f"supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    f = _Fields(scaling, source, where + ".")
    scaling["factor"] = f.number("factor")
    if kind == "llama3":
        scaling["low_freq_factor"] = f.number("low_freq_factor")
        scaling["high_freq_factor"] = f.number("high_freq_factor")
        scaling["original_max_position_embeddings"] = f.integer("original_max_position_embeddings")
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise CheckpointError(f"{source}: {where}.high_freq_factor {scaling['high_freq_factor']} must be "
                                  f"greater than low_freq_factor {scaling['low_freq_factor']}")
    scaling["rope_type"] = kind
    return theta, scaling


def _ids(value, vocab_size: int, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise CheckpointError(f"{source}: eos_token_id must be a token id (an integer in 0..{vocab_size - 1}) "
                                  f"or a list of them, not {value!r}")
    return tuple(ids)


def _dtype(raw: dict, source: str) -> torch.dtype:
    key = "torch_dtype" if raw.get("torch_dtype") is not None else "dtype"
    name = raw.get(key)
    if name is None:
        return torch.bfloat16
    if not isinstance(name, str) or name.removeprefix("torch.") not in CHECKPOINT_DTYPES:
        raise CheckpointError(f"{source}: {key} must be one of {', '.join(CHECKPOINT_DTYPES)}, not {name!r}")
    return CHECKPOINT_DTYPES[name.removeprefix("torch.")]
