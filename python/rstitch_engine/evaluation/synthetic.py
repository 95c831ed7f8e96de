"""Problems to evaluate on: a built-in generator of multi-step arithmetic word problems, and a JSONL loader.

Every generated problem records the arithmetic it was built from (`SyntheticProblem.steps`), so the answer
can be checked independently of the wording. All quantities are non-negative integers and every division is
exact, so a 0.5B-1.5B model can solve them without fractions. Two levels: "basic" (2-4 steps, small numbers;
the demo pair's 0.5B and 1.5B score alike) and "hard" (4-7 steps, two- and three-digit numbers, one
sentence with a number the answer does not use), where the 1.5B is far ahead of the 0.5B
(docs/benchmarks.md, R-Stitch+), the regime the router must learn.
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


# "hard": more steps, larger numbers, and a distractor: a sentence whose number the answer does not use.

def _distractor(rng: random.Random, work: _Work, sentences: tuple[str, ...], low: int, high: int, **names: str) -> str:
    """One of `sentences` with a number in [low, high] that none of `work`'s steps uses."""
    used = {operand for step in work.steps for operand in (step.left, step.right)}
    number = rng.choice([n for n in range(low, high + 1) if n not in used])
    return rng.choice(sentences).format(number, **names)


def _hard_shopping(rng: random.Random, work: _Work) -> str:
    name = rng.choice(NAMES)
    (item1, item2) = rng.sample(["jackets", "lamps", "chairs", "backpacks", "helmets", "kettles"], 2)
    n1, p1, n2, p2 = rng.randint(3, 9), rng.randint(12, 48), rng.randint(2, 7), rng.randint(7, 29)
    total = work("+", work("*", n1, p1), work("*", n2, p2))
    discount = rng.randint(5, min(40, total - 1))
    paid = work("-", total, discount)
    bill = next(b for b in (100, 200, 500, 1000) if b > paid)
    work("-", bill, paid)
    other = _distractor(rng, work, ("The shop has {} customers that day.", "The shop opened {} years ago."), 11, 95)
    return (f"{name} buys {n1} {item1} at ${p1} each and {n2} {item2} at ${p2} each. {other} The cashier takes "
            f"${discount} off the total. {name} pays with a ${bill} bill. How many dollars of change does {name} "
            f"get?")


def _hard_warehouse(rng: random.Random, work: _Work) -> str:
    stock, loads, per_load = rng.randint(120, 480), rng.randint(3, 8), rng.randint(25, 60)
    days = rng.randint(2, 5)
    after = work("+", stock, work("*", loads, per_load))
    per_day = rng.randint(20, after // days)
    work("-", after, work("*", per_day, days))
    other = _distractor(rng, work, ("Each box weighs {} kg.", "The warehouse has {} workers."), 12, 85)
    return (f"A warehouse holds {stock} boxes. Trucks deliver {loads} loads of {per_load} boxes each. {other} "
            f"Then {per_day} boxes are shipped out every day for {days} days. How many boxes are left in the "
            f"warehouse?")


def _hard_painters(rng: random.Random, work: _Work) -> str:
    workers, per_day, days, pay = rng.randint(3, 9), rng.randint(12, 35), rng.randint(4, 9), rng.randint(3, 8)
    fences = work("*", work("*", workers, per_day), days)
    earned = work("*", fences, pay)
    supplies = rng.randint(50, earned // 2)
    work("-", earned, supplies)
    other = _distractor(rng, work, ("The team's van is {} years old.", "The town has {} streets."), 6, 90)
    return (f"A team of {workers} workers paints fences. Each worker paints {per_day} fences a day, for {days} "
            f"days. {other} The team is paid ${pay} per fence and spends ${supplies} on paint. How many dollars "
            f"does the team keep?")


def _packed_sale(rng: random.Random, work: _Work, factors: tuple[int, int, int], largest_pack: int,
                 prices: tuple[int, int]) -> tuple[int, int]:
    """The price of the product of `factors` things in packs of an exact size from 4 to `largest_pack` (the
    first factor must lie there, so one always divides); returns (pack size, price per pack)."""
    things = work("*", work("*", factors[0], factors[1]), factors[2])
    per_pack = rng.choice([d for d in range(4, largest_pack + 1) if things % d == 0])
    price = rng.randint(*prices)
    work("*", work("/", things, per_pack), price)
    return per_pack, price


def _hard_school(rng: random.Random, work: _Work) -> str:
    classes, students, each = rng.randint(4, 9), rng.randint(21, 35), rng.randint(3, 6)
    per_pack, price = _packed_sale(rng, work, (classes, students, each), 12, (2, 9))
    other = _distractor(rng, work, ("The school was built {} years ago.", "The school has {} teachers."), 14, 80)
    return (f"A school has {classes} classes of {students} students. {other} Every student needs {each} "
            f"notebooks. Notebooks come in packs of {per_pack}, and each pack costs ${price}. How many dollars "
            f"does the school spend on notebooks?")


def _hard_trip(rng: random.Random, work: _Work) -> str:
    v1, t1, v2, t2 = rng.randint(45, 95), rng.randint(3, 7), rng.randint(30, 80), rng.randint(2, 5)
    travelled = work("+", work("*", v1, t1), work("*", v2, t2))
    trip = travelled + rng.randint(30, 400)
    work("-", trip, travelled)
    other = _distractor(rng, work, ("The train has {} carriages.", "The train carries {} passengers."), 8, 300)
    return (f"A train's whole journey is {trip} km. It travels at {v1} km per hour for {t1} hours, then at {v2} km "
            f"per hour for {t2} hours. {other} How many kilometres of the journey are left?")


def _hard_savings(rng: random.Random, work: _Work) -> str:
    name, sibling = rng.sample(NAMES, 2)
    start, earn, weeks = rng.randint(50, 400), rng.randint(35, 90), rng.randint(4, 12)
    spend = rng.randint(10, earn - 10)
    saved = work("+", start, work("*", work("-", earn, spend), weeks))
    gift = rng.randint(20, saved - 1)
    work("-", saved, gift)
    other = _distractor(rng, work, ("{sibling} saves ${} a week.", "{sibling} has ${} in the bank."), 5, 60,
                        sibling=sibling)
    return (f"{name} has ${start} saved. For {weeks} weeks, {name} earns ${earn} a week and spends ${spend} of it, "
            f"saving the rest. {other} Then {name} buys a gift for ${gift}. How many "
            f"dollars does {name} have now?")


def _hard_bakery(rng: random.Random, work: _Work) -> str:
    trays, per_tray, days = rng.randint(6, 14), rng.randint(12, 30), rng.randint(3, 6)
    per_box, price = _packed_sale(rng, work, (trays, per_tray, days), 15, (3, 12))
    other = _distractor(rng, work, ("The bakery has {} ovens.", "The baker gets up at {} minutes past four."), 3, 45)
    return (f"A bakery bakes {trays} trays of {per_tray} muffins every day for {days} days. {other} It packs all "
            f"the muffins into boxes of {per_box} and sells each box for ${price}. How many dollars does it earn?")


def _hard_ages(rng: random.Random, work: _Work) -> str:
    a, b, c = rng.sample(NAMES, 3)
    times, young, gap, years = rng.randint(2, 5), rng.randint(8, 19), rng.randint(1, 9), rng.randint(5, 25)
    old = work("*", times, young)
    middle = work("-", old, gap)
    later = [work("+", age, years) for age in (old, middle, young)]
    work("+", work("+", later[0], later[1]), later[2])
    other = _distractor(rng, work, ("{a}'s dog is {} years old.", "{a} lives at house number {}."), 2, 99, a=a)
    return (f"{a} is {times} times as old as {b}, who is {young} years old. {c} is {gap} years younger than {a}. "
            f"{other} In {years} years, what will be the sum of the three ages?")


LEVELS = {"basic": {f.__name__.lstrip("_"): f for f in (
    _shopping_change, _market_boxes, _sharing_equally, _reading_rate, _machine_rate, _travel_distance, _ages,
    _savings_weeks)}, "hard": {f.__name__.lstrip("_"): f for f in (
        _hard_shopping, _hard_warehouse, _hard_painters, _hard_school, _hard_trip, _hard_savings, _hard_bakery,
        _hard_ages)}}


def generate_problems(n: int, seed: int, level: str = "basic") -> list[SyntheticProblem]:
    """`n` problems of `level` ("basic" or "hard") with their step structure; the same (n, seed, level) always
    gives the same problems."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    templates = LEVELS[level]
    rng = random.Random(seed)  # a private generator: independent of, and harmless to, the global RNG
    names = list(templates)
    problems = []
    for i in range(n):
        if i % len(names) == 0:  # every template once per round, so even small n varies in wording
            rng.shuffle(names)
        work = _Work()
        question = templates[names[i % len(names)]](rng, work)
        problems.append(SyntheticProblem(question, work.steps[-1].result, names[i % len(names)],
                                         tuple(work.steps)))
    return problems


def synthetic_problems(n: int, seed: int, level: str = "basic") -> list[dict]:
    """`n` word problems as `{"question": str, "answer": str(int)}`."""
    return [p.as_dict() for p in generate_problems(n, seed, level)]


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
