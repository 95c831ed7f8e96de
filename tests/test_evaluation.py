"""`rstitch eval` pieces that do not need the engine: problems, answer scoring, reports, views and the runner
(against a fake engine with the documented `chat` API)."""
from __future__ import annotations

import html
import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from rstitch_engine import policies
from rstitch_engine.policies import parse_policies

from rstitch_engine.evaluation import (PROMPT_SUFFIX, SUMMARY_COLUMNS, answers_equal, build_messages,
                                       extract_answer, generate_problems, load_problems, markdown_table, pareto_plot,
                                       plotted_latency, render_html, render_terminal, run_eval, summarize_policies,
                                       synthetic_problems, token_pieces, write_results)
from rstitch_engine.evaluation.synthetic import LEVELS, OPS
from rstitch_engine.tiny import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# --- answers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"first \boxed{7}, no wait: \boxed{8}", "8"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{x^{2} + \sqrt{4}}", r"x^{2} + \sqrt{4}"),
    (r"\boxed{3} then an unfinished \boxed{4", "3"),
    (r"\boxed { 12 }", "12"),
    ("Tom has 3 apples and buys 12 more, so 15.", "15"),
    ("The total is 1,234 apples", "1234"),
    ("It is 1,234,567.5 in all", "1234567.5"),
    ("It costs $12.", "12"),
    ("It costs 3.50 dollars", "3.50"),
    ("a rise of 12%", "12"),
    ("x = -5", "-5"),
    ("10-5=5", "5"),
    (r"that is \dfrac{3}{4}", r"\dfrac{3}{4}"),
    ("each eats 3/4 of a pizza", "3/4"),
    ("on 1/2/2020", "2020"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, gold", [
    ("12", "12"), ("12.0", "12"), ("12.00", "12"), (r"\frac{24}{2}", "12"), (r"\dfrac{24}{2}", "12.0"),
    ("$1,234", "1234"), (r"\$12", "12"), ("12\\%", "12"), ("-5", "-5.0"), (r"-\frac{1}{2}", "-0.5"),
    ("3/4", "0.75"), (r"1{,}000", "1000"), (r"12 \text{}", "12"), ("12.", "12"), ("Yes", " yes "),
])
def test_answers_equal(pred, gold):
    assert answers_equal(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    (None, "12"), ("13", "12"), ("12.5", "12"), ("-12", "12"), ("1/0", "1"), ("twelve", "12"), ("", "12"),
])
def test_answers_differ(pred, gold):
    assert not answers_equal(pred, gold)


def test_build_messages_asks_for_a_boxed_answer():
    messages = build_messages("  What is 2 + 3?\n")
    assert messages == [{"role": "user", "content": f"What is 2 + 3?\n{PROMPT_SUFFIX}"}]
    assert "\\boxed{}" in PROMPT_SUFFIX


# --- synthetic problems ----------------------------------------------------------------------------------

@pytest.mark.parametrize("level, steps, largest", [("basic", (2, 4), 1000), ("hard", (4, 7), 100_000)])
def test_synthetic_arithmetic_checks_out(level, steps, largest):
    for problem in generate_problems(200, seed=3, level=level):
        given = [int(n) for n in re.findall(r"\d+", problem.question)]
        results = set()
        assert steps[0] <= len(problem.steps) <= steps[1]
        for step in problem.steps:
            for operand in (step.left, step.right):  # every operand is stated or worked out before
                assert operand in given or operand in results, (problem.question, step)
            assert OPS[step.op](step.left, step.right) == step.result
            if step.op == "/":
                assert step.left == step.result * step.right  # exact division
            assert 0 <= step.result < largest
            results.add(step.result)
        assert problem.answer == problem.steps[-1].result
        assert problem.as_dict() == {"question": problem.question, "answer": str(problem.answer)}
        if level == "hard":  # a distractor: a stated number that no step uses
            used = {operand for step in problem.steps for operand in (step.left, step.right)}
            assert set(given) - used, problem.question
            assert max(given) >= 10, problem.question  # two-digit numbers at least


def test_synthetic_is_deterministic_and_ignores_global_rng():
    random.seed(0)
    first = synthetic_problems(20, seed=7)
    after = random.random()
    random.seed(0)
    random.random()  # a different global state must not change the problems
    assert synthetic_problems(20, seed=7) == first
    random.seed(0)
    synthetic_problems(20, seed=7)
    assert random.random() == after  # and generating does not consume the global RNG
    assert synthetic_problems(20, seed=8) != first
    assert synthetic_problems(5, seed=7) == first[:5]
    assert synthetic_problems(0, seed=7) == []
    with pytest.raises(ValueError, match="n must be"):
        synthetic_problems(-1, seed=0)


@pytest.mark.parametrize("level", LEVELS)
def test_synthetic_uses_every_template(level):
    templates = LEVELS[level]
    problems = generate_problems(len(templates), seed=0, level=level)
    assert {p.template for p in problems} == set(templates)
    assert len({p.question for p in generate_problems(100, seed=0, level=level)}) > 90


def test_synthetic_levels_differ_and_unknown_level_is_named():
    assert synthetic_problems(8, seed=0, level="hard") != synthetic_problems(8, seed=0)
    assert synthetic_problems(8, seed=0, level="basic") == synthetic_problems(8, seed=0)
    with pytest.raises(ValueError, match="level must be one of basic, hard, got 'expert'"):
        synthetic_problems(1, seed=0, level="expert")


def test_load_problems(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"question": "What is 1 + 1?", "answer": 2}\n\n{"question": "Half of 8?", "answer": "4"}\n')
    assert load_problems(path) == [{"question": "What is 1 + 1?", "answer": "2"},
                                   {"question": "Half of 8?", "answer": "4"}]


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "answer": 1}\n{"question": "q", "answer": \n', r"problems.jsonl:2: not valid JSON"),
    ('[1, 2]\n', r":1: expected a JSON object, got list"),
    ('{"answer": "1"}\n', r":1: 'question' must be"),
    ('{"question": "q", "answer": ""}\n', r":1: 'answer' must be"),
    ('{"question": "q", "answer": true}\n', r":1: 'answer' must be"),
    ('\n\n', r"no problems"),
])
def test_load_problems_names_the_bad_line(tmp_path, content, message):
    path = tmp_path / "problems.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_problems(path)


# --- report ----------------------------------------------------------------------------------------------

def _rec(policy, correct, tokens, llm_share, latency_s, switches=0, runs=None):
    return {"policy": policy, "question": "q", "gold": "1", "answer": "1" if correct else "2", "correct": correct,
            "tokens": tokens, "llm_share": llm_share, "latency_s": latency_s, "tok_s": tokens / latency_s,
            "switches": switches, "runs": runs or {}}


RECORDS = [
    _rec("llm", True, 100, 1.0, 2.0), _rec("llm", False, 300, 1.0, 4.0),
    _rec("rstitch:0.02", True, 100, 0.5, 1.0, 4, {"llm": [20, 30], "slm": [50]}),
    _rec("rstitch:0.02", True, 300, 0.1, 2.0, 2, {"llm": [30], "slm": [100, 170]}),
    _rec("slm", False, 200, 0.0, 0.5), _rec("slm", False, 200, 0.0, 0.5),
    _rec("spec:4", True, 100, 1.0, 1.0), _rec("spec:4", False, 300, 1.0, 2.0),
    _rec("rstitch:0.05", True, 200, 0.2, 1.0), _rec("rstitch:0.05", False, 200, 0.2, 1.0),
]


def test_summarize_policies():
    rows = {row["policy"]: row for row in summarize_policies(RECORDS)}
    assert list(rows) == ["llm", "rstitch:0.02", "slm", "spec:4", "rstitch:0.05"]
    assert all(list(row) == list(SUMMARY_COLUMNS) for row in rows.values())
    llm, stitch = rows["llm"], rows["rstitch:0.02"]
    assert llm == pytest.approx({"policy": "llm", "n": 2, "accuracy": 0.5, "mean_latency_s": 3.0,
                                 "p50_latency_s": 3.0, "p90_latency_s": 3.8, "tok_s": 400 / 6,
                                 "mean_tokens": 200.0, "llm_share": 1.0, "switches_per_1k": 0.0,
                                 "mean_llm_run": None, "mean_slm_run": None, "latency_speedup_vs_llm": 1.0,
                                 "est_latency_s": None, "est_latency_speedup_vs_llm": None, "output_tok_s": None,
                                 "output_tok_s_vs_llm": None, "mean_llm_wait_s": 0.0})
    assert stitch["accuracy"] == 1.0
    assert stitch["switches_per_1k"] == pytest.approx(1000 * 6 / 400)
    assert (stitch["mean_llm_run"], stitch["mean_slm_run"]) == pytest.approx((80 / 3, 320 / 3))
    assert stitch["llm_share"] == pytest.approx(0.2)  # (0.5*100 + 0.1*300) / 400, not the plain mean 0.3
    assert stitch["tok_s"] == pytest.approx(400 / 3)
    assert stitch["latency_speedup_vs_llm"] == pytest.approx(2.0)
    assert rows["slm"]["latency_speedup_vs_llm"] == pytest.approx(6.0)
    assert all(row["latency_speedup_vs_llm"] is None for row in summarize_policies(RECORDS[2:]))


def test_summarize_policies_output_tok_s():
    """Output tok/s: tokens over the wall time of the batches they came from (each batch counted once)."""
    walls = {"llm": (10.0, 6.0), "rstitch:0.02": (4.0, 4.0)}  # (batch 0, batch 1) of each policy
    records = [dict(r, batch=i % 2, batch_wall_s=walls[r["policy"]][i % 2], llm_wait_s=0.5 * i)
               for r in RECORDS[:4] for i in [RECORDS.index(r)]]
    records += [dict(records[0], batch=0), dict(records[2], batch=1)]  # a second answer in a batch: same wall
    rows = {row["policy"]: row for row in summarize_policies(records)}
    assert rows["llm"]["output_tok_s"] == pytest.approx(500 / 16)
    assert rows["rstitch:0.02"]["output_tok_s"] == pytest.approx(500 / 8)
    assert rows["rstitch:0.02"]["output_tok_s_vs_llm"] == pytest.approx(2.0)
    assert rows["rstitch:0.02"]["mean_llm_wait_s"] == pytest.approx((1.0 + 1.5 + 1.0) / 3)


def test_summarize_policies_estimated_latency():
    records = [dict(r, est_latency_s=2.0 if r["policy"] == "llm" else 0.5) for r in RECORDS]
    rows = {row["policy"]: row for row in summarize_policies(records)}
    assert rows["llm"]["est_latency_s"] == 2.0 and rows["slm"]["est_latency_speedup_vs_llm"] == pytest.approx(4.0)


def test_markdown_table():
    rows = [{"policy": "llm", "accuracy": 0.83333, "tok_s": 12345.6, "latency_speedup_vs_llm": None, "n": 3},
            {"policy": "a|b", "accuracy": 1.0, "tok_s": 99.5, "latency_speedup_vs_llm": 2.0, "n": 3}]
    table = markdown_table(rows, ["policy", "n", "accuracy", "tok_s", "latency_speedup_vs_llm"], title="Results")
    assert table.splitlines() == [
        "### Results", "",
        "| policy | n | accuracy | tok_s | latency_speedup_vs_llm |",
        "|---|---:|---:|---:|---:|",
        "| llm | 3 | 0.8333 | 12346 | - |",
        "| a\\|b | 3 | 1 | 99.5 | 2 |",
    ]
    assert not markdown_table(rows, ["policy"]).startswith("#")


def test_write_results(tmp_path):
    rows = summarize_policies(RECORDS)
    json_path, md_path = write_results(tmp_path / "out", "summary", rows, {"models": "tiny", "date": "today"})
    saved = json.loads(json_path.read_text())
    assert saved["rows"] == rows
    assert {"device", "versions", "date", "command", "models"} <= set(saved["meta"])
    assert saved["meta"]["date"] == "today"  # caller's meta wins
    assert saved["meta"]["versions"]["python"]
    md = md_path.read_text()
    assert "| policy | n | accuracy |" in md and "| rstitch:0.02 |" in md and "- models: tiny" in md


def test_pareto_plot(tmp_path):
    path = pareto_plot(summarize_policies(RECORDS), tmp_path / "plots" / "pareto.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    with pytest.raises(ValueError, match="no summary rows"):
        pareto_plot([], tmp_path / "empty.png")


def test_pareto_plot_draws_estimated_batch1_latency_when_every_row_has_it(tmp_path):
    rows = summarize_policies(RECORDS)
    assert plotted_latency(rows) == "mean_latency_s"
    rows = [dict(row, est_latency_s=row["mean_latency_s"] * 0.5) for row in rows]
    assert plotted_latency(rows) == "est_latency_s"
    rows.append(dict(rows[1], policy="rstitch+:0.02@router"))
    assert plotted_latency(rows) == "est_latency_s"
    assert plotted_latency(rows + [dict(rows[0], est_latency_s=None)]) == "mean_latency_s"
    assert pareto_plot(rows, tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")


def test_pareto_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install"):
        pareto_plot(summarize_policies(RECORDS), tmp_path / "pareto.png")


def test_package_imports_without_matplotlib():
    code = "import sys; sys.modules['matplotlib'] = None; import rstitch_engine.evaluation"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- view ------------------------------------------------------------------------------------------------

PIECES = [("Let ", 0, 0.01), ("us ", 0, 0.2), ("<script>", 1, 0.5), ("alert(1)\nok", 1, 0.3), (" done", 0, 0.0)]


def test_render_terminal():
    assert render_terminal(PIECES, color=False) == "Let us [[<script>alert(1)\nok]] done"
    colored = render_terminal(PIECES, color=True)
    assert colored == ("Let us \x1b[1;30;43m<script>alert(1)\x1b[0m\n\x1b[1;30;43mok\x1b[0m done")
    assert render_terminal([("a", 1, 0.0), ("", 0, 0.0), ("b", 1, 0.0)], color=False) == "[[ab]]"


def test_render_html_escapes_and_marks_tokens():
    page = render_html(PIECES, "Q <1> & more", {"policy": "rstitch:0.02", "answer": "<b>5</b>"})
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<title>Q &lt;1&gt; &amp; more</title>" in page
    assert "&lt;b&gt;5&lt;/b&gt;" in page
    assert page.count('class="llm" title="LLM, entropy') == 2
    assert 'title="SLM, entropy 0.200"' in page
    tints = re.findall(r'rgba\(66, 133, 244, ([\d.]+)\)" title="SLM', page)
    assert tints == ["0.090", "0.660", "0.060"]  # darker as entropy grows, relative to the answer's highest
    assert "legend" in page and "<table>" in page and page.startswith("<!DOCTYPE html>")


def test_token_pieces_keeps_multibyte_characters_whole(tokenizer):
    text = "café ☃ The answer is 12"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the characters really are split over tokens
    sources = [i % 2 for i in range(len(ids))]
    entropies = [0.1 * i for i in range(len(ids))]
    pieces = token_pieces(tokenizer, ids, sources, entropies)
    assert "".join(p[0] for p in pieces) == text
    assert not any("\ufffd" in p[0] for p in pieces)
    assert [p[1:] for p in pieces] == [(s, pytest.approx(e)) for s, e in zip(sources, entropies)]
    completing = [i for i, p in enumerate(pieces) if p[0] in ("é", "☃")]
    assert len(completing) == 2 and all(pieces[i - 1][0] == "" for i in completing)


def test_token_pieces_edge_cases(tokenizer):
    cut = tokenizer.encode("ok ☃")[:-1]  # the answer stopped inside a character
    pieces = token_pieces(tokenizer, cut, [0] * len(cut), [0.0] * len(cut))
    assert "".join(p[0] for p in pieces) == tokenizer.decode(cut)
    with_eos = tokenizer.encode("12") + [tokenizer.eos_token_id]
    assert "".join(p[0] for p in token_pieces(tokenizer, with_eos, [0] * 3, [0.0] * 3)) == "12"
    with pytest.raises(ValueError, match="differ in length"):
        token_pieces(tokenizer, [1, 2], [0], [0.0, 0.0])


# --- runner ----------------------------------------------------------------------------------------------

def test_parse_policies():
    assert [p.name for p in parse_policies("llm, slm,spec:4,rstitch:0.02,rstitch:0.05,handover:0.1")] == [
        "llm", "slm", "spec:4", "rstitch:0.02", "rstitch:0.05", "rstitch:0.1/h1"]
    assert parse_policies("spec:4")[0] == policies.SpecDecode(k=4)


def test_parse_rstitch_plus_names_each_router_file(tmp_path):
    from rstitch_engine.router.model import Router

    for name in ("router-init", "router"):
        Router(hidden_size=8).save(tmp_path / f"{name}.safetensors")
    init, trained = parse_policies(f"rstitch+:0.05@{tmp_path}/router-init.safetensors,"
                                   f"rstitch+:@{tmp_path}/router.safetensors")
    assert (init.name, trained.name) == ("rstitch+:0.05@router-init", f"rstitch+:{policies.RStitchPlus.tau:g}@router")
    assert (init.tau, init.router) == (0.05, f"{tmp_path}/router-init.safetensors")
    with pytest.raises(ValueError, match="router file '.*missing.safetensors' not found"):
        parse_policies(f"rstitch+:0.02@{tmp_path}/missing.safetensors")


@pytest.mark.parametrize("text, message", [
    ("rstitch+:0.02", "needs a router file"), ("rstitch+:0.02@", "needs a router file"),
    ("", "empty entry"), ("llm,,slm", "empty entry"), ("llm,llm", "repeats llm"), ("big", "unknown policy"),
    ("llm:2", "unknown policy"), ("spec:0", r"k must be an integer in \[1, 2\*\*31 - 1\]"), ("spec:x", "bad policy"), ("spec:1.5", "bad policy"),
    ("rstitch:abc", "bad policy"), ("rstitch:nan", "tau must be a number"),
])
def test_parse_policies_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_policies(text)


@dataclass
class FakePolicy:
    correct: bool
    llm_every: int  # every k-th token comes from the LLM; 0: none
    seconds_per_token: float


@dataclass
class FakeOutput:
    text: str
    token_ids: list
    sources: list
    entropies: list
    finish_reason: str
    stats: dict = field(default_factory=dict)
    prompt_token_ids: list = field(default_factory=lambda: [1, 2, 3])


class FakeEngine:
    """Answers from a question -> gold table, right or wrong as the policy says, with made-up timings."""

    def __init__(self, tokenizer, problems):
        self.tokenizer = tokenizer
        self.gold = {build_messages(p["question"])[0]["content"]: p["answer"] for p in problems}
        self.calls = []
        self.resets = []

    def reset_prefix_cache(self):
        self.resets.append(len(self.calls))
        return True

    def chat(self, conversations, params, *, policy, use_tqdm):
        self.calls.append((len(conversations), params, policy, use_tqdm))
        outs = []
        for messages in conversations:
            gold = int(self.gold[messages[0]["content"]])
            text = f"Café: 7 times 8, so \\boxed{{{gold if policy.correct else gold + 1}}}"
            ids = self.tokenizer.encode(text)
            sources = [int(policy.llm_every > 0 and i % policy.llm_every == 0) for i in range(len(ids))]
            latency = policy.seconds_per_token * len(ids)
            outs.append(FakeOutput(text, ids, sources, [0.05] * len(ids), "stop",
                                   {"slm_tokens": sources.count(0), "llm_tokens": sum(sources),
                                    "latency_s": latency}))
        return outs


def test_run_eval_end_to_end(tokenizer, tmp_path):
    problems = synthetic_problems(5, seed=1)
    engine = FakeEngine(tokenizer, problems)
    policies = [("llm", FakePolicy(True, 1, 0.02)), ("slm", FakePolicy(False, 0, 0.005)),
                ("rstitch:0.02", FakePolicy(True, 3, 0.01))]
    result = run_eval(engine, problems, policies, "PARAMS", out_dir=tmp_path / "run", batch_size=2,
                      meta={"models": "fake"}, progress=False)

    assert [(n, p, use_tqdm) for n, p, _, use_tqdm in engine.calls] == [(2, "PARAMS", False), (2, "PARAMS", False),
                                                                         (1, "PARAMS", False)] * 3
    assert engine.resets == [0, 3, 6], "every policy starts with an empty prefix cache"
    run = tmp_path / "run"
    assert sorted(f.name for f in run.iterdir()) == ["pareto.png", "records.jsonl", "summary.json", "summary.md",
                                                     "view-rstitch_0.02.html"]
    lines = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert len(lines) == 15 and lines == result["records"]
    first = lines[0]
    assert {"policy", "question", "gold", "answer", "correct", "tokens", "llm_share", "latency_s",
            "text"} <= set(first)
    assert first["answer"] == first["gold"] == problems[0]["answer"] and first["correct"]
    assert first["tok_s"] == pytest.approx(50.0) and first["llm_share"] == 1.0
    assert not any(r["correct"] for r in lines if r["policy"] == "slm")

    rows = {row["policy"]: row for row in json.loads((run / "summary.json").read_text())["rows"]}
    assert rows["llm"]["accuracy"] == 1.0 and rows["slm"]["accuracy"] == 0.0
    assert rows["rstitch:0.02"]["latency_speedup_vs_llm"] == pytest.approx(2.0)
    assert 0.3 < rows["rstitch:0.02"]["llm_share"] < 0.4
    view = (run / "view-rstitch_0.02.html").read_text()
    answer = re.search(r'<div class="answer">(.*?)</div>', view, re.S).group(1)
    assert html.unescape("".join(re.findall(r"<span [^>]*>(.*?)</span>", answer))) == lines[10]["text"]
    assert problems[0]["question"] in view
    assert result["files"]["views"] == [run / "view-rstitch_0.02.html"]


def test_run_eval_rejects_bad_input(tokenizer, tmp_path):
    problems = synthetic_problems(2, seed=1)
    engine = FakeEngine(tokenizer, problems)
    policy = [("llm", FakePolicy(True, 1, 0.01))]
    with pytest.raises(ValueError, match="no problems"):
        run_eval(engine, [], policy, None, out_dir=tmp_path)
    with pytest.raises(ValueError, match="no policies"):
        run_eval(engine, problems, [], None, out_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        run_eval(engine, problems, policy, None, out_dir=tmp_path, batch_size=0)


def test_run_eval_without_matplotlib_keeps_the_numbers(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    problems = synthetic_problems(2, seed=1)
    with pytest.warns(UserWarning, match="no pareto.png"):
        result = run_eval(FakeEngine(tokenizer, problems), problems, [("llm", FakePolicy(True, 1, 0.01))], None,
                          out_dir=tmp_path, progress=False)
    assert "pareto" not in result["files"] and (tmp_path / "summary.json").exists()
