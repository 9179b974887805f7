"""Six natural-language tasks for the real model, generated offline and scored by exact match.

Each task draws (user message, answer) pairs from a seeded generator: the answer is short and in one
exact format that the base instruct model does not use unprompted (it answers in sentences), and a
rank-8 LoRA learns. The composite-skill task (``json_date``) needs two skills at once: extract fields
as JSON (``json``) and write a date as YYYY-MM-DD (``date``). Its prompt asks for both in one
sentence, and its answer mixes both formats, token by token (LoRA-Flow's case and the paper's).

    words   "Write the number 47 in English words."               -> "forty-seven"
    arith   "What is 17 + 25? Reply with the number only."        -> "42"
    date    "Rewrite March 9, 2021 in the format YYYY-MM-DD."     -> "2021-03-09"
    units   "How many meters are 7 kilometers?"                  -> "7000"
    french  "Translate into French: the black cat"                -> "le chat noir"
    json    "Extract the name and age as JSON: Anna is 34 ..."    -> '{"name": "Anna", "age": 34}'
    json_date  "Extract the name and the date as JSON, the date in the format YYYY-MM-DD: Anna was
               born on March 9, 2021 in Oslo."        -> '{"name": "Anna", "date": "2021-03-09"}'
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

Example = tuple[str, str]  # (user message, answer)

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NOUNS = {"cat": ("chat", "m"), "dog": ("chien", "m"), "house": ("maison", "f"), "car": ("voiture", "f"),
         "book": ("livre", "m"), "table": ("table", "f"), "horse": ("cheval", "m"), "door": ("porte", "f"),
         "garden": ("jardin", "m"), "chair": ("chaise", "f")}
ADJECTIVES = {"black": ("noir", "noire"), "green": ("vert", "verte"), "small": ("petit", "petite"),
              "white": ("blanc", "blanche"), "red": ("rouge", "rouge"), "big": ("grand", "grande")}
NAMES = ["Anna", "Marco", "Lena", "Omar", "Sofia", "Paul", "Mei", "Ivan", "Clara", "Tom", "Nora", "Hugo"]
CITIES = ["Rome", "Oslo", "Lima", "Cairo", "Kyoto", "Porto", "Dublin", "Quito"]


def number_words(n: int) -> str:
    """0 <= n < 200 in English words: 'forty-seven', 'one hundred twelve'."""
    if n >= 100:
        rest = n - 100
        return "one hundred" + (f" {number_words(rest)}" if rest else "")
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def words(rng: random.Random) -> Example:
    n = rng.randint(1, 199)
    return f"Write the number {n} in English words.", number_words(n)


def arith(rng: random.Random) -> Example:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return f"What is {a} + {b}? Reply with the number only.", str(a + b)


def date(rng: random.Random) -> Example:
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return (f"Rewrite {MONTHS[month - 1]} {day}, {year} in the format YYYY-MM-DD.",
            f"{year:04d}-{month:02d}-{day:02d}")


def units(rng: random.Random) -> Example:
    kind = rng.randrange(3)
    n = rng.randint(2, 60)
    if kind == 0:
        return f"How many meters are {n} kilometers?", str(n * 1000)
    if kind == 1:
        return f"How many minutes are {n} hours?", str(n * 60)
    return f"How many grams are {n} kilograms?", str(n * 1000)


def french(rng: random.Random) -> Example:
    noun = rng.choice(sorted(NOUNS))
    adjective = rng.choice(sorted(ADJECTIVES))
    fr_noun, gender = NOUNS[noun]
    fr_adj = ADJECTIVES[adjective][0 if gender == "m" else 1]
    article = "le" if gender == "m" else "la"
    return f"Translate into French: the {adjective} {noun}", f"{article} {fr_noun} {fr_adj}"


def json_fields(rng: random.Random) -> Example:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    text = rng.choice([f"{name} is {age} years old and lives in {city}.",
                       f"Living in {city}, {name} turned {age} this year.",
                       f"{name} ({age}) works in {city}."])
    return f"Extract the name and age as JSON: {text}", f'{{"name": "{name}", "age": {age}}}'


def json_date(rng: random.Random) -> Example:
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    when = f"{MONTHS[month - 1]} {day}, {year}"
    text = rng.choice([f"{name} was born on {when} in {city}.", f"On {when}, {name} moved to {city}.",
                       f"{name} signed the lease in {city} on {when}."])
    return (f"Extract the name and the date as JSON, the date in the format YYYY-MM-DD: {text}",
            f'{{"name": "{name}", "date": "{year:04d}-{month:02d}-{day:02d}"}}')


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "words": words, "arith": arith, "date": date, "units": units, "french": french, "json": json_fields,
}
FUSION_TASK = "json_date"
FUSION_PARTS = ("json", "date")  # the two task adapters the composite skill needs
ALL_TASKS = {**TASKS, FUSION_TASK: json_date}


def stream(task: str, seed: int, exclude: frozenset[str] = frozenset()) -> Iterator[Example]:
    """Endless fresh examples of ``task`` (none whose message is in ``exclude``)."""
    rng = random.Random(f"{task}:{seed}")
    make = ALL_TASKS[task]
    while True:
        example = make(rng)
        if example[0] not in exclude:
            yield example


def held_out(task: str, count: int, seed: int) -> list[Example]:
    """``count`` distinct examples of ``task`` for evaluation (seed differs from every training stream)."""
    seen, out = set(), []
    for example in stream(task, seed):
        if example[0] not in seen:
            seen.add(example[0])
            out.append(example)
        if len(out) == count:
            return out
    raise AssertionError("unreachable")
