"""`rstitch eval`: word problems, answer scoring, the policy sweep runner, result tables, plots and views."""
from .answers import PROMPT_SUFFIX, answers_equal, build_messages, extract_answer
from .report import (SUMMARY_COLUMNS, collect_meta, markdown_table, pareto_plot, plotted_latency,
                     summarize_policies, write_results)
from .runner import run_eval
from .synthetic import SyntheticProblem, generate_problems, load_problems, synthetic_problems
from .view import render_html, render_terminal, token_pieces

__all__ = [
    "PROMPT_SUFFIX", "SUMMARY_COLUMNS", "SyntheticProblem", "answers_equal", "build_messages", "collect_meta",
    "extract_answer", "generate_problems", "load_problems", "markdown_table", "pareto_plot", "plotted_latency",
    "render_html", "render_terminal", "run_eval", "summarize_policies", "synthetic_problems", "token_pieces",
    "write_results",
]
