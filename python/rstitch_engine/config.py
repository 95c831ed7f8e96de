"""Model configuration read from a HF checkpoint's config.json (transformers 4.x and 5.x layouts)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

# architecture -> (q/k/v projections carry a bias, per-head RMSNorm on q and k)
ARCHITECTURES = {
    "Qwen2ForCausalLM": (True, False),
    "LlamaForCausalLM": (False, False),
    "Qwen3ForCausalLM": (False, True),
}
ROPE_TYPES = ("default", "linear", "llama3")


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

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: not found (a checkpoint directory needs config.json)")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                                  f"supported: {', '.join(ARCHITECTURES)}")
        try:
            hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            qkv_bias, qk_norm = ARCHITECTURES[arch]
            if arch == "LlamaForCausalLM":
                qkv_bias = bool(raw.get("attention_bias", False))
            theta, scaling = _rope(raw, source)
            cfg = cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                eos_token_ids=_ids(raw.get("eos_token_id")),
                dtype=_dtype(raw.get("torch_dtype") or raw.get("dtype")),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
        if raw.get("use_sliding_window"):
            raise CheckpointError(f"{source}: sliding-window attention is not implemented")
        if raw.get("mlp_bias"):
            raise CheckpointError(f"{source}: mlp_bias is not implemented")
        if cfg.num_heads % cfg.num_kv_heads:
            raise CheckpointError(f"{source}: {cfg.num_heads} heads are not a multiple of {cfg.num_kv_heads} kv heads")
        return cfg


def _rope(raw: dict, source: str) -> tuple[float, dict | None]:
    """(theta, scaling or None) from transformers 5's `rope_parameters` or 4.x's `rope_theta`/`rope_scaling`."""
    params = dict(raw.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = dict(raw.get("rope_scaling") or params or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{source}: rope scaling type {kind!r} is not implemented; "
                              f"supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    scaling["rope_type"] = kind
    return theta, scaling


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _dtype(name) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16}.get(str(name).replace("torch.", ""), torch.bfloat16)
