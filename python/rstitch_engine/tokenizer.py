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
    except Exception as e:  # transformers raises many types; name the file and the cause
        config_problem = _config_problem(path)
        if config_problem is not None:  # transformers reads config.json too: blame the file at fault
            raise CheckpointError(f"{path / 'config.json'}: transformers rejects it, so the tokenizer cannot be "
                                  f"loaded ({config_problem})") from e
        raise CheckpointError(f"{path}: the tokenizer files could not be loaded ({type(e).__name__}: {e})") from e


def _config_problem(path: Path) -> str | None:
    """Why transformers cannot read the checkpoint's config.json, or None when it can (or there is none)."""
    if not (path / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_same_vocabulary(slm_tok, llm_tok, slm_path, llm_path) -> None:
    a, b = slm_tok.get_vocab(), llm_tok.get_vocab()
    if a == b:
        return
    diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
    raise ValueError(f"the SLM ({slm_path}) and LLM ({llm_path}) tokenizers differ: {len(a)} vs {len(b)} "
                     f"tokens, e.g. {diff}; R-Stitch needs one shared vocabulary")
