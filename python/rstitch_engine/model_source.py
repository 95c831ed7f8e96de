"""Turns what a user names as a model into a local Hugging Face checkpoint directory.

A source is a checkpoint directory, a .gguf file (imported once into the cache), "demo:slm" / "demo:llm"
(the offline demo pair) or a Hugging Face hub id. The cache lives in $RSTITCH_CACHE, else
~/.cache/rstitch_engine.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .gguf_import import IMPORT_FORMAT, import_gguf, read_gguf

DEMO_SOURCES = ("demo:slm", "demo:llm")
# What a checkpoint needs from a hub repo: config, tokenizer and generation json, weights, tokenizer models
# and chat templates; never the other weight formats (.bin, .gguf, .onnx) many repos carry as well.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


class ModelSourceError(ValueError):
    """A model source that cannot be turned into a checkpoint directory; the message says why and what to pass."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("RSTITCH_CACHE") or Path.home() / ".cache" / "rstitch_engine")


def resolve_model(source: str | Path, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The checkpoint directory for `source` (config.json, safetensors weights, tokenizer files where the
    source has them). Raises ModelSourceError, or GGUFImportError for a .gguf file that cannot be imported."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if str(source) in DEMO_SOURCES:
        from .demo_pair import demo_model  # the demo pair builds on this module's cache

        return demo_model(str(source).removeprefix("demo:"), cache_dir=cache, progress=progress)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path}: not a model checkpoint directory (it has no config.json)")
        return path
    if path.suffix.lower() == ".gguf":
        return imported_gguf(path, cache_dir=cache, progress=progress)
    if path.exists():
        raise ModelSourceError(f"{path}: not a model directory or a .gguf file")
    if isinstance(source, Path) or str(source).startswith((".", "/", "~")):
        raise ModelSourceError(f"{path}: no such directory")
    return hub_snapshot(str(source))


def imported_gguf(gguf_path: str | Path, *, cache_dir: Path, progress: bool = True) -> Path:
    """The checkpoint imported from `gguf_path` into `cache_dir`, importing it on first use. The cache entry
    is keyed by the file's resolved path, size and modification time, so a replaced file is imported anew."""
    path = Path(gguf_path).resolve()
    read_gguf(path)  # a bad file fails here, with a clear error, before any cache work
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{IMPORT_FORMAT}".encode()).hexdigest()[:16]
    return build_once(cache_dir / "gguf" / f"{path.stem}-{key}",
                      lambda out: import_gguf(path, out, progress=progress))


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, made by `build(empty_dir)` unless it already exists. The build fills a temporary sibling that
    is renamed into place when complete, so an interrupted build never leaves a `target` that looks done."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        build(scratch)
        try:
            scratch.rename(target)
        except OSError:
            if not target.is_dir():
                raise  # else a concurrent build finished first; its result is as good as ours
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def hub_snapshot(repo_id: str) -> Path:
    """The checkpoint files of hub repo `repo_id`, downloaded into (or found in) the Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    instead = "pass a local checkpoint directory or a .gguf file instead"
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        raise ModelSourceError(f"{repo_id!r} is not an existing path, a demo name ({', '.join(DEMO_SOURCES)}) "
                               f"nor a valid Hugging Face hub id; {instead}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelSourceError(f"{repo_id!r}: unknown Hugging Face hub id (or a private/gated repo needing a "
                               f"token); {instead}") from None
    except OSError as e:  # offline mode, no connection or a hub error, and no copy in the local HF cache
        raise ModelSourceError(f"{repo_id!r}: the Hugging Face hub is not reachable and the model is not in the "
                               f"local Hugging Face cache ({type(e).__name__}); {instead}") from None
    if not (snapshot / "config.json").is_file() or not any(snapshot.glob("*.safetensors")):
        raise ModelSourceError(f"{repo_id!r}: the hub repo has no config.json and safetensors weights (a GGUF-only "
                               "repo?); download its .gguf file and pass that path instead")
    return snapshot
