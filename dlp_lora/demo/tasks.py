"""The demo's synthetic string tasks: the composite-K test tasks and the base model's pretraining primitives.

Every task maps a random string to (prompt, answer). Each test task has its own prompt style, so a router
can tell them apart from the prompt alone, as in the paper's composite-K setting. The pretraining
primitives are general string skills (copy, repeat, length, counting digits, increment,
single-digit sums, letter successor, min/max, last character) that none of the test tasks is: the
base model learns to read and write strings, then one LoRA per test task teaches the task itself.
The base therefore scores near zero on the tasks and far below the adapters, which is the pattern
the demo has to show.

Counting ("how many b in dbebbb?") was tried as a sixth task and left out: a rank-8 LoRA stayed at
40-52% exact match (about the answer prior) after 600 steps, with or without a digit-counting primitive
in pretraining; "how many vowels" reached 78%. Addition uses two-digit operands: with one-digit
operands allowed, the misaligned digits were most of the adapter's errors.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
DIGITS = string.digits
# The char-level tokenizer's vocabulary: every character of the prompts and answers, plus sentence
# ends (". ! ? newline") so that a prompt of several sentences can be rerouted at each one.
ALPHABET = LETTERS + DIGITS + " =+.!?\n"


@dataclass(frozen=True)
class StringTask:
    """A generator of (prompt, answer) pairs: `make(rng)` draws one example."""

    name: str
    style: str  # the prompt pattern, for the README and the table's caption
    make: Callable[[random.Random], tuple[str, str]]
    weight: float = 1.0  # share in a mixed stream (pretraining favours the multi-character skills)


def _word(rng: random.Random, lo: int = 3, hi: int = 6, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _shift(c: str, k: int) -> str:
    return LETTERS[(LETTERS.index(c) + k) % 26]


TASKS: dict[str, StringTask] = {}
PRIMITIVES: dict[str, StringTask] = {}


def _registers(registry: dict[str, StringTask], name: str, style: str, weight: float = 1.0):
    """Decorator: add the example maker below to `registry` as StringTask(name, style, make, weight)."""

    def register(make):
        registry[name] = StringTask(name, style, make, weight)
        return make

    return register


# ---- test tasks: what the adapters learn and the composite evaluates ---------------------------------


@_registers(TASKS, "reverse", "reverse abcd=")
def _reverse(rng):
    s = _word(rng)
    return f"reverse {s}=", s[::-1]


@_registers(TASKS, "sort", "sort dbca=")
def _sort(rng):
    s = _word(rng)
    return f"sort {s}=", "".join(sorted(s))


@_registers(TASKS, "add", "12+34=")
def _add(rng):
    # two-digit operands: the digits line up, the carries remain
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}=", str(a + b)


@_registers(TASKS, "caesar", "caesar abc=")
def _caesar(rng):
    s = _word(rng)
    return f"caesar {s}=", "".join(_shift(c, 1) for c in s)


@_registers(TASKS, "double", "double abc=")
def _double(rng):
    s = _word(rng, 3, 5)
    return f"double {s}=", "".join(c + c for c in s)


# ---- pretraining primitives: general skills of the base model, none of them a test task ------------
# Copying carries most of the signal (multi-character answers), so it gets the largest share; the
# single-digit sums are a table of 100 facts that the add adapter relies on, so they get a double one.


@_registers(PRIMITIVES, "copy", "copy abc=", weight=3)
def _copy(rng):
    s = _word(rng, 1, 6)
    return f"copy {s}=", s


@_registers(PRIMITIVES, "repeat", "repeat abc=", weight=2)
def _repeat(rng):
    s = _word(rng, 1, 4)
    return f"repeat {s}=", s + s


@_registers(PRIMITIVES, "len", "len abc=")
def _length(rng):
    s = _word(rng, 1, 6)
    return f"len {s}=", str(len(s))


@_registers(PRIMITIVES, "digits", "digits a1b2=")
def _digits(rng):
    s = "".join(rng.choice(DIGITS) if rng.random() < 0.4 else rng.choice(LETTERS)
                for _ in range(rng.randint(1, 7)))
    return f"digits {s}=", str(sum(c.isdigit() for c in s))


@_registers(PRIMITIVES, "inc", "inc 129=")
def _increment(rng):
    n = rng.randint(0, 999)
    return f"inc {n}=", str(n + 1)


@_registers(PRIMITIVES, "plus", "plus 7 5=", weight=2)
def _plus(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"plus {a} {b}=", str(a + b)


@_registers(PRIMITIVES, "after", "after c=")
def _after(rng):
    c = rng.choice(LETTERS)
    return f"after {c}=", _shift(c, 1)


@_registers(PRIMITIVES, "min", "min dbca=")
def _min(rng):
    s = _word(rng, 1, 6)
    return f"min {s}=", min(s)


@_registers(PRIMITIVES, "max", "max dbca=")
def _max(rng):
    s = _word(rng, 1, 6)
    return f"max {s}=", max(s)


@_registers(PRIMITIVES, "last", "last abc=")
def _last(rng):
    s = _word(rng, 1, 6)
    return f"last {s}=", s[-1]


def held_out_set(tasks: list[StringTask], n_per_task: int, seed: int) -> list[tuple[str, str, str]]:
    """`n_per_task` distinct (task name, prompt, answer) per task, drawn with their own seed."""
    rng = random.Random(seed)
    rows = []
    for task in tasks:
        seen: set[str] = set()
        for _ in range(100 * n_per_task):
            if len(seen) == n_per_task:
                break
            prompt, answer = task.make(rng)
            if prompt not in seen:
                seen.add(prompt)
                rows.append((task.name, prompt, answer))
    return rows


def stream(tasks: list[StringTask], seed: int, exclude: set[str] = frozenset()) -> Iterator[tuple[str, str]]:
    """An endless stream of (prompt, answer), tasks drawn by weight; prompts in `exclude` never appear,
    so training never sees the evaluation set."""
    rng = random.Random(seed)
    weights = [t.weight for t in tasks]
    while True:
        prompt, answer = rng.choices(tasks, weights)[0].make(rng)
        if prompt not in exclude:
            yield prompt, answer
