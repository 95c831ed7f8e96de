"""The prompt that asks for a `\\boxed{}` answer, answer extraction from model output, and answer comparison."""
from __future__ import annotations

import re
from fractions import Fraction

PROMPT_SUFFIX = "Reason step by step, briefly, and put your final answer within \\boxed{}."

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"""
    \\[dt]?frac\s*\{\s*-?[\d.]+\s*\}\s*\{\s*-?[\d.]+\s*\}     # \frac{a}{b}, \dfrac, \tfrac
    | (?:(?<![\w)\]}])-)?                            # a minus sign only where it cannot be a subtraction
      (?: (?<![\d/])\d+/\d+(?![\d/])                 # a/b, but not inside a date like 1/2/2020
        | \d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?          # 1,234,567.5
        | \d+(?:\.\d+)? | \.\d+ )
""", re.VERBOSE)
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}")


def build_messages(question: str) -> list[dict]:
    """A one-turn chat asking for brief reasoning and a boxed final answer."""
    return [{"role": "user", "content": f"{question.strip()}\n{PROMPT_SUFFIX}"}]


def _last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}`, nested braces included; None if there is none."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The model's final answer: the content of the last `\\boxed{...}`, else the last number in the text
    (thousands commas removed); None when there is neither."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _normalize(answer: str) -> str:
    """Strips the markup that does not change an answer's value: $, %, LaTeX spacing, \\text{}, {,} groups."""
    s = answer.strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("{,}", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\\?[$%]", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s.lower()


def _as_number(answer: str) -> Fraction | None:
    """The exact value of a normalised answer if it is a number, a/b or \\frac{a}{b}, else None."""
    negate = answer.startswith("-")
    body = answer[1:] if negate else answer
    latex = _LATEX_FRACTION.fullmatch(body)
    parts = latex.groups() if latex else body.split("/")
    if len(parts) > 2:
        return None
    try:
        value = Fraction(parts[0]) / Fraction(parts[1]) if len(parts) == 2 else Fraction(parts[0])
    except (ValueError, ZeroDivisionError):
        return None
    return -value if negate else value


def answers_equal(pred: str | None, gold: str) -> bool:
    """True when `pred` means `gold`: numerically equal if both are numbers (12 == 12.00 == \\frac{24}{2}),
    otherwise equal as strings after normalisation. A missing prediction is never correct."""
    if pred is None:
        return False
    pred_norm, gold_norm = _normalize(pred), _normalize(gold)
    pred_value, gold_value = _as_number(pred_norm), _as_number(gold_norm)
    if pred_value is not None and gold_value is not None:
        return pred_value == gold_value
    return pred_norm == gold_norm
