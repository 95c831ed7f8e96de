"""Evaluation results: per-policy summary, markdown/JSON files with run metadata, and the accuracy-latency plot."""
from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

SUMMARY_COLUMNS = ("policy", "n", "accuracy", "mean_latency_s", "p50_latency_s", "p90_latency_s", "tok_s",
                   "output_tok_s", "mean_tokens", "llm_share", "switches_per_1k", "mean_llm_run", "mean_slm_run",
                   "mean_llm_wait_s", "est_latency_s", "latency_speedup_vs_llm", "output_tok_s_vs_llm",
                   "est_latency_speedup_vs_llm")


def summarize_policies(records: list[dict]) -> list[dict]:
    """One row per policy (in order of first appearance) from per-(policy, problem) records.

    `tok_s` is total tokens over total latency and `llm_share` is weighted by tokens, so long answers count
    for what they cost; `output_tok_s` is total tokens over the wall time of the batches (what a batch user
    gets; None for records without `batch_wall_s`); `latency_speedup_vs_llm` is the `llm` policy's mean
    latency over this one's, `output_tok_s_vs_llm` this one's output tok/s over the `llm` policy's (None
    without an `llm` policy). With `est_latency_s` in the records (estimated batch-1 latency), `est_latency_s`
    is its mean and `est_latency_speedup_vs_llm` the same ratio on it."""
    by_policy: dict[str, list[dict]] = {}
    for record in records:
        by_policy.setdefault(record["policy"], []).append(record)
    rows = []
    for policy, recs in by_policy.items():
        latency = np.array([r["latency_s"] for r in recs], dtype=float)
        tokens = np.array([r["tokens"] for r in recs], dtype=float)
        llm_tokens = float(np.dot(tokens, [r["llm_share"] for r in recs]))
        rows.append({
            "policy": policy,
            "n": len(recs),
            "accuracy": sum(bool(r["correct"]) for r in recs) / len(recs),
            "mean_latency_s": float(latency.mean()),
            "p50_latency_s": float(np.percentile(latency, 50)),
            "p90_latency_s": float(np.percentile(latency, 90)),
            "tok_s": float(tokens.sum() / latency.sum()) if latency.sum() > 0 else None,
            "output_tok_s": _output_tok_s(recs),
            "mean_tokens": float(tokens.mean()),
            "llm_share": llm_tokens / tokens.sum() if tokens.sum() > 0 else 0.0,
            "switches_per_1k": (1000 * sum(r.get("switches", 0) for r in recs) / tokens.sum()
                                if tokens.sum() > 0 else 0.0),
            "mean_llm_run": _mean_run(recs, "llm"),
            "mean_slm_run": _mean_run(recs, "slm"),
            "mean_llm_wait_s": float(np.mean([r.get("llm_wait_s", 0.0) for r in recs])),
            "est_latency_s": (float(np.mean([r["est_latency_s"] for r in recs]))
                              if all("est_latency_s" in r for r in recs) else None),
        })
    llm = next((row for row in rows if row["policy"] == "llm"), None)
    for row in rows:
        row["latency_speedup_vs_llm"] = _ratio(llm, row, "mean_latency_s")
        row["output_tok_s_vs_llm"] = _ratio(row, llm, "output_tok_s")
        row["est_latency_speedup_vs_llm"] = _ratio(llm, row, "est_latency_s")
    return rows


def _output_tok_s(records: list[dict]) -> float | None:
    """Tokens over the wall time of the batches they came from (`batch`: the index of each record's batch)."""
    if not records or any("batch_wall_s" not in r for r in records):
        return None
    wall = sum({r["batch"]: r["batch_wall_s"] for r in records}.values())
    return sum(r["tokens"] for r in records) / wall if wall > 0 else None


def _mean_run(records: list[dict], model: str) -> float | None:
    """Mean length of `model`'s runs of consecutive tokens over every record (None: no run, or records
    written before runs were recorded)."""
    runs = [n for r in records for n in r.get("runs", {}).get(model, [])]
    return float(np.mean(runs)) if runs else None


def _ratio(numerator: dict | None, denominator: dict | None, key: str) -> float | None:
    """One row's value of `key` over another's (None when either is missing)."""
    if numerator is None or denominator is None or not numerator[key] or not denominator[key]:
        return None
    return numerator[key] / denominator[key]


def _format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns, title: str | None = None) -> str:
    """A GitHub markdown table of `columns` (keys of `rows`); missing values and None show as '-'."""
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" if c == "policy" else "---:" for c in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _device_name() -> str:
    if "torch" in sys.modules:  # the engine has loaded it; report the accelerator it may be running on
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def collect_meta() -> dict:
    """Where and how a result was produced: device, package versions, UTC date and the command line."""
    return {
        "device": _device_name(),
        "versions": {"python": platform.python_version(),
                     **{name: _package_version(name) for name in ("rstitch-engine", "torch", "transformers")}},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(arg) for arg in sys.argv),
    }


def write_results(out_dir: str | Path, name: str, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    """Writes `<name>.json` ({"meta", "rows"}) and `<name>.md` (a table of every scalar row key) into `out_dir`.
    `meta` is added to (and overrides) `collect_meta()`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**collect_meta(), **meta}
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    columns = list(dict.fromkeys(key for row in rows for key, value in row.items()
                                 if not isinstance(value, (dict, list))))  # nested detail: in the JSON only
    header = [f"- {key}: {json.dumps(value) if isinstance(value, dict) else value}" for key, value in meta.items()]
    md_path.write_text(markdown_table(rows, columns, title=name) + "\n" + "\n".join(header) + "\n",
                       encoding="utf-8")
    return json_path, md_path


def _tau(policy: str) -> float | None:
    """The threshold of an `rstitch:<tau>` policy name, else None."""
    kind, _, arg = policy.partition(":")
    try:
        return float(arg) if kind == "rstitch" else None
    except ValueError:
        return None


def plotted_latency(rows: list[dict]) -> str:
    """The latency column pareto_plot draws: the estimated batch-1 one where every row has it (a batched eval
    measures the batch's latency, not a lone request's), else the measured mean."""
    return "est_latency_s" if all(row.get("est_latency_s") is not None for row in rows) else "mean_latency_s"


def pareto_plot(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Accuracy (%) against latency (s): the `rstitch:<tau>` rows as a curve labelled with tau, and the
    `llm`, `slm`, `spec:<k>` and `rstitch+` rows as distinct markers; the latency is `plotted_latency`'s.
    Needs matplotlib (Agg, no display)."""
    try:  # imported here so the package works without matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("pareto_plot needs matplotlib: pip install 'rstitch-engine[plot]'") from e
    if not rows:
        raise ValueError("pareto_plot: no summary rows to plot")

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(fig)  # a private Agg canvas: no pyplot state, no display needed
    ax = fig.add_subplot()
    key = plotted_latency(rows)
    sweep = sorted((row for row in rows if _tau(row["policy"]) is not None), key=lambda row: _tau(row["policy"]))
    if sweep:
        ax.plot([row[key] for row in sweep], [100 * row["accuracy"] for row in sweep], "o-",
                color="tab:blue", label="R-Stitch (τ sweep)")
        for row in sweep:
            ax.annotate(f"τ={_tau(row['policy']):g}", (row[key], 100 * row["accuracy"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8, color="tab:blue")
    styles = {"llm": ("*", "tab:red", 14), "slm": ("s", "tab:green", 8), "spec": ("^", "tab:purple", 9),
              "rstitch+": ("P", "tab:orange", 10)}
    for row in (row for row in rows if _tau(row["policy"]) is None):
        kind, _, arg = row["policy"].partition(":")
        marker, color, size = styles.get(kind, ("D", "tab:gray", 7))
        label = {"llm": "LLM only", "slm": "SLM only", "spec": f"speculative (k={arg})",
                 "rstitch+": f"R-Stitch+ (τ={arg})"}.get(kind, row["policy"])
        ax.plot(row[key], 100 * row["accuracy"], marker, color=color, markersize=size, linestyle="none",
                label=label)
    ax.set_xlabel("estimated batch-1 latency per problem (s)" if key == "est_latency_s"
                  else "mean latency per problem (s)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
