"""The `rstitch` command line: shared argument helpers without an import cycle, help texts and defaults,
torch's thread choice, the notes on cut outputs, and one-line errors with their exit codes."""
import argparse
import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rstitch_engine
from rstitch_engine import cli_args
from rstitch_engine.cli import build_parser, main
from rstitch_engine.cli_args import HelpFormatter, choose_threads, cut_note

PACKAGE = Path(rstitch_engine.__file__).parent
COMMANDS = ("generate", "bench", "serve", "make-tiny", "demo", "eval", "calibrate", "train-router")
NESTED = ("bench serve",)


@pytest.fixture(autouse=True)
def quiet_threads(monkeypatch):
    """The CLI sets torch's thread count: an idle load average keeps it from warning, and the count is put
    back afterwards for the other tests of the session."""
    monkeypatch.setattr(cli_args, "_load_average", lambda: 0.0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _imports(path: Path) -> set[str]:
    """Modules a file imports, relative ones resolved against the rstitch_engine package."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_cli_and_router_commands_share_helpers_without_a_cycle():
    commands = _imports(PACKAGE / "router" / "commands.py")
    shared = _imports(PACKAGE / "cli_args.py")
    assert "rstitch_engine.cli" not in commands and "rstitch_engine.cli_args" in commands
    assert not {"rstitch_engine.cli", "rstitch_engine.router.commands"} & shared


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    nested = {f"{name} {child}": p for name, command in sub.choices.items() for a in command._actions
              if isinstance(a, argparse._SubParsersAction) for child, p in a.choices.items()}
    assert set(nested) == set(NESTED)
    return {"rstitch": parser, **sub.choices, **nested}


def _shows_default(action: argparse.Action) -> bool:
    return action.default not in (None, False, argparse.SUPPRESS) and bool(action.option_strings)


@pytest.mark.parametrize("command", ("rstitch",) + COMMANDS + NESTED)
def test_every_option_has_help_and_every_default_is_shown(command):
    parser = _commands()[command]
    formatter = HelpFormatter(parser.prog)
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{command}: {action.option_strings or action.dest} has no help"
        if _shows_default(action):
            helptext = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in helptext, f"{command} {action.option_strings}: default not shown"
            if "(default: " + str(action.default) in helptext:
                assert "(default: " + " ".join(str(action.default).split()) in text
    if command != "rstitch":
        assert "(default: " in text


def test_help_documents_model_names_and_policy_grammar(capsys):
    from rstitch_engine.model_source import DEMO_SOURCES
    from rstitch_engine.random_models import SHAPES

    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in list(DEMO_SOURCES) + [f"random:{s}" for s in SHAPES]:
        assert name in text
    assert "(default: demo:slm)" in text and "(default: demo:llm)" in text
    for form in ("llm", "slm", "rstitch[:<tau>]", "handover[:<tau>]", "spec[:<k>]", "spec:<k>@<rate>",
                 "forced:<share>[:<run>]"):
        assert form in text, form
    for policy in ("llm", "slm", "rstitch:0.03", "handover:0.1", "spec:3", "spec:2@0.7", "forced:0.1:8",
                   "forced:0.2"):  # every form the help names parses
        cli_args.chosen_policy(SimpleNamespace(policy=policy, tau=None), None)


# ---- threads ------------------------------------------------------------------------------------------------

def test_threads_follow_the_free_cores():
    assert choose_threads(cores=8, load=0.3, requested=None) == (8, None)
    assert choose_threads(cores=8, load=None, requested=None) == (8, None)
    threads, warning = choose_threads(cores=2, load=1.09, requested=None)
    assert threads == 1 and "--threads" in warning and "1.1" in warning
    assert choose_threads(cores=8, load=3.5, requested=None)[0] == 5
    assert choose_threads(cores=4, load=9.0, requested=None)[0] == 1
    assert choose_threads(cores=0, load=None, requested=None) == (1, None)


def test_requested_threads_win_and_must_be_positive():
    assert choose_threads(cores=2, load=7.0, requested=6) == (6, None)
    with pytest.raises(ValueError, match="--threads"):
        choose_threads(cores=2, load=0.0, requested=0)


def test_threads_are_applied_on_the_cpu_and_the_busy_warning_comes_once(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(cli_args, "_usable_cores", lambda: 4)
    monkeypatch.setattr(cli_args, "_load_average", lambda: 2.5)
    monkeypatch.setattr(cli_args, "_threads_warned", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cli_args.apply_threads(None, "cpu")
    cli_args.apply_threads(None, "cpu")
    assert calls == [2, 2]
    assert capsys.readouterr().err.count("--threads") == 1
    cli_args.apply_threads(None, "cuda")  # the GPU's speed does not hang on CPU threads
    cli_args.apply_threads(3, "cuda")  # asked for: applied
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cli_args.apply_threads(None, "cpu")  # the user's OMP_NUM_THREADS decides
    assert calls == [2, 2, 3]


# ---- cut outputs --------------------------------------------------------------------------------------------

def test_cut_note_names_the_limit_that_cut():
    out = SimpleNamespace(finish_reason="length", token_ids=[1] * 128)
    assert "--max-tokens" in cut_note(out, 128, 4096) and "128 tokens" in cut_note(out, 128, 4096)
    short = SimpleNamespace(finish_reason="length", token_ids=[1] * 10)
    assert "--max-model-len" in cut_note(short, 128, 16) and "16 tokens" in cut_note(short, 128, 16)
    assert cut_note(SimpleNamespace(finish_reason="stop", token_ids=[1] * 128), 128, 4096) is None


def test_generate_says_when_max_tokens_cut_the_output(pair, capsys):
    main(["generate", "--slm", str(pair[0]), "--llm", str(pair[1]), "--max-tokens", "3", "--no-color", "Hello"])
    assert "output cut at 3 tokens, the --max-tokens limit" in capsys.readouterr().err


def test_demo_says_when_max_tokens_cut_the_answers(pair, capsys):
    main(["demo", "--slm", str(pair[0]), "--llm", str(pair[1]), "--tau", "0.72", "--max-tokens", "3",
          "--no-color"])
    assert capsys.readouterr().err.count("output cut at 3 tokens") == 2


# ---- errors and exit codes ----------------------------------------------------------------------------------

LONG_PROMPT = "every word of this prompt is one more token " * 4


def test_generate_exits_1_when_every_prompt_failed(pair, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--slm", str(pair[0]), "--llm", str(pair[1]), "--max-model-len", "16", LONG_PROMPT])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the prompt has ")


def test_generate_succeeds_when_some_prompts_did(pair, capsys):
    main(["generate", "--slm", str(pair[0]), "--llm", str(pair[1]), "--max-model-len", "16", "--no-color", "Hi",
          LONG_PROMPT])
    err = capsys.readouterr().err
    assert "error: prompt 2: the prompt has " in err and "error: prompt 1" not in err


def _failing_generate(exc):
    def generate(self, *args, **kwargs):
        raise exc

    return generate


def test_an_unexpected_error_is_one_line_and_debug_shows_it(pair, monkeypatch, capsys):
    monkeypatch.setattr(rstitch_engine.Engine, "generate", _failing_generate(RuntimeError("device\nfault")))
    argv = ["generate", "--slm", str(pair[0]), "--llm", str(pair[1]), "Hi"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == "error: RuntimeError: device fault (rerun with --debug for the traceback)"
    for debug in (["--debug"] + argv, argv + ["--debug"]):
        with pytest.raises(RuntimeError, match="device"):
            main(debug)


def test_a_user_error_is_one_line(pair, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--slm", str(pair[0]), "--policy", "fast", "Hi"])
    assert e.value.code.startswith("error: unknown policy 'fast'") and "\n" not in e.value.code


def test_ctrl_c_exits_130_without_a_traceback(pair, monkeypatch, capsys):
    monkeypatch.setattr(rstitch_engine.Engine, "generate", _failing_generate(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        main(["generate", "--slm", str(pair[0]), "--llm", str(pair[1]), "Hi"])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_the_process_exits_1_with_one_line_on_stderr():
    run = subprocess.run([sys.executable, "-m", "rstitch_engine", "generate", "--slm", "random:tiny",
                          "--device", "cpu", "--threads", "0", "Hi"], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == ["error: --threads must be at least 1, got 0"]


def test_engine_options_come_from_engine_config(pair, monkeypatch):
    """Every EngineConfig field the command line offers is an option of every engine command, with the
    field's help; given options reach the Engine, others keep EngineConfig's defaults; options a command
    sets itself are not offered there."""
    import dataclasses

    from rstitch_engine.engine_config import EngineConfig

    offered = [f for f in dataclasses.fields(EngineConfig) if f.metadata["cli"] is not None]
    assert {"max_num_seqs", "block_size", "overlap", "gpu_memory_utilization", "max_num_batched_tokens"} <= {
        f.name for f in offered}
    parser = build_parser()
    serve = parser.parse_args(["serve", "--llm", "x"])
    for f in offered:
        assert hasattr(serve, f.name) and getattr(serve, f.name) is None, f.name  # None: EngineConfig decides
    helptext = subprocess.run([sys.executable, "-m", "rstitch_engine", "serve", "--help"], capture_output=True,
                              text=True).stdout
    assert "--no-optimistic-llm" in helptext and "tokens per KV block (default: 16)" in helptext
    calibrate = parser.parse_args(["calibrate", "--llm", "x", "--out", "o.json"])
    assert not hasattr(calibrate, "max_num_seqs")  # the grid's batch sizes set it
    built = []
    monkeypatch.setattr("rstitch_engine.Engine", lambda **kw: built.append(kw))
    args = parser.parse_args(["serve", "--slm", str(pair[0]), "--llm", str(pair[1]), "--device", "cpu",
                              "--block-size", "8", "--max-num-seqs", "3", "--no-optimistic-llm",
                              "--llm-batch-share", "0.5", "--no-prefix-caching"])
    cli_args.make_engine(args)
    assert built[-1] == dict(slm=str(pair[0]), llm=str(pair[1]), device="cpu", block_size=8, max_num_seqs=3,
                             optimistic_llm=False, llm_batch_share=0.5, prefix_caching=False, progress=True)
    EngineConfig(**{k: v for k, v in built[-1].items()})  # a valid config


def test_train_router_options_default_to_dapo_config():
    """`rstitch train-router` reads its DAPO defaults from DapoConfig, the one home train_router also uses."""
    import dataclasses

    from rstitch_engine.router.commands import DAPO_OPTIONS
    from rstitch_engine.router.dapo import DapoConfig

    args = build_parser().parse_args(["train-router", "--latency", "l.json", "--tau", "0.05", "--out", "o",
                                      "--synthetic", "4"])
    settings = {name: getattr(args, name) for name, _, _ in DAPO_OPTIONS}
    assert DapoConfig(**settings) == DapoConfig(tau=0.05)
    assert {f.name for f in dataclasses.fields(DapoConfig)} >= set(settings)
