"""GPU backends (triton, cuda) vs the float64 oracle, plus capture by torch.compile and CUDA graphs.

Skipped without CUDA. benchmarks/gpu_check.sh runs this file on a bare H100/H200.

Covered, for every GPU backend that is usable on this machine:
  - the shared sweep of tests/op_cases.py in bf16, fp16 and fp32 (tolerances from
    op_cases.TOLERANCES; the triton backend uses 3xTF32 dots for fp32, so it is held to the fp32
    bound, not the TF32 one);
  - LLM-sized decode (64 one-token segments) and prefill (long segments) shapes in bf16;
  - no host synchronisation inside the raw kernel call (torch.cuda sync debug mode = error);
  - the triton backend launches exactly two kernels per call (torch.profiler);
  - torch.compile(fullgraph=True) around ops.multi_lora;
  - CUDA graph capture of torch.ops.dlp_lora.multi_lora, replayed after new routing (other
    segment bounds, ids and weights) is written into the captured tensors.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import CASE_SWEEP, OpCase, assert_matches_reference

from dlp_lora import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = ("triton", "cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# LLM-sized shapes: batch-64 decode with a mixture per token, and a 3-segment prefill (one empty).
DECODE_64 = OpCase(d_in=4096, d_out=4096, N=26, r=16, K=3, seg_lengths=(1,) * 64, pattern="zipf",
                   empty_slot_prob=0.0, seed=31)
PREFILL_2K = OpCase(d_in=4096, d_out=1024, N=100, r=8, K=3, seg_lengths=(700, 0, 1348), pattern="distinct",
                    empty_slot_prob=0.1, seed=32)


def _require(backend: str) -> None:
    if backend not in ops.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} not usable here (available: {ops.available_backends('cuda')}; "
                    f"extension: {ops.extension_error()})")


def _check(case: OpCase, dtype: torch.dtype, backend: str) -> None:
    _require(backend)
    args = case.tensors(dtype, device="cuda")
    y_before = args.y.clone()
    ops.multi_lora(*args, backend=backend)
    torch.cuda.synchronize()
    assert_matches_reference(y_before, args.y, args, dtype, backend, case=case)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASE_SWEEP, ids=[c.id for c in CASE_SWEEP])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sweep_matches_reference(backend, case, dtype):
    _check(case, dtype, backend)


@pytest.mark.parametrize("case", [DECODE_64, PREFILL_2K], ids=["decode64", "prefill2k"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_llm_shapes_match_reference(backend, case):
    _check(case, torch.bfloat16, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kernel_call_never_syncs_with_the_host(backend):
    """The patched model calls the raw kernel once per Linear: no .item()/.tolist() allowed."""
    _require(backend)
    kernel = ops.get_kernel(backend)
    args = DECODE_64.tensors(torch.bfloat16, device="cuda")
    kernel(*args)  # compile / load outside the checked region
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernel(*args)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


def test_triton_launches_two_kernels_per_call():
    _require("triton")
    from torch.profiler import ProfilerActivity, profile

    kernel = ops.get_kernel("triton")
    args = DECODE_64.tensors(torch.bfloat16, device="cuda")
    kernel(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        kernel(*args)
        torch.cuda.synchronize()
    names = sorted(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels (CUPTI unavailable?)")
    assert names == ["_expand_kernel", "_shrink_kernel"], names


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    _require(backend)
    case = CASE_SWEEP[7]
    args = case.tensors(torch.bfloat16, device="cuda")
    y_before = args.y.clone()

    @torch.compile(fullgraph=True)
    def adapted(y, x, a, b, seg, ids, w):
        return ops.multi_lora(y, x, a, b, seg, ids, w, backend=backend)

    out = adapted(*args)
    torch.cuda.synchronize()
    assert out.data_ptr() == args.y.data_ptr()
    assert_matches_reference(y_before, args.y, args, torch.bfloat16, backend, case=case)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_replays_new_routing(backend):
    """Routing lives in device tensors: a captured graph follows new segments, ids and weights."""
    _require(backend)
    first = OpCase(d_in=200, d_out=72, N=26, r=16, K=3, seg_lengths=(5, 0, 20, 7), offset=1, seed=41)
    second = OpCase(d_in=200, d_out=72, N=26, r=16, K=3, seg_lengths=(1, 12, 0, 20), offset=0,
                    pattern="skewed", seed=42)
    assert (first.T, first.S, first.K) == (second.T, second.S, second.K)
    args = first.tensors(torch.bfloat16, device="cuda")
    op = torch.ops.dlp_lora.multi_lora

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (Triton compiles) off the capture
        op(*args, backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(*args, backend)

    new = second.tensors(torch.bfloat16, device="cuda")
    for captured, fresh in zip(args, new, strict=True):
        captured.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(new.y, args.y, new, torch.bfloat16, backend, case=second)
