"""GGUF import: a tiny random checkpoint is written as a GGUF the way llama.cpp's converter writes one, imported
back, and must give the source's logits, token ids and chat template."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rstitch_engine.gguf_import import GGUFImportError, import_gguf  # noqa: E402
from rstitch_engine.tiny import make_tiny  # noqa: E402

# Texts on which the tiny tokenizer's GPT-2 pre-tokenizer and the Qwen2 one transformers rebuilds from a
# GGUF agree (they split digits and punctuation-before-newline differently).
TEXTS = ["Hello world! How are you today?", "The quick brown fox jumps over the lazy dog.",
         "Let us think step by step, then answer."]
MESSAGES = [{"role": "user", "content": "What is the answer?"}]

# How 2-D weights are stored; 1-D norms and biases stay F32, as llama.cpp keeps them.
WEIGHT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "q8_0": gguf.GGMLQuantizationType.Q8_0}
# Largest logit error allowed, relative to the largest source logit, per storage type.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2}


def write_gguf(checkpoint: Path, gguf_path: Path, weights: str = "f32") -> Path:
    """Writes the HF checkpoint at `checkpoint` as llama.cpp's convert_hf_to_gguf.py does: its metadata keys,
    tensor names, llama's q/k row permutation and a gpt2-style BPE tokenizer with the chat template."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    arch, layers = cfg["model_type"], cfg["num_hidden_layers"]
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    writer = gguf.GGUFWriter(gguf_path, arch)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_block_count(layers)
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    _add_tokenizer(writer, checkpoint)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    for hf_name, tensor in load_file(checkpoint / "model.safetensors").items():
        data = tensor.float().numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _llama_cpp_permute(data, heads if "q_proj" in hf_name else kv_heads)
        _add_tensor(writer, names.get_name(hf_name, try_suffixes=(".weight", ".bias")), data, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_path


def _add_tokenizer(writer, checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    # as convert_hf_to_gguf.py does: added tokens flagged special (transformers 5.24's all_special_tokens
    # lists only the named ones: eos, pad)
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.pad_token_id)  # Qwen2.5's GGUFs name <|endoftext|> as bos, unused
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rope layout for llama q/k rows (its converter's `permute`); transformers undoes it on load."""
    halves = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def _add_tensor(writer, name: str, data: np.ndarray, weights: str) -> None:
    kind = WEIGHT_TYPES[weights] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
    if kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    elif kind == gguf.GGMLQuantizationType.Q8_0:
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    else:
        writer.add_tensor(name, data)


def _logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch,weights", [("qwen2", "f32"), ("qwen2", "f16"), ("qwen2", "q8_0"),
                                          ("llama", "f32"), ("qwen3", "f32")])
def test_import_gives_source_logits(tmp_path, arch, weights):
    source = make_tiny(tmp_path / "source", arch)
    imported = import_gguf(write_gguf(source, tmp_path / "tiny.gguf", weights), tmp_path / "imported",
                           dtype=torch.float32, progress=False)
    expected, got = _logits(source), _logits(imported)
    assert got.shape == expected.shape
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error <= TOLERANCE[weights], f"{arch}/{weights}: relative logit error {error:.2e}"


def test_tokenizer_and_chat_template_survive(tmp_path):
    source = make_tiny(tmp_path / "source", "qwen2")
    imported = import_gguf(write_gguf(source, tmp_path / "tiny.gguf"), tmp_path / "imported", progress=False)
    want, got = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(imported)
    for text in TEXTS:
        ids = want(text).input_ids
        assert got(text).input_ids == ids
        assert got.decode(ids) == text
    assert got.chat_template == want.chat_template
    prompt = want.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert got.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == prompt
    assert got(prompt).input_ids == want(prompt).input_ids
    assert (got.eos_token, got.pad_token) == (want.eos_token, want.pad_token)
    generation = json.loads((imported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == want.eos_token_id


def test_default_import_is_bf16_with_untied_head(tmp_path):
    source = make_tiny(tmp_path / "source", "qwen2")
    imported = import_gguf(write_gguf(source, tmp_path / "tiny.gguf"), tmp_path / "imported", progress=False)
    weights = load_file(imported / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert "lm_head.weight" in weights
    assert json.loads((imported / "config.json").read_text())["tie_word_embeddings"] is False


def test_missing_file(tmp_path):
    with pytest.raises(GGUFImportError, match="no such GGUF file"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out", progress=False)


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(GGUFImportError, match="not a GGUF file"):
        import_gguf(fake, tmp_path / "out", progress=False)


def test_truncated_gguf(tmp_path):
    whole = write_gguf(make_tiny(tmp_path / "source", "qwen2"), tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(GGUFImportError, match="corrupt or truncated"):
        import_gguf(cut, tmp_path / "out", progress=False)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFImportError, match=r"gpt2\.gguf: unsupported architecture 'gpt2'"):
        import_gguf(path, tmp_path / "out", progress=False)


def test_engine_takes_a_gguf_file(tmp_path, monkeypatch):
    """Engine(llm=<file>.gguf) imports once into the cache and generates what the source checkpoint does."""
    from rstitch_engine import Engine, SamplingParams

    monkeypatch.setenv("RSTITCH_CACHE", str(tmp_path / "cache"))
    source = make_tiny(tmp_path / "src", "qwen2", init_std=0.3)
    gguf_file = write_gguf(source, tmp_path / "tiny.gguf")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = Engine(llm=source, device="cpu", kv_cache_gb=0.01).generate(["The answer is"], params, use_tqdm=False)
    got = Engine(llm=gguf_file, device="cpu", kv_cache_gb=0.01).generate(["The answer is"], params, use_tqdm=False)
    assert got[0].token_ids == want[0].token_ids and got[0].text == want[0].text
