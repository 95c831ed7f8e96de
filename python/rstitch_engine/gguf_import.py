"""Converts a GGUF file (llama.cpp's format) into a Hugging Face checkpoint directory the engine loads.

transformers does the real work (dequantizing every tensor, un-permuting llama's q/k rows, rebuilding the
tokenizer and its chat template from the GGUF metadata); this module validates the input up front so a bad
file gives one clear error, restores the special tokens transformers' conversion drops, and writes the
result as safetensors in the dtype the engine runs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tqdm.auto import tqdm

SUPPORTED_ARCHS = ("qwen2", "llama", "qwen3")  # the architectures the engine implements
GGUF_MAGIC = b"GGUF"
IMPORT_FORMAT = 1  # bump when import_gguf's output changes, so that cached imports are redone


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported; the message names the file and the problem."""


def read_gguf(gguf_path: str | Path):
    """A `gguf.GGUFReader` over `gguf_path` (memory-mapped, so cheap), after checking that the file is a
    well-formed GGUF of an architecture the engine supports."""
    path = Path(gguf_path)
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:  # transformers needs both to load a GGUF
        raise GGUFImportError(f"{path}: importing a GGUF file needs the {' and '.join(missing)} package(s): "
                              "pip install 'rstitch-engine[gguf]'")
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise GGUFImportError(f"{path}: not a GGUF file (it does not start with the magic bytes 'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:  # what GGUFReader raises on a truncated or corrupt file
        raise GGUFImportError(f"{path}: corrupt or truncated GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFImportError(
            f"{path}: unsupported architecture {arch!r}; the engine supports {', '.join(SUPPORTED_ARCHS)}")
    return reader


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                progress: bool = True) -> Path:
    """Writes the model in `gguf_path` to `out_dir` as a Hugging Face checkpoint: config.json, safetensors
    weights in `dtype` (the output head stays untied when the GGUF has its own), the tokenizer with its chat
    template, and a generation_config.json carrying the eos id. Returns `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(gguf_path).resolve()
    out = Path(out_dir)
    reader = read_gguf(path)
    with tqdm(total=4, desc=f"importing {path.name}", unit="stage", disable=not progress) as bar:
        bar.set_postfix_str("reading weights")
        # Dequantize to fp32 first: rounding once, at the final cast, keeps the weights as exact as possible.
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     **_config_overrides(reader))
        bar.update()
        bar.set_postfix_str("reading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        _restore_special_tokens(tokenizer, reader)
        tokenizer.model_max_length = model.config.max_position_embeddings
        bar.update()
        bar.set_postfix_str("writing weights")
        if getattr(model, "hf_quantizer", None) is not None:
            # The weights are plain tensors by now; the leftover GGUF quantization config makes saving fail.
            model.hf_quantizer.remove_quantization_config(model)
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
        model.to(dtype).save_pretrained(out, safe_serialization=True)
        bar.update()
        bar.set_postfix_str("writing tokenizer")
        tokenizer.save_pretrained(out)
        bar.update()
    return out


def _config_overrides(reader) -> dict:
    """Config values transformers does not read from the GGUF: it maps no head size for qwen3 and falls back
    to Qwen3Config's default of 128, which silently loads a model with any other head size wrong."""
    head_dim = _field(reader, "qwen3.attention.key_length")
    return {"head_dim": head_dim} if head_dim is not None else {}


def _restore_special_tokens(tokenizer, reader) -> None:
    """transformers' GGUF tokenizer conversion registers a fixed few specials and takes eos/pad from the
    tokenizer class defaults (Qwen2's eos is <|endoftext|>, the instruct models stop on <|im_end|>). The GGUF
    metadata says which tokens are control or user-defined and which ids are eos and pad: apply it."""
    from gguf import TokenType
    from tokenizers import AddedToken

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or []
    tokenizer.add_tokens([AddedToken(tokens[i], special=kind == TokenType.CONTROL, normalized=False)
                          for i, kind in enumerate(types) if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)])
    for attribute, key in (("eos_token", "tokenizer.ggml.eos_token_id"),
                           ("pad_token", "tokenizer.ggml.padding_token_id")):
        token_id = _field(reader, key)
        if token_id is not None:
            setattr(tokenizer, attribute, tokens[token_id])


def _field(reader, key: str):
    field = reader.get_field(key)
    return field.contents() if field is not None else None
