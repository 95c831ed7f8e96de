"""Rotary position tables: cos in the first half of each row, sin in the second (NeoX / rotate_half layout)."""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies, computed in fp32 the way transformers does, with its scaling types."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / float(s["factor"])
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def cos_sin_table(cfg: ModelConfig, max_positions: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_positions, head_dim] fp32: row p = cat(cos(p * inv_freq), sin(p * inv_freq))."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_frequencies(cfg)[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
