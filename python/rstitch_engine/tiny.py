"""Tiny random checkpoints (HF layout: config.json, model.safetensors, tokenizer) for smoke runs, docs and tests.

The tokenizer is a byte-level BPE trained on a few built-in sentences, with the ChatML specials and chat
template of Qwen2.5, so chat prompts and stop tokens behave like the real thing at a tiny size.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("qwen2", "llama", "qwen3")
EOS, PAD, IM_START = "<|im_end|>", "<|endoftext|>", "<|im_start|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = """The quick brown fox jumps over the lazy dog. A small model writes most tokens; a large model
steps in where the small one is unsure. Tom has 3 apples and buys 12 more, so he has 15 apples.
What is 7 times 8? The answer is 56. Let us think step by step. First, add the numbers. Then divide.
The final answer is \\boxed{42}. Reasoning models think before they answer, and that costs time.
Hello world! How are you today? I am fine, thank you. 0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( )"""


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE fast tokenizer with the ChatML specials (ids 0..2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE)


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, head_dim: int | None = None, intermediate: int = 128,
                tied: bool = False, max_position: int = 1024, rope_theta: float = 10000.0,
                eos_token_id: int = 2, pad_token_id: int = 0, init_std: float = 0.02):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}[arch]
    extra = {"head_dim": head_dim or hidden // heads}
    return cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, intermediate_size=intermediate, tie_word_embeddings=tied,
               max_position_embeddings=max_position, rope_theta=rope_theta, rms_norm_eps=1e-6,
               eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=pad_token_id,
               initializer_range=init_std, **extra)


def make_tiny(path: str | Path, arch: str = "qwen2", *, seed: int = 0, vocab_pad: int = 0,
              vocab_size: int | None = None, dtype: torch.dtype = torch.float32, init_std: float = 0.02,
              **config_kw) -> Path:
    """Writes a random checkpoint of `arch` to `path`. `vocab_pad` widens the logits beyond the tokenizer
    (as Qwen2.5-7B pads 151665 tokens to 152064). `init_std` above the HF default makes the next-token
    distributions peakier, so tiny models show a spread of entropies. `vocab_size` writes a model of that
    many tokens and no tokenizer (token-id prompts only)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer() if vocab_size is None else None
    cfg = tiny_config(arch, (vocab_size or len(tokenizer)) + vocab_pad, init_std=init_std, **config_kw)
    cfg.architectures = [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                          "qwen3": "Qwen3ForCausalLM"}[arch]]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms; randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        gen = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        (path / "generation_config.json").write_text(json.dumps(gen))
    return path
