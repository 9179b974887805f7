"""The continuous-batching scheduler in-process (no Ray): every row, whenever it arrives and whatever
runs beside it, gets the text and routing it gets from generate() alone."""

from __future__ import annotations

import math
import threading
import time

import pytest
import serving_fixtures as sf

from dlp_lora.serving.engine import GenerationRow, RowResult
from dlp_lora.serving.loading import load_engine
from dlp_lora.serving.scheduler import ContinuousScheduler


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return sf.build(tmp_path_factory.mktemp("scheduler"))


@pytest.fixture(scope="module")
def engine(art):
    return load_engine(sf.config(art))


@pytest.fixture(scope="module")
def oracle(art):
    return load_engine(sf.config(art))


def assert_same(result: RowResult, expected: dict, label) -> None:
    """Text, finish reason, span positions, reasons and adapters exactly; weights with a tolerance."""
    assert isinstance(result, RowResult), (label, result)
    assert (result.text, result.finish_reason) == (expected["text"], expected["finish_reason"]), label
    got, want = result.routing, expected["routing"]
    assert [(s["position"], s["reason"], list(s["adapters"])) for s in got] == \
        [(s["position"], s["reason"], list(s["adapters"])) for s in want], label
    for g, w in zip(got, want, strict=True):
        for name, weight in w["adapters"].items():
            assert math.isclose(g["adapters"][name], weight, rel_tol=1e-4, abs_tol=1e-5), (label, g, w)


def _alone(oracle, prompt, row: GenerationRow) -> dict:
    return sf.generate_alone(oracle.model, oracle.tokenizer, prompt, row.max_tokens, row.mixture,
                             row.routing_top_p, row.max_loras)


def _wait(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


OPTIONS = [{}, {"mixture": {"alpha": 0.7, "gamma": 0.3}}, {}, {"routing_top_p": 0.9, "max_loras": 2},
           {"mixture": {"beta": 1.0}}, {}, {"routing_top_p": 0.9, "max_loras": 2}, {"mixture": {}}]


@pytest.mark.parametrize("step_tokens", [256, 3])  # 3: prompts prefilled in chunks over several steps
def test_staggered_rows_equal_each_prompt_alone(engine, oracle, step_tokens):
    scheduler = ContinuousScheduler(engine, max_batch_size=4, step_tokens=step_tokens)
    try:
        rows, futures = [], []
        for i, prompt in enumerate(sf.PROMPTS):  # arrive while others run; more rows than places
            rows.append(GenerationRow(engine.encode(prompt), max_tokens=(3, 9, 17)[i % 3], **OPTIONS[i]))
            futures.append(scheduler.submit(rows[-1]))
            time.sleep(0.01 * (i % 3))
        results = [f.result(timeout=120) for f in futures]
    finally:
        scheduler.close()
    for prompt, row, result in zip(sf.PROMPTS, rows, results, strict=True):
        assert_same(result, _alone(oracle, prompt, row), prompt)
    assert max(r.batch_size for r in results) > 1
    assert max(scheduler.step_sizes) <= 4
    assert any(span["position"] >= len(row.prompt_ids)  # re-routed while generating
               for row, r in zip(rows, results, strict=True) for span in r.routing)


def test_identical_prompts_with_different_mixtures(engine, oracle):
    prompt = sf.PROMPTS[0]
    mixtures = [{"alpha": 1.0}, {"beta": 1.0}, None, {"gamma": 0.5, "beta": -0.5}]
    scheduler = ContinuousScheduler(engine, max_batch_size=8)
    try:
        rows = [GenerationRow(engine.encode(prompt), max_tokens=10, mixture=m) for m in mixtures]
        together = [f.result(timeout=60) for f in [scheduler.submit(r) for r in rows]]
        one_by_one = [scheduler.submit(r).result(timeout=60) for r in rows]
    finally:
        scheduler.close()
    for row, a, b in zip(rows, together, one_by_one, strict=True):
        expected = _alone(oracle, prompt, row)
        assert_same(a, expected, row.mixture)
        assert_same(b, expected, row.mixture)
    assert len({r.text for r in together}) > 1  # the mixtures really differ


def test_short_row_joins_and_leaves_while_a_long_one_runs(engine, oracle):
    scheduler = ContinuousScheduler(engine, max_batch_size=8)
    try:
        long_row = GenerationRow(engine.encode(sf.PROMPTS[1]), max_tokens=110)
        long_future = scheduler.submit(long_row)
        _wait(lambda: scheduler.steps >= 5 or long_future.done())
        assert not long_future.done(), long_future.result()  # still generating when the short one comes
        short_row = GenerationRow(engine.encode(sf.PROMPTS[2]), max_tokens=8)
        short = scheduler.submit(short_row).result(timeout=60)
        assert not long_future.done()  # the short row finished while the long one still ran
        long_result = long_future.result(timeout=120)
    finally:
        scheduler.close()
    assert short.batch_size == 2
    assert_same(short, _alone(oracle, sf.PROMPTS[2], short_row), "short")
    assert_same(long_result, _alone(oracle, sf.PROMPTS[1], long_row), "long")


def test_cancelled_row_frees_its_place_and_bad_rows_fail_alone(engine, oracle):
    scheduler = ContinuousScheduler(engine, max_batch_size=2)
    try:
        doomed = GenerationRow(engine.encode(sf.PROMPTS[3]), max_tokens=110)
        doomed_future = scheduler.submit(doomed)
        other = GenerationRow(engine.encode(sf.PROMPTS[4]), max_tokens=30)
        other_future = scheduler.submit(other)
        bad = scheduler.submit(GenerationRow(engine.encode(sf.PROMPTS[5]), max_tokens=0))
        _wait(lambda: scheduler.counts()["running"] == 2)
        doomed.cancelled.set()
        _wait(lambda: doomed_future.done())
        ended = doomed_future.result(timeout=5)
        assert ended.finish_reason == "cancelled" and ended.completion_tokens < doomed.max_tokens
        with pytest.raises(ValueError, match="max_tokens"):
            bad.result(timeout=30)
        assert_same(other_future.result(timeout=60), _alone(oracle, sf.PROMPTS[4], other), "other")
        assert scheduler.counts() == {"running": 0, "waiting": 0}
        assert scheduler.cancelled_rows == 1
    finally:
        scheduler.close()


def test_seeded_rows_sample_alike_whatever_runs_beside_them(engine):
    scheduler = ContinuousScheduler(engine, max_batch_size=8)
    try:
        def row(seed):
            return GenerationRow(engine.encode(sf.PROMPTS[0]), max_tokens=12, temperature=1.0, top_p=0.9,
                                 seed=seed)
        alone = scheduler.submit(row(7)).result(timeout=60)
        crowd = [scheduler.submit(row(s)) for s in (7, 8, 7)]
        texts = [f.result(timeout=60).text for f in crowd]
    finally:
        scheduler.close()
    assert texts[0] == texts[2] == alone.text
    assert threading.active_count() >= 1
