"""The real-model experiment's tasks (dlp_lora/realmodel/tasks.py): answers right, streams seeded,
held-out prompts never in a training stream that excludes them."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from dlp_lora.realmodel import tasks


@pytest.mark.parametrize(("n", "words"), [(7, "seven"), (13, "thirteen"), (40, "forty"), (47, "forty-seven"),
                                          (100, "one hundred"), (115, "one hundred fifteen"),
                                          (198, "one hundred ninety-eight")])
def test_number_words(n, words):
    assert tasks.number_words(n) == words


def test_answers_follow_from_the_messages():
    for message, answer in itertools.islice(tasks.stream("arith", 3), 50):
        a, b = (int(x) for x in message.split("What is ")[1].split("?")[0].split(" + "))
        assert answer == str(a + b)
    for message, answer in itertools.islice(tasks.stream("json_date", 3), 50):
        month, day, year = re.search(r"([A-Z][a-z]+) (\d+), (\d{4})", message).groups()
        fields = json.loads(answer)
        assert fields["date"] == f"{year}-{tasks.MONTHS.index(month) + 1:02d}-{int(day):02d}"
        assert list(fields) == ["name", "date"] and fields["name"] in message
    for message, answer in itertools.islice(tasks.stream("french", 3), 50):
        noun = message.rsplit(" ", 1)[1]
        assert answer.split()[0] == ("le" if tasks.NOUNS[noun][1] == "m" else "la")
    for message, answer in itertools.islice(tasks.stream("json", 3), 20):
        name = answer.split('"name": "')[1].split('"')[0]
        assert name in message and answer.startswith("{") and answer.endswith("}")


def test_streams_are_seeded_and_held_out_prompts_excluded():
    for task in tasks.ALL_TASKS:
        first = list(itertools.islice(tasks.stream(task, 1), 20))
        assert first == list(itertools.islice(tasks.stream(task, 1), 20))
        held = tasks.held_out(task, 20, 1000)
        assert len({m for m, _ in held}) == 20
        exclude = frozenset(m for m, _ in held)
        assert not exclude & {m for m, _ in itertools.islice(tasks.stream(task, 1000, exclude), 200)}
