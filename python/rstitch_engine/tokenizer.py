"""Tokenizer loading (through transformers) and the pair check: both models must share one vocabulary."""
from __future__ import annotations

from pathlib import Path

from .config import CheckpointError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, or None when the directory has no tokenizer files (token-id prompts
    still work then)."""
    path = Path(path)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types; name the directory and the cause
        raise CheckpointError(f"{path}: the tokenizer files could not be loaded ({type(e).__name__}: {e})") from e


def check_same_vocabulary(slm_tok, llm_tok, slm_path, llm_path) -> None:
    a, b = slm_tok.get_vocab(), llm_tok.get_vocab()
    if a == b:
        return
    diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
    raise ValueError(f"the SLM ({slm_path}) and LLM ({llm_path}) tokenizers differ: {len(a)} vs {len(b)} "
                     f"tokens, e.g. {diff}; R-Stitch needs one shared vocabulary")
