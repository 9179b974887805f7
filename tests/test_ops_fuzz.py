"""Property-based fuzzing of ops.multi_lora on every CPU backend against the float64 oracle.

Random shapes (d_in, d_out, N, r, K), segment layouts with empty segments and rows before the
first segment, -1 slots (and segments with only -1 slots), adapter-popularity patterns, dtypes
(fp32 near-exact, fp16/bf16 within op_cases.TOLERANCES) and fresh random data (OpCase.tensors:
never zeros). Overlapping y with any input must be refused, with every byte left as it was.

Reproducible: derandomize=True and no example database, so CI runs the same examples every time.
Bounded to well under a minute in all: the Triton interpreter pays per program, so its examples
are fewer and smaller, and bf16 is skipped there (the interpreter's bf16 arithmetic is wrong,
see DESIGN.md pitfalls; bf16 on Triton is tested on a GPU).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from op_cases import ALIASABLE, PATTERNS, OpCase, alias_y, assert_matches_reference

from dlp_lora import ops
from dlp_lora.ops import MultiLoRAArgumentError

BACKENDS = [b for b in ("reference", "cpp", "triton") if b in ops.available_backends("cpu")]
DTYPES = {"reference": (torch.float32, torch.float16, torch.bfloat16),
          "cpp": (torch.float32, torch.float16, torch.bfloat16),
          "triton": (torch.float32, torch.float16)}
# (max rows per segment, max d_in / d_out, examples): the interpreter is ~100x slower per row
LIMITS = {"reference": (24, 64, 100), "cpp": (48, 128, 300), "triton": (16, 48, 80)}
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def op_cases(draw, backend: str) -> tuple[OpCase, torch.dtype]:
    max_len, max_d, _ = LIMITS[backend]
    seg_lengths = tuple(draw(st.lists(st.integers(0, max_len), min_size=1, max_size=6)))
    has_rows = any(seg_lengths)
    case = OpCase(
        d_in=draw(st.integers(1, max_d)),
        d_out=draw(st.integers(1, max_d)),
        N=draw(st.integers(1, 8)),
        r=draw(st.integers(1, 16)),
        K=draw(st.integers(1, 4)),
        seg_lengths=seg_lengths,
        offset=draw(st.integers(0, 3)),
        pattern=draw(st.sampled_from(PATTERNS)),
        empty_slot_prob=draw(st.sampled_from([0.0, 0.25, 0.6, 1.0])),
        all_empty_segment=has_rows and draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return case, draw(st.sampled_from(DTYPES[backend]))


def _fuzz_matches_oracle(backend: str):
    @settings(FUZZ, max_examples=LIMITS[backend][2])
    @given(drawn=op_cases(backend))
    def check(drawn):
        case, dtype = drawn
        args = case.tensors(dtype)
        y_before = args.y.clone()
        out = ops.multi_lora(*args, backend=backend)
        assert out is args.y
        assert_matches_reference(y_before, args.y, args, dtype, backend, case=case)

    return check


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_matches_the_float64_oracle(backend):
    _fuzz_matches_oracle(backend)()


@st.composite
def overlapping_calls(draw):
    """A case with rows and adapters, an input for y to overlap, by how many bytes, which side first."""
    seg_lengths = tuple(draw(st.lists(st.integers(0, 8), min_size=1, max_size=4)))
    if not any(seg_lengths):
        seg_lengths += (draw(st.integers(1, 8)),)
    case = OpCase(d_in=draw(st.integers(1, 24)), d_out=draw(st.integers(1, 24)), N=draw(st.integers(1, 4)),
                  r=draw(st.integers(1, 8)), K=draw(st.integers(1, 3)), seg_lengths=seg_lengths,
                  offset=draw(st.integers(0, 2)), seed=draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16)))
    name = draw(st.sampled_from(ALIASABLE))
    overlap_bytes = draw(st.one_of(st.integers(1, 16), st.just(1 << 30)))  # a sliver, or from the start
    return case, dtype, name, overlap_bytes, draw(st.booleans())


@settings(FUZZ, max_examples=150)
@given(drawn=overlapping_calls())
def test_fuzz_overlap_is_refused_everywhere(drawn):
    case, dtype, name, overlap_bytes, y_first = drawn
    args = alias_y(case.tensors(dtype), name, overlap_bytes, y_first)
    buffer = args.y.untyped_storage()
    before = bytes(buffer)
    for backend in BACKENDS:
        with pytest.raises(MultiLoRAArgumentError, match=f"`y` overlaps `{name}` in memory"):
            ops.multi_lora(*args, backend=backend)
    assert bytes(buffer) == before, "a refused call changed memory"
