"""`rstitch eval`: run every problem under each decoding policy, score the answers and write the results.

Files written to `out_dir`: records.jsonl (one line per policy and problem), summary.json / summary.md,
pareto.png (accuracy against latency) and view-<policy>.html (one answer per R-Stitch policy, token by token).
"""
from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from ..switching import run_lengths
from .answers import answers_equal, build_messages, extract_answer
from .report import pareto_plot, summarize_policies, write_results
from .view import render_html, token_pieces

def _file_name(policy: str) -> str:
    """'rstitch:0.02' -> 'rstitch_0.02': safe on every file system."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", policy)


def _record(policy: str, problem: dict, out, batch: int, batch_wall_s: float, latency_model=None) -> dict:
    tokens = len(out.token_ids)
    latency = float(out.stats["latency_s"])
    answer = extract_answer(out.text)
    trace = [list(t) for t in getattr(out, "trace", [])]
    estimate = {"est_latency_s": latency_model.estimate(trace) / 1e3} if latency_model is not None else {}
    return {
        "policy": policy,
        "question": problem["question"],
        "gold": problem["answer"],
        "answer": answer,
        "correct": answers_equal(answer, problem["answer"]),
        "tokens": tokens,
        "llm_share": out.stats["llm_tokens"] / tokens if tokens else 0.0,
        "switches": out.stats.get("switches_to_llm", 0) + out.stats.get("switches_to_slm", 0),
        "runs": {m.name.lower(): lengths for m, lengths in run_lengths(out.sources).items()},
        "latency_s": latency,
        "tok_s": tokens / latency if latency > 0 else None,
        "batch": batch,
        "batch_wall_s": batch_wall_s,  # the whole engine.chat call this answer was part of
        "llm_wait_s": float(out.stats.get("llm_wait_s", 0.0)),
        "finish_reason": out.finish_reason,
        "text": out.text,
        **estimate,
        "prompt_tokens": len(out.prompt_token_ids),
        "sources": list(out.sources),  # the switching pattern, replayable by evaluation/simulator.py
        "trace": trace,
    }


def _write_view(path: Path, tokenizer, policy: str, record: dict, out) -> Path:
    pieces = token_pieces(tokenizer, out.token_ids, out.sources, out.entropies)
    stats = {key: record[key] for key in ("policy", "question", "gold", "answer", "correct", "tokens",
                                          "latency_s", "finish_reason")}
    stats.update(llm_tokens=out.stats["llm_tokens"], slm_tokens=out.stats["slm_tokens"],
                 llm_share=f"{record['llm_share']:.1%}")
    path.write_text(render_html(pieces, f"{policy}: one answer, token by token", stats), encoding="utf-8")
    return path


def _finished_records(path: Path, problems: list[dict], names: list[str]) -> dict[str, list[dict]]:
    """The records of `path` (an earlier run's records.jsonl) for each policy of `names` that it holds for
    exactly `problems`, in order."""
    by_policy: dict[str, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        by_policy.setdefault(record["policy"], []).append(record)
    questions = [p["question"] for p in problems]
    return {name: records for name, records in by_policy.items()
            if name in names and [r["question"] for r in records] == questions}


def run_eval(engine, problems: list[dict], policies: list[tuple[str, object]], params, *, out_dir,
             batch_size: int | None = None, meta: dict | None = None, progress: bool = True,
             latency_model=None, resume: bool = False) -> dict:
    """Runs `problems` ({"question", "answer"}) under each `(name, policy_object)` with sampling `params`,
    `batch_size` problems per `engine.chat` call (default: all at once). Writes the files listed in the module
    docstring; `meta` (models, params, ...) is added to the summary's metadata. Each record keeps the answer's
    forward trace; with a calibrated `latency_model` (router/latency.py) it also gets `est_latency_s`, the
    answer's latency at batch 1 estimated from that trace, which does not depend on the batch it ran in.
    Returns {"records", "summary", "files"}."""
    if not problems:
        raise ValueError("run_eval: no problems to run")
    if not policies:
        raise ValueError("run_eval: no policies to run")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"run_eval: batch_size must be >= 1, got {batch_size}")
    batch_size = batch_size or len(problems)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"records": out_dir / "records.jsonl", "views": []}
    finished = {}
    if resume and files["records"].is_file():
        finished = _finished_records(files["records"], problems, [name for name, _ in policies])
    records = []
    bar = tqdm(total=len(policies) * len(problems), unit="problem", disable=not progress)
    with bar, files["records"].open("w", encoding="utf-8") as records_file:
        for name, policy in policies:
            if name in finished:
                records += finished[name]
                records_file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in finished[name])
                bar.update(len(problems))
                continue
            bar.set_description(name)
            engine.reset_prefix_cache()  # each policy starts cold: no prompt KV cached by the policy before it
            for start in range(0, len(problems), batch_size):
                batch = problems[start:start + batch_size]
                start_s = time.perf_counter()
                outs = engine.chat([build_messages(p["question"]) for p in batch], params, policy=policy,
                                   use_tqdm=False)
                wall = time.perf_counter() - start_s
                if len(outs) != len(batch):
                    raise RuntimeError(f"engine.chat returned {len(outs)} outputs for {len(batch)} prompts")
                for i, (problem, out) in enumerate(zip(batch, outs)):
                    record = _record(name, problem, out, start // batch_size, wall, latency_model)
                    records.append(record)
                    records_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                    # The first problem for every tau, so the views compare the same answer across the sweep.
                    if start + i == 0 and name.startswith("rstitch"):
                        files["views"].append(_write_view(out_dir / f"view-{_file_name(name)}.html",
                                                          engine.tokenizer, name, record, out))
                records_file.flush()  # finished policies survive a crash in a later one
                bar.update(len(batch))
    summary = summarize_policies(records)
    files["summary_json"], files["summary_md"] = write_results(out_dir, "summary", summary, meta or {})
    try:
        files["pareto"] = pareto_plot(summary, out_dir / "pareto.png")
    except ImportError as e:  # the numbers are written already; a missing plotting library should not lose them
        warnings.warn(f"no pareto.png: {e}", stacklevel=2)
    return {"records": records, "summary": summary, "files": files}
