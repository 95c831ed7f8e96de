"""Loads HF safetensors checkpoints (single file or sharded index) into the engine's packed layout."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CheckpointError, ModelConfig
from .models.decoder import LayerWeights, ModelWeights

# Tensors a checkpoint may carry that the engine derives itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only safetensors checkpoints are loaded (pickle files are never read); "
                              "convert with transformers' save_pretrained(safe_serialization=True)")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


class _Reader:
    """Reads named tensors from the checkpoint's files, checking shapes, converting dtype and device."""

    def __init__(self, root: Path, files: list[Path], dtype: torch.dtype, device: torch.device):
        self.root, self.dtype, self.device = root, dtype, device
        self.where: dict[str, Path] = {}
        self.handles = {f: safe_open(str(f), framework="pt") for f in files}
        for f, h in self.handles.items():
            for name in h.keys():
                self.where[name] = f
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"{self.root}: tensor {name!r} is missing")
        f = self.where[name]
        t = self.handles[f].get_tensor(name)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        self.used.add(name)
        return t.to(device=self.device, dtype=self.dtype)

    def unused(self) -> list[str]:
        return [n for n in self.where if n not in self.used and not n.endswith(_IGNORED_SUFFIXES)]


def load_weights(path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    path = Path(path)
    r = _Reader(path, checkpoint_files(path), dtype, device)
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        qkv = torch.cat([r.get(a + "q_proj.weight", (cfg.q_size, H)), r.get(a + "k_proj.weight", (cfg.kv_size, H)),
                         r.get(a + "v_proj.weight", (cfg.kv_size, H))])
        bias = None
        if cfg.qkv_bias:
            bias = torch.cat([r.get(a + "q_proj.bias", (cfg.q_size,)), r.get(a + "k_proj.bias", (cfg.kv_size,)),
                              r.get(a + "v_proj.bias", (cfg.kv_size,))])
        layers.append(LayerWeights(
            input_norm=r.get(p + "input_layernorm.weight", (H,)),
            qkv=qkv,
            qkv_bias=bias,
            q_norm=r.get(a + "q_norm.weight", (D,)) if cfg.qk_norm else None,
            k_norm=r.get(a + "k_norm.weight", (D,)) if cfg.qk_norm else None,
            o_proj=r.get(a + "o_proj.weight", (H, cfg.q_size)),
            post_norm=r.get(p + "post_attention_layernorm.weight", (H,)),
            gate_up=torch.cat([r.get(p + "mlp.gate_proj.weight", (I, H)), r.get(p + "mlp.up_proj.weight", (I, H))]),
            down=r.get(p + "mlp.down_proj.weight", (H, I)),
        ))
    embed = r.get("model.embed_tokens.weight", (cfg.vocab_size, H))
    untied = r.has("lm_head.weight") and not cfg.tie_word_embeddings
    if not untied and not cfg.tie_word_embeddings:
        raise CheckpointError(f"{path}: lm_head.weight is missing and the config does not tie it to the embedding")
    lm_head = r.get("lm_head.weight", (cfg.vocab_size, H)) if untied else embed
    weights = ModelWeights(embed=embed, layers=layers, norm=r.get("model.norm.weight", (H,)), lm_head=lm_head)
    extra = [n for n in r.unused() if not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if extra:
        raise CheckpointError(f"{path}: unexpected tensors for {cfg.architecture}: {', '.join(extra[:5])}"
                              + (" ..." if len(extra) > 5 else ""))
    return weights
