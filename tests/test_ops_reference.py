"""The oracle itself, and the op's argument validation (backend-independent)."""

import pytest
import torch

from dlp_lora import ops
from dlp_lora.ops import MultiLoRAArgumentError


def make_case(T=9, d_in=12, d_out=10, N=3, r=4, K=2, bounds=(0, 4, 4, 9), dtype=torch.float64):
    S = len(bounds) - 1
    x = torch.randn(T, d_in, dtype=dtype)
    a = torch.randn(N, r, d_in, dtype=dtype)
    b = torch.randn(N, d_out, r, dtype=dtype)
    seg = torch.tensor(bounds, dtype=torch.int32)
    ids = torch.randint(-1, N, (S, K), dtype=torch.int32)
    w = torch.rand(S, K, dtype=torch.float32) + 0.1
    y = torch.randn(T, d_out, dtype=dtype)
    return y, x, a, b, seg, ids, w


def test_reference_matches_dense_formula():
    y, x, a, b, seg, ids, w = make_case()
    y0 = y.clone()
    ops.multi_lora(y, x, a, b, seg, ids, w, backend="reference")
    expect = y0.clone()
    for s in range(len(seg) - 1):
        lo, hi = int(seg[s]), int(seg[s + 1])
        for k in range(ids.shape[1]):
            i = int(ids[s, k])
            if i >= 0:
                expect[lo:hi] += float(w[s, k]) * (x[lo:hi] @ a[i].T @ b[i].T)
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)
    assert not torch.equal(y, y0)


def test_rows_outside_segments_untouched():
    y, x, a, b, _, _, _ = make_case(T=9)
    # rows 0-1 precede the first segment; segment 1 (rows 5-8) has only empty slots
    seg = torch.tensor([2, 5, 9], dtype=torch.int32)
    ids = torch.tensor([[0, 1], [-1, -1]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.25], [1.0, 1.0]])
    y0 = y.clone()
    ops.multi_lora(y, x, a, b, seg, ids, w, backend="reference")
    assert torch.equal(y[:2], y0[:2]) and torch.equal(y[5:], y0[5:])
    assert not torch.equal(y[2:5], y0[2:5])


@pytest.mark.parametrize(
    "mutate, arg",
    [
        (lambda c: c.__setitem__(5, torch.tensor([[0, 3], [1, 1], [0, 0]], dtype=torch.int32)), "lora_ids"),
        (lambda c: c.__setitem__(5, torch.tensor([[0, -2], [1, 1], [0, 0]], dtype=torch.int32)), "lora_ids"),
        (lambda c: c.__setitem__(4, torch.tensor([0, 5, 4, 9], dtype=torch.int32)), "seg_indptr"),
        (lambda c: c.__setitem__(4, torch.tensor([0, 4, 4, 8], dtype=torch.int32)), "seg_indptr"),
        (lambda c: c.__setitem__(4, torch.tensor([0, 4, 4, 9], dtype=torch.int64)), "seg_indptr"),
        (lambda c: c.__setitem__(5, c[5].long()), "lora_ids"),
        (lambda c: c.__setitem__(6, c[6].double()), "lora_weights"),
        (lambda c: c.__setitem__(2, c[2].float()), "lora_a"),
        (lambda c: c.__setitem__(3, c[3][:, :, :2].contiguous()), "lora_b"),
        (lambda c: c.__setitem__(2, c[2][:, :, :5].contiguous()), "lora_a"),
        (lambda c: c.__setitem__(0, c[0][:5]), "y"),
        (lambda c: c.__setitem__(1, torch.randn(12, 9, dtype=torch.float64).T), "x"),
        (lambda c: c.__setitem__(6, c[6][:2]), "lora_weights"),
        (lambda c: c.__setitem__(5, c[5][:2]), "lora_ids"),
        (lambda c: c.__setitem__(1, c[1].to(torch.int64)), "x"),
    ],
)
def test_bad_arguments_are_named(mutate, arg):
    case = list(make_case())
    mutate(case)
    with pytest.raises(MultiLoRAArgumentError, match=f"`{arg}`"):
        ops.multi_lora(*case, backend="reference")


def test_unknown_backend_named():
    with pytest.raises(MultiLoRAArgumentError, match="`backend`"):
        ops.multi_lora(*make_case(), backend="nope")


def test_available_backends_lists_reference():
    assert "reference" in ops.available_backends()
    assert ops.resolve_backend(torch.device("cpu"), "reference") == "reference"
