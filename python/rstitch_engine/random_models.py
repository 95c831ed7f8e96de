"""Random-weight models with the shapes of real ones, made on the device (no checkpoint on disk), for
benchmarks: `Engine(slm="random:1.5b", llm="random:7b")`. Shapes: docs/benchmarks.md, 'Random-weight shapes'."""
from __future__ import annotations

import torch

from .config import ModelConfig
from .models.decoder import LayerWeights, ModelWeights

_QWEN2 = dict(architecture="Qwen2ForCausalLM", rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
              max_position_embeddings=32768, tie_word_embeddings=False, qkv_bias=True, qk_norm=False)
SHAPES = {
    # DeepSeek-R1-Distill-Qwen-1.5B: 3.55 GB in bf16
    "1.5b": ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                        num_kv_heads=2, head_dim=128, **_QWEN2),
    # DeepSeek-R1-Distill-Qwen-7B: 15.23 GB in bf16
    "7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                      num_kv_heads=4, head_dim=128, **_QWEN2),
    # for smoke runs on the CPU
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, **_QWEN2),
    "small": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4,
                         num_kv_heads=1, head_dim=32, **_QWEN2),
}


def random_config(source: str) -> ModelConfig:
    name = source.removeprefix("random:")
    if name not in SHAPES:
        raise ValueError(f"unknown random shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def random_weights(cfg: ModelConfig, dtype: torch.dtype, device, seed: int = 0) -> ModelWeights:
    """N(0, 0.02) matrices, unit norms: activations stay in range, distributions are near uniform (route
    with policies.Forced to benchmark realistic switching)."""
    g = torch.Generator(device=device).manual_seed(seed)
    H, I = cfg.hidden_size, cfg.intermediate_size

    def matrix(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    def ones(n):
        return torch.ones(n, device=device, dtype=dtype)

    qkv = cfg.q_size + 2 * cfg.kv_size
    layers = [LayerWeights(input_norm=ones(H), qkv=matrix(qkv, H), qkv_bias=matrix(qkv) if cfg.qkv_bias else None,
                           q_norm=ones(cfg.head_dim) if cfg.qk_norm else None,
                           k_norm=ones(cfg.head_dim) if cfg.qk_norm else None, o_proj=matrix(H, cfg.q_size),
                           post_norm=ones(H), gate_up=matrix(2 * I, H), down=matrix(H, I))
              for _ in range(cfg.num_layers)]
    embed = matrix(cfg.vocab_size, H)
    return ModelWeights(embed=embed, layers=layers, norm=ones(H),
                        lm_head=embed if cfg.tie_word_embeddings else matrix(cfg.vocab_size, H))


def streamed_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Weight bytes one decode step streams: every layer and the output head once; of the embedding
    only the rows looked up (negligible). 3.09 GB for the 1.5B shape in bf16 (docs/benchmarks.md, 'Roofline')."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_layer = (cfg.q_size + 2 * cfg.kv_size) * (H + cfg.qkv_bias) + H * cfg.q_size + 3 * H * I + 2 * H
    return (L * per_layer + cfg.vocab_size * H + H) * dtype.itemsize
