"""The checkout's own names never shadow an installed module.

`python -m ...` / `python -c` put the working directory first on sys.path, `python bench/x.py` puts bench/,
and pytest puts each test directory there. A directory or script named like a dependency's module then
replaces it: transformers 5.25 requires Hugging Face's `kernels`, whose import picked up this repository's
old `kernels/` directory (and bench/kernels.py) and failed inside `import transformers`.
"""
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEARCHED_FIRST = [ROOT, ROOT / "bench", ROOT / "tests", ROOT / "tests" / "kernels"]


def _module_names(directory: Path) -> set[str]:
    """Scripts and regular packages; a directory without __init__.py is a namespace portion, which loses to
    a regular package found later on sys.path, so it shadows nothing."""
    return {p.stem if p.suffix == ".py" else p.name for p in directory.iterdir()
            if not p.name.startswith((".", "_")) and (p.suffix == ".py" or (p / "__init__.py").is_file())}


def test_no_checkout_name_shadows_an_installed_or_standard_module():
    installed = importlib.metadata.packages_distributions()
    taken = set(installed) | set(sys.stdlib_module_names)
    clashes = {f"{d.relative_to(ROOT)}/{name}": sorted(installed.get(name, ["stdlib"]))
               for d in SEARCHED_FIRST for name in _module_names(d) & taken}
    assert not clashes, f"rename these, they shadow installed modules: {clashes}"


def test_the_clash_check_sees_a_planted_clash(tmp_path):
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("")
    (tmp_path / "yaml").mkdir()  # a namespace portion: shadows nothing
    (tmp_path / "json.py").write_text("")
    (tmp_path / "fine.py").write_text("")
    taken = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    assert _module_names(tmp_path) & taken == {"numpy", "json"}
