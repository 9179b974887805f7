"""Inputs the op must refuse on every backend rather than compute something wrong.

- y overlapping any input in memory (PyTorch's out= rule): the kernels read x, lora_a, lora_b and
  the routing tensors while they write y, so a partial overlap gives a silently wrong delta.
- tensors that require grad while grad mode is on: the op is inference-only (in place, no backward),
  so autograd would drop the LoRA term from the gradient.
Both are refused by ``ops.multi_lora`` (all backends), by the compiled op called directly, and by
the Triton launcher.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import ALIASABLE, OpCase, OpTensors, alias_y, assert_matches_reference

from dlp_lora import ops
from dlp_lora.ops import MultiLoRAArgumentError

BACKENDS = [b for b in ("reference", "cpp", "triton") if b in ops.available_backends("cpu")]
# d_in == d_out so that x and y can be views of one buffer
CASE = OpCase(d_in=24, d_out=24, N=3, r=4, K=2, seg_lengths=(3, 0, 5), seed=11, empty_slot_prob=0.0)


def _aliased(name: str, shift: int) -> OpTensors:
    """The case's fp32 tensors with y sharing ``shift`` elements' worth of bytes with input ``name``."""
    return alias_y(CASE.tensors(torch.float32), name, overlap_bytes=4 * shift)


OVERLAPS = [(name, 1) for name in ALIASABLE] + [("x", CASE.T * 24), ("lora_a", 3 * 4 * 24)]


def _overlap_id(p):
    return f"{p[0]}-shift{p[1]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, shift", OVERLAPS, ids=[_overlap_id(p) for p in OVERLAPS])
def test_overlap_of_y_and_an_input_is_refused(backend, name, shift):
    args = _aliased(name, shift)
    with pytest.raises(MultiLoRAArgumentError, match=f"`y` overlaps `{name}` in memory"):
        ops.multi_lora(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_y_is_x_is_refused(backend):
    args = CASE.tensors(torch.float32)
    with pytest.raises(MultiLoRAArgumentError, match="`y` overlaps `x`"):
        ops.multi_lora(args.x, *args[1:], backend=backend)


def test_the_sliced_buffer_example_is_refused():
    """The silently wrong case: x = buf[:T], y = buf[1:] (max error ~27 before the check)."""
    T, d = 200, 64
    buf = torch.randn(T + 1, d)
    x, y = buf[:T], buf[1:]
    a, b = torch.randn(2, 8, d), torch.randn(2, d, 8)
    seg = torch.tensor([0, T], dtype=torch.int32)
    ids, w = torch.tensor([[0, 1]], dtype=torch.int32), torch.ones(1, 2)
    with pytest.raises(MultiLoRAArgumentError, match="overlaps"):
        ops.multi_lora(y, x, a, b, seg, ids, w, backend="cpp")


def test_disjoint_views_of_one_buffer_are_fine():
    """Sharing a storage is not overlapping: y right after x in one buffer is accepted and exact."""
    args = CASE.tensors(torch.float32)
    T, d = args.x.shape
    buf = torch.cat([args.x.flatten(), args.y.flatten()])
    x, y = buf[: T * d].view(T, d), buf[T * d :].view(T, d)
    y_before = y.clone()
    ops.multi_lora(y, x, *args[2:], backend="cpp")
    assert_matches_reference(y_before, y, OpTensors(y, x, *args[2:]), torch.float32, "cpp")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("name, shift", OVERLAPS, ids=[_overlap_id(p) for p in OVERLAPS])
def test_compiled_op_refuses_overlap_when_called_directly(name, shift):
    args = _aliased(name, shift)
    with pytest.raises(RuntimeError, match=f"`y` overlaps `{name}` in memory"):
        torch.ops.dlp_lora.multi_lora(*args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not usable here")
@pytest.mark.parametrize("name", ["x", "lora_b", "lora_ids"])
def test_triton_launcher_refuses_overlap(name):
    from dlp_lora.triton_kernels.multi_lora import multi_lora_triton

    with pytest.raises(ValueError, match=f"`y` overlaps `{name}` in memory"):
        multi_lora_triton(*_aliased(name, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["y", "x", "lora_a", "lora_b"])
def test_requires_grad_is_refused_in_grad_mode(backend, name):
    args = CASE.tensors(torch.float32)._asdict()
    args[name].requires_grad_(True)
    with pytest.raises(MultiLoRAArgumentError, match=f"`{name}` requires grad.*inference-only"):
        ops.multi_lora(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_requires_grad_is_fine_without_grad_mode(backend, mode):
    args = CASE.tensors(torch.float32)
    y_before = args.y.clone()
    for t in (args.x, args.lora_a, args.lora_b):
        t.requires_grad_(True)
    with mode():
        ops.multi_lora(*args, backend=backend)
    assert_matches_reference(y_before, args.y.detach(), args, torch.float32, backend)
