"""Problems to evaluate on: a built-in generator of multi-step arithmetic word problems, and a JSONL loader.

Every generated problem records the arithmetic it was built from (`SyntheticProblem.steps`), so the answer
can be checked independently of the wording. All quantities are small non-negative integers and every
division is exact, so a 0.5B-1.5B model can solve them without fractions.
"""
from __future__ import annotations

import json
import operator
import random
from dataclasses import dataclass
from pathlib import Path

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keiko", "Liam",
         "Maya", "Noah", "Olga", "Pedro")


@dataclass(frozen=True)
class Step:
    """One arithmetic step: `left op right = result`."""
    op: str
    left: int
    right: int
    result: int


@dataclass(frozen=True)
class SyntheticProblem:
    question: str
    answer: int
    template: str
    steps: tuple[Step, ...]

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": str(self.answer)}


class _Work:
    """Records the steps a template performs, refusing negative or fractional intermediates."""

    def __init__(self):
        self.steps: list[Step] = []

    def __call__(self, op: str, left: int, right: int) -> int:
        if op == "/" and left % right:
            raise AssertionError(f"template bug: {left} / {right} is not exact")
        result = OPS[op](left, right)
        if result < 0:
            raise AssertionError(f"template bug: {left} {op} {right} is negative")
        self.steps.append(Step(op, left, right, result))
        return result


# Each template draws its numbers from `rng`, does its arithmetic through `work` and returns the question.
# Numbers are chosen backwards where a division must come out exact.

def _shopping_change(rng: random.Random, work: _Work) -> str:
    name = rng.choice(NAMES)
    (item1, item2) = rng.sample(["notebooks", "pens", "apples", "cookies", "stickers", "candles"], 2)
    n1, p1, n2, p2 = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 6), rng.randint(1, 5)
    total = work("+", work("*", n1, p1), work("*", n2, p2))
    bill = next(b for b in (20, 50, 100) if b > total)
    work("-", bill, total)
    return (f"{name} buys {n1} {item1} at ${p1} each and {n2} {item2} at ${p2} each. "
            f"{name} pays with a ${bill} bill. How many dollars of change does {name} get?")


def _market_boxes(rng: random.Random, work: _Work) -> str:
    per_box, boxes_per_day, days = rng.choice([6, 10, 12]), rng.randint(1, 4), rng.randint(2, 7)
    price = rng.randint(2, 6)
    per_day = per_box * boxes_per_day
    eggs = work("*", per_day, days)
    boxes = work("/", eggs, per_box)
    work("*", boxes, price)
    return (f"A farmer collects {per_day} eggs every day for {days} days. She packs all of them into boxes "
            f"of {per_box} eggs and sells each box for ${price}. How many dollars does she earn?")


def _sharing_equally(rng: random.Random, work: _Work) -> str:
    name = rng.choice(NAMES)
    thing = rng.choice(["marbles", "stickers", "cards", "sweets"])
    friends, each = rng.randint(2, 6), rng.randint(4, 12)
    packs, per_pack = rng.randint(2, 4), rng.randint(2, 5)
    owned = friends * each - packs * per_pack
    if owned <= 0:  # too few to start with: give the friends a few more each
        owned += friends * packs * per_pack
    bought = work("*", packs, per_pack)
    total = work("+", owned, bought)
    work("/", total, friends)
    return (f"{name} has {owned} {thing}. {name} buys {packs} packs with {per_pack} {thing} in each pack, "
            f"then shares all the {thing} equally among {friends} friends. How many {thing} does each friend get?")


def _reading_rate(rng: random.Random, work: _Work) -> str:
    name = rng.choice(NAMES)
    per_day, days, extra = rng.randint(8, 25), rng.randint(3, 7), rng.randint(5, 30)
    read = work("+", work("*", per_day, days), extra)
    book = read + rng.randint(10, 120)
    work("-", book, read)
    return (f"A book has {book} pages. {name} reads {per_day} pages a day for {days} days, and then "
            f"{extra} more pages on the weekend. How many pages are left to read?")


def _machine_rate(rng: random.Random, work: _Work) -> str:
    thing = rng.choice(["toys", "bottles", "bricks", "shirts"])
    rate, h1, h2 = rng.randint(5, 30), rng.randint(2, 8), rng.randint(2, 8)
    work("*", rate, work("+", h1, h2))
    return (f"A machine makes {rate} {thing} per hour. It runs for {h1} hours on Monday and {h2} hours on "
            f"Tuesday. How many {thing} does it make in total?")


def _travel_distance(rng: random.Random, work: _Work) -> str:
    v1, t1, v2, t2 = rng.randint(4, 12) * 10, rng.randint(2, 5), rng.randint(3, 9) * 10, rng.randint(2, 4)
    work("+", work("*", v1, t1), work("*", v2, t2))
    return (f"A train travels at {v1} km per hour for {t1} hours, then slows down to {v2} km per hour for "
            f"{t2} more hours. How many kilometres does it travel in total?")


def _ages(rng: random.Random, work: _Work) -> str:
    older, younger = rng.sample(NAMES, 2)
    times, young_age, years = rng.randint(2, 4), rng.randint(3, 12), rng.randint(2, 10)
    old_age = work("*", times, young_age)
    work("+", work("+", old_age, years), work("+", young_age, years))
    return (f"{older} is {times} times as old as {younger}. {younger} is {young_age} years old. "
            f"In {years} years, what will be the sum of their ages?")


def _savings_weeks(rng: random.Random, work: _Work) -> str:
    name = rng.choice(NAMES)
    earn, weeks = rng.randint(15, 40), rng.randint(3, 12)
    spend = rng.randint(2, earn - 5)
    saved = earn - spend
    goal = saved * weeks
    work("/", goal, work("-", earn, spend))
    return (f"{name} earns ${earn} a week and spends ${spend} of it. {name} saves the rest. "
            f"How many weeks does it take {name} to save ${goal}?")


TEMPLATES = {f.__name__.lstrip("_"): f for f in (
    _shopping_change, _market_boxes, _sharing_equally, _reading_rate, _machine_rate, _travel_distance, _ages,
    _savings_weeks)}


def generate_problems(n: int, seed: int) -> list[SyntheticProblem]:
    """`n` problems with their step structure; the same (n, seed) always gives the same problems."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)  # a private generator: independent of, and harmless to, the global RNG
    names = list(TEMPLATES)
    problems = []
    for i in range(n):
        if i % len(names) == 0:  # every template once per round, so even small n varies in wording
            rng.shuffle(names)
        work = _Work()
        question = TEMPLATES[names[i % len(names)]](rng, work)
        problems.append(SyntheticProblem(question, work.steps[-1].result, names[i % len(names)],
                                         tuple(work.steps)))
    return problems


def synthetic_problems(n: int, seed: int) -> list[dict]:
    """`n` word problems as `{"question": str, "answer": str(int)}`."""
    return [p.as_dict() for p in generate_problems(n, seed)]


def load_problems(path: str | Path) -> list[dict]:
    """Problems from a JSONL file, one `{"question": str, "answer": str|number}` object a line (blank lines
    skipped). Answers are returned as strings."""
    path = Path(path)
    problems = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            question, answer = obj.get("question"), obj.get("answer")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: 'question' must be a non-empty string")
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
                raise ValueError(f"{where}: 'answer' must be a non-empty string or a number")
            problems.append({"question": question, "answer": str(answer).strip()})
    if not problems:
        raise ValueError(f"{path}: no problems in the file")
    return problems
