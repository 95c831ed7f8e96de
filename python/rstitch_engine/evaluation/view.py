"""One answer shown token by token, marked by the model that produced it (SLM 0, LLM 1) and its entropy."""
from __future__ import annotations

import html
import math
from itertools import groupby

from ..detokenize import IncrementalDecoder
from ..protocol import LLM, SLM

_LLM_ANSI = "\x1b[1;30;43m"  # bold black on yellow
_RESET = "\x1b[0m"
_LLM_COLOR = "#f5a623"


def token_pieces(tokenizer, token_ids, sources, entropies, *, skip_special_tokens: bool = True) -> list[tuple]:
    """`(text, source, entropy)` per token, decoded incrementally so a character whose bytes span several
    tokens is not garbled: the tokens before its last byte get "" and the token completing it gets the
    character. The pieces join to the decoded answer."""
    if not len(token_ids) == len(sources) == len(entropies):
        raise ValueError(f"token_ids, sources and entropies differ in length: "
                         f"{len(token_ids)}, {len(sources)}, {len(entropies)}")
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    texts = [decoder.push([int(token_id)]) for token_id in token_ids]
    if texts:  # bytes the answer stopped in the middle of: show them as the tokenizer does, on the last token
        full = tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        texts[-1] += full[len(decoder.text):]
    return [(text, int(source), float(entropy)) for text, source, entropy in zip(texts, sources, entropies)]


def highlight_llm(text: str, *, color: bool) -> str:
    """LLM-produced text as a terminal shows it: ANSI bold black on yellow, closed before each newline so the
    background does not run to the edge, or between [[ ]] without colour. The one home of the highlight,
    for whole answers (`render_terminal`) and for streamed tokens (the CLI's demo)."""
    if not color:
        return f"[[{text}]]"
    return _LLM_ANSI + text.replace("\n", f"{_RESET}\n{_LLM_ANSI}") + _RESET


def render_terminal(pieces, *, color: bool) -> str:
    """The answer as text with the LLM's runs highlighted (`highlight_llm`)."""
    out = []
    # Empty pieces (bytes of an unfinished character) are dropped so they do not split a run.
    for source, run in groupby((piece for piece in pieces if piece[0]), key=lambda piece: piece[1]):
        text = "".join(piece[0] for piece in run)
        out.append(highlight_llm(text, color=color) if source == LLM else text)
    return "".join(out)


def _slm_tint(entropy: float, max_entropy: float) -> str:
    """Light to darker blue as the SLM's entropy grows (relative to the answer's most uncertain SLM token)."""
    share = entropy / max_entropy if max_entropy > 0 and math.isfinite(entropy) else 0.0
    return f"rgba(66, 133, 244, {0.06 + 0.6 * min(max(share, 0.0), 1.0):.3f})"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
.answer {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.6; padding: 1em;
          border: 1px solid #ddd; border-radius: 6px; }}
.answer span {{ border-radius: 2px; }}
.llm {{ background: {llm_color}; font-weight: bold; }}
.legend span {{ display: inline-block; padding: 0 .5em; margin-right: 1em; border-radius: 3px; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
td, th {{ border: 1px solid #ddd; padding: .25em .75em; text-align: left; }}
</style></head><body>
<h1>{title}</h1>
<p class="legend"><span style="background: {slm_low}">SLM, low entropy</span><span style="background: {slm_high}">\
SLM, high entropy</span><span class="llm">LLM</span> Hover a token for its source and entropy.</p>
<div class="answer">{tokens}</div>
<table>{stats}</table>
</body></html>
"""


def render_html(pieces, title: str, stats: dict) -> str:
    """A self-contained HTML page: SLM tokens tinted by entropy, LLM tokens in orange, a tooltip per token,
    a legend and a table of `stats`."""
    max_entropy = max((e for _, s, e in pieces if s == SLM and math.isfinite(e)), default=0.0)
    spans = []
    for text, source, entropy in pieces:
        if not text:
            continue
        tooltip = html.escape(f"{'LLM' if source == LLM else 'SLM'}, entropy {entropy:.3f}")
        style = 'class="llm"' if source == LLM else f'style="background: {_slm_tint(entropy, max_entropy)}"'
        spans.append(f'<span {style} title="{tooltip}">{html.escape(text)}</span>')
    rows = "".join(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"
                   for key, value in stats.items())
    return _PAGE.format(title=html.escape(title), llm_color=_LLM_COLOR, slm_low=_slm_tint(0.0, 1.0),
                        slm_high=_slm_tint(1.0, 1.0), tokens="".join(spans), stats=rows)
