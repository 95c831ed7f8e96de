"""Loads HF safetensors checkpoints (single file or sharded index) into the engine's packed layout.

Every way a checkpoint can be broken gives one CheckpointError naming the file (and the tensor or index
entry) and what is wrong: a truncated, empty or corrupt safetensors file, a bad or unsafe index, a shard
missing a tensor, a tensor of the wrong shape or of a non-floating dtype. All tensors the config implies are
checked from the files' headers before any weight is read.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open

from .config import CheckpointError, ModelConfig
from .models.decoder import LayerWeights, ModelWeights

INDEX_NAME = "model.safetensors.index.json"
# Tensors a checkpoint may carry that the engine derives itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_SHOWN = 5  # problems named in one error; the count says how many there are


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of the checkpoint in `path`: the shards its index names, else model.safetensors."""
    files = sorted(set(shard_map(path).values())) if (path / INDEX_NAME).is_file() else None
    if files is not None:
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only safetensors checkpoints are loaded (pickle files are never read); "
                              "convert with transformers' save_pretrained(safe_serialization=True)")
    raise CheckpointError(f"{path}: no model.safetensors or {INDEX_NAME}")


def shard_map(path: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the checkpoint's model.safetensors.index.json. Every shard must be a
    safetensors file inside the checkpoint directory: an index entry that is absolute, climbs out with '..'
    or is a symlink leading out of the directory is refused, so an index cannot make the loader read files
    elsewhere on the machine."""
    index = path / INDEX_NAME
    try:
        raw = json.loads(index.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (not valid JSON: {e})") from None
    except OSError as e:
        raise CheckpointError(f"{index}: cannot be read ({e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a safetensors index (it needs a non-empty \"weight_map\" object of "
                              "tensor name -> shard file)")
    root = _allowed_root(path)
    shards: dict[str, Path] = {}
    for name, entry in weight_map.items():
        if entry not in shards:
            shards[entry] = _shard_path(path, root, index, name, entry)
    return {name: shards[entry] for name, entry in weight_map.items()}


def _allowed_root(path: Path) -> Path:
    """The directory the shards must resolve into: the checkpoint directory, or for a Hugging Face hub cache
    snapshot (snapshots/<revision>/, whose files are symlinks into ../../blobs/) the cached repo."""
    path = path.resolve()
    if path.parent.name == "snapshots" and (path.parent.parent / "blobs").is_dir():
        return path.parent.parent
    return path


def _shard_path(path: Path, root: Path, index: Path, name, entry) -> Path:
    where = f"{index}: the entry {name!r}: {entry!r}"
    if not isinstance(entry, str) or not entry:
        raise CheckpointError(f"{where} is not a shard file name")
    rel = PurePosixPath(entry.replace("\\", "/"))
    if rel.is_absolute() or Path(entry).is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{where} names a file outside the checkpoint directory; shards must be files "
                              "in the checkpoint directory")
    if not entry.endswith(".safetensors"):
        raise CheckpointError(f"{where} is not a .safetensors file (only safetensors shards are loaded)")
    shard = path / Path(*rel.parts)
    if not shard.is_file():
        raise CheckpointError(f"{shard}: listed in {index.name} (for {name!r}) but missing")
    if not shard.resolve().is_relative_to(root):
        raise CheckpointError(f"{where} is a symlink to {shard.resolve()}, outside the checkpoint directory; "
                              "shards must be files in the checkpoint directory")
    return shard


class _Reader:
    """Reads named tensors from the checkpoint's files, checking shapes, converting dtype and device."""

    def __init__(self, root: Path, dtype: torch.dtype, device: torch.device):
        self.root, self.dtype, self.device = root, dtype, device
        index_map = shard_map(root) if (root / INDEX_NAME).is_file() else None
        files = sorted(set(index_map.values())) if index_map else checkpoint_files(root)
        self.handles = {f: _open(f) for f in files}
        held = {f: set(h.keys()) for f, h in self.handles.items()}
        self.where: dict[str, Path] = {}
        for f, names in held.items():
            for name in names:
                self.where.setdefault(name, f)
        if index_map:  # the index is the authority on where a tensor is; it must be there
            for name, f in index_map.items():
                if name not in held[f]:
                    raise CheckpointError(f"{f}: has no tensor {name!r}, which {INDEX_NAME} says it holds")
                self.where[name] = f
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.where

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every tensor in `expected` exists with that shape and a floating dtype (from the headers only)."""
        missing = [n for n in expected if n not in self.where]
        if missing:
            raise CheckpointError(f"{self.root}: {len(missing)} tensor(s) the config implies are missing: "
                                  f"{_names(missing)}" if len(missing) > 1 else
                                  f"{self.root}: tensor {missing[0]!r} is missing")
        for name, shape in expected.items():
            f = self.where[name]
            try:
                info = self.handles[f].get_slice(name)
                found, dtype = tuple(info.get_shape()), info.get_dtype()
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: tensor {name!r} cannot be read ({e})") from None
            if found != shape:
                raise CheckpointError(f"{f}: tensor {name!r} has shape {found}, expected {shape}")
            if dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{f}: tensor {name!r} has dtype {dtype}; weights must be floating point "
                                      f"({', '.join(sorted(_FLOAT_DTYPES))}) to be cast to {self.dtype}")

    def get(self, name: str, shape: tuple[int, ...], rows: slice | None = None,
            cols: slice | None = None) -> torch.Tensor:
        """The tensor `name` (of `shape`), or only its `rows` / `cols` (a tensor-parallel shard): read from the
        file without the rest."""
        self.check({name: shape})
        f = self.where[name]
        try:
            # NOTE: a handle per tensor: closing it unmaps the file, so converting a bf16 checkpoint to fp32
            # never holds the whole file's pages resident beside the converted weights (peak RSS).
            with safe_open(str(f), framework="pt") as handle:
                if rows is None and cols is None:
                    t = handle.get_tensor(name)
                else:
                    part = handle.get_slice(name)
                    t = part[rows] if cols is None else part[:, cols]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: tensor {name!r} cannot be read (corrupt file? {e})") from None
        self.used.add(name)
        return t.to(device=self.device, dtype=self.dtype)

    def unused(self) -> list[str]:
        return [n for n in self.where if n not in self.used and not n.endswith(_IGNORED_SUFFIXES)]


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt")
    except SafetensorError as e:
        size = f.stat().st_size
        what = "empty" if size == 0 else "truncated or corrupt"
        raise CheckpointError(f"{f}: not a readable safetensors file: {what} ({size:,} bytes; {e}); "
                              "re-download or re-save the checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"{f}: cannot be read ({e})") from None


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN
                                                           else "")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a checkpoint of `cfg` must carry (lm_head.weight unless tied)."""
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out.update({a + "q_proj.weight": (cfg.q_size, H), a + "k_proj.weight": (cfg.kv_size, H),
                    a + "v_proj.weight": (cfg.kv_size, H), a + "o_proj.weight": (H, cfg.q_size),
                    p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                    p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                    p + "mlp.down_proj.weight": (H, I)})
        if cfg.qkv_bias:
            out.update({a + "q_proj.bias": (cfg.q_size,), a + "k_proj.bias": (cfg.kv_size,),
                        a + "v_proj.bias": (cfg.kv_size,)})
        if cfg.qk_norm:
            out.update({a + "q_norm.weight": (D,), a + "k_norm.weight": (D,)})
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, H)
    return out


def load_weights(path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 shard: tuple[int, int] = (0, 1)) -> ModelWeights:
    """The checkpoint's weights in the engine's packed layout; with `shard=(rank, size)`, only what that
    tensor-parallel rank holds (ModelConfig.shard): its query and KV heads of q/k/v, its columns of o_proj,
    its rows of gate/up and columns of down; norms, embedding and LM head whole."""
    path = Path(path)
    r = _Reader(path, dtype, device)
    if not cfg.tie_word_embeddings and not r.has("lm_head.weight"):
        raise CheckpointError(f"{path}: lm_head.weight is missing and the config does not tie it to the embedding")
    r.check(expected_tensors(cfg))  # every problem of shape or presence before any weight is read
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    rank, size = shard
    mine = cfg.shard(size)
    q = slice(rank * mine.q_size, (rank + 1) * mine.q_size)
    kv_start = rank * cfg.num_kv_heads // size * D  # fewer KV heads than ranks: the one its query heads read
    kv = slice(kv_start, kv_start + mine.kv_size)
    mlp = slice(rank * mine.intermediate_size, (rank + 1) * mine.intermediate_size)
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        qkv = torch.cat([r.get(a + "q_proj.weight", (cfg.q_size, H), rows=q),
                         r.get(a + "k_proj.weight", (cfg.kv_size, H), rows=kv),
                         r.get(a + "v_proj.weight", (cfg.kv_size, H), rows=kv)])
        bias = None
        if cfg.qkv_bias:
            bias = torch.cat([r.get(a + "q_proj.bias", (cfg.q_size,), rows=q),
                              r.get(a + "k_proj.bias", (cfg.kv_size,), rows=kv),
                              r.get(a + "v_proj.bias", (cfg.kv_size,), rows=kv)])
        layers.append(LayerWeights(
            input_norm=r.get(p + "input_layernorm.weight", (H,)),
            qkv=qkv,
            qkv_bias=bias,
            q_norm=r.get(a + "q_norm.weight", (D,)) if cfg.qk_norm else None,
            k_norm=r.get(a + "k_norm.weight", (D,)) if cfg.qk_norm else None,
            o_proj=r.get(a + "o_proj.weight", (H, cfg.q_size), cols=q),
            post_norm=r.get(p + "post_attention_layernorm.weight", (H,)),
            gate_up=torch.cat([r.get(p + "mlp.gate_proj.weight", (I, H), rows=mlp),
                               r.get(p + "mlp.up_proj.weight", (I, H), rows=mlp)]),
            down=r.get(p + "mlp.down_proj.weight", (H, I), cols=mlp),
        ))
    embed = r.get("model.embed_tokens.weight", (cfg.vocab_size, H))
    lm_head = embed if cfg.tie_word_embeddings else r.get("lm_head.weight", (cfg.vocab_size, H))
    weights = ModelWeights(embed=embed, layers=layers, norm=r.get("model.norm.weight", (H,)), lm_head=lm_head)
    extra = [n for n in r.unused() if not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if extra:
        raise CheckpointError(f"{path}: unexpected tensors for {cfg.architecture}: {', '.join(extra[:5])}"
                              + (" ..." if len(extra) > 5 else ""))
    return weights
