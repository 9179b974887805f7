"""Triton backend vs the float64 oracle, on the shared sweep of tests/op_cases.py.

Without a GPU the kernels run on CPU tensors in the Triton interpreter (conftest sets
TRITON_INTERPRET=1); with a GPU the same tests run on it. The interpreter pays per program and
per op, so this file is sized for it: the whole sweep in fp32 and fp16 (one-token-per-segment
cases with hundreds of segments are the slow ones), bf16 on a few cases, and small forced tile
configurations to reach the split-K, multi-round segment search and multi-lane paths that the
default interpreter tiles skip.

Tolerances: op_cases.TOLERANCES["triton"] (fp32 1e-5 rel-RMS; fp16/bf16 dominated by the final
rounding of y). The interpreter's fp32->bf16 store truncates instead of rounding to nearest
(<= 1 bf16 ulp), which the bf16 bound covers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from op_cases import CASE_SWEEP, OpCase, assert_matches_reference

from dlp_lora import ops
from dlp_lora._env import triton_interpret

pytestmark = pytest.mark.skipif("triton" not in ops.available_backends(),
                                reason="triton is not importable (or no GPU and TRITON_INTERPRET unset)")

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpret() else "cpu"
SWEEP_IDS = [case.id for case in CASE_SWEEP]


def _run_and_check(case: OpCase, dtype: torch.dtype, config=None) -> None:
    args = case.tensors(dtype, device=DEVICE)
    y_before = args.y.clone()
    if config is None:
        out = ops.multi_lora(*args, backend="triton")
        assert out is args.y
    else:
        from dlp_lora.triton_kernels.multi_lora import multi_lora_triton

        multi_lora_triton(*args, config=config)
    assert_matches_reference(y_before, args.y, args, dtype, "triton", case=case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASE_SWEEP, ids=SWEEP_IDS)
def test_sweep_matches_reference(case, dtype):
    _run_and_check(case, dtype)


@pytest.mark.parametrize("case", [c for c in CASE_SWEEP if c.S <= 8][:4], ids=lambda c: c.id)
def test_bf16_matches_reference(case):
    _run_and_check(case, torch.bfloat16)


def _small_tiles(**kw):
    from dlp_lora.triton_kernels.multi_lora import LaunchConfig

    return LaunchConfig(block_k=16, block_c=16, num_warps=1, num_stages=1, **kw)


# 20 segments (empty ones, one long) over 42 rows with 2 leading rows outside every segment:
# with 16-row tiles a tile holds up to 15 segments, more than the 4 lanes and the 16 probes.
_MANY_SEGMENTS = OpCase(d_in=72, d_out=40, N=26, r=8, K=3, offset=2, pattern="zipf", seed=21,
                        seg_lengths=(3, 0, 1, 1, 17, 0, 0, 2, 1, 1, 1, 5, 0, 1, 1, 1, 1, 1, 2, 1))


@pytest.mark.parametrize(
    "dtype, tiles",
    [
        # 3-way split-K over d_in=72 (the last split is short), 2 column blocks for K*r=24,
        # 3 output blocks for d_out=40, 4 lanes per tile, 2-round segment search.
        (torch.float32, dict(block_m=16, block_n=16, split_k=3, probes=16, lanes=4)),
        # one lane walking every segment of a 32-row tile.
        (torch.float16, dict(block_m=32, block_n=32, split_k=2, probes=16, lanes=1)),
    ],
    ids=["split3-lanes4", "split2-lanes1"],
)
def test_forced_tiles_match_reference(dtype, tiles):
    _run_and_check(_MANY_SEGMENTS, dtype, config=_small_tiles(**tiles))


# No shrink phase: under the interpreter shrinking a failure takes minutes; the failing
# example is reported as drawn.
@pytest.mark.parametrize("case", [CASE_SWEEP[2], CASE_SWEEP[7]], ids=lambda c: c.id)
def test_gpu_heuristic_tiles_match_reference(case):
    """The tiles choose_config picks for a GPU (16-row decode tiles, lanes), run here."""
    from dlp_lora.triton_kernels.multi_lora import choose_config

    config = choose_config(case.T, case.S, case.K, case.r, case.d_in, case.d_out, torch.float16,
                           torch.device("cuda", 0), num_sms=8)
    _run_and_check(case, torch.float16, config=config)


@settings(max_examples=25, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(
    seg_lengths=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    offset=st.integers(0, 3),
    d_in=st.integers(1, 80),
    d_out=st.integers(1, 80),
    N=st.integers(1, 5),
    r=st.integers(1, 20),
    K=st.integers(1, 4),
    pattern=st.sampled_from(["distinct", "identical", "zipf", "skewed"]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_shapes(seg_lengths, offset, d_in, d_out, N, r, K, pattern, dtype, seed):
    case = OpCase(d_in, d_out, N, r, K, tuple(seg_lengths), offset=offset, pattern=pattern, seed=seed)
    _run_and_check(case, dtype)


def test_strided_rows_in_place_and_deterministic():
    """x and y may be row-strided views (e.g. slices of a fused QKV buffer): only y's view
    changes, bit-identically across calls (no atomics)."""
    from dlp_lora.triton_kernels.multi_lora import multi_lora_triton

    case = CASE_SWEEP[7]
    args = case.tensors(torch.float32, device=DEVICE)
    y_buf = torch.randn(case.T, case.d_out + 5, device=DEVICE)
    x_buf = torch.zeros(case.T, case.d_in + 3, device=DEVICE)
    x_buf[:, 1:1 + case.d_in] = args.x
    y_buf_before = y_buf.clone()
    cols = slice(2, 2 + case.d_out)
    y_view, x_view = y_buf[:, cols], x_buf[:, 1:1 + case.d_in]
    multi_lora_triton(y_view, x_view, *args[2:])
    outside = torch.ones(case.d_out + 5, dtype=torch.bool)
    outside[cols] = False
    assert torch.equal(y_buf[:, outside], y_buf_before[:, outside])
    assert_matches_reference(y_buf_before[:, cols], y_view, args, torch.float32, "triton", case=case)
    again = y_buf_before.clone()
    multi_lora_triton(again[:, cols], x_view, *args[2:])
    assert torch.equal(again, y_buf)


def test_nan_weight_of_empty_slot_is_ignored():
    case = CASE_SWEEP[3]
    args = case.tensors(torch.float32, device=DEVICE)
    assert (args.lora_ids < 0).any()
    args.lora_weights[args.lora_ids < 0] = float("nan")
    y_before = args.y.clone()
    ops.multi_lora(*args, backend="triton")
    assert_matches_reference(y_before, args.y, args, torch.float32, "triton", case=case)


@pytest.mark.parametrize("T, bounds, K", [(0, [0], 2), (5, [5], 2), (4, [0, 4], 0)],
                         ids=["no-tokens", "no-segments", "no-slots"])
def test_degenerate_shapes_leave_y_alone(T, bounds, K):
    S = len(bounds) - 1
    y = torch.randn(T, 6, device=DEVICE)
    y_before = y.clone()
    seg_indptr = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    ops.multi_lora(y, torch.randn(T, 5, device=DEVICE), torch.randn(3, 4, 5, device=DEVICE),
                   torch.randn(3, 6, 4, device=DEVICE), seg_indptr,
                   torch.zeros(S, K, dtype=torch.int32, device=DEVICE), torch.ones(S, K, device=DEVICE),
                   backend="triton")
    assert torch.equal(y, y_before)


def test_bad_launch_config_is_named():
    from dlp_lora.triton_kernels.multi_lora import LaunchConfig

    with pytest.raises(ValueError, match="block_m"):
        LaunchConfig(block_m=24)
    with pytest.raises(ValueError, match="split_k"):
        LaunchConfig(split_k=0)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from dlp_lora.triton_kernels.multi_lora import multi_lora_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = CASE_SWEEP[0].tensors(torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        multi_lora_triton(*args)


def test_gpu_heuristics_split_decode_not_prefill():
    """Decode shapes get 16-row tiles and a split-K shrink; prefill gets 64-row tiles, no split."""
    from dlp_lora.triton_kernels.multi_lora import choose_config

    cuda = torch.device("cuda", 0)
    decode = choose_config(1, 1, 3, 16, 4096, 4096, torch.bfloat16, cuda, num_sms=132)
    assert (decode.block_m, decode.split_k) == (16, 16)
    prefill = choose_config(4096, 1, 3, 16, 4096, 4096, torch.bfloat16, cuda, num_sms=132)
    assert (prefill.block_m, prefill.split_k, prefill.lanes) == (64, 2, 2)
    batch = choose_config(64, 64, 3, 16, 4096, 4096, torch.bfloat16, cuda, num_sms=132)
    assert (batch.block_m, batch.split_k, batch.lanes) == (16, 2, 16)


# Compiles the real (non-interpreted) kernels for sm_90 in a subprocess without TRITON_INTERPRET:
# frontend type errors (e.g. a loop-carried variable that is a constexpr on one path) and
# lowering failures only show up there, and no GPU is needed to find them.
_COMPILE_FOR_HOPPER = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dlp_lora.triton_kernels import multi_lora as m

def compile_for_sm90(kernel, pointers, ints, constexprs):
    signature = {name: pointers.get(name) or ("i32" if name in ints else "constexpr")
                 for name in kernel.arg_names}
    aligned = list(pointers) + [n for n, v in ints.items() if v % 16 == 0 and n not in m._VARYING]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(kernel, signature, constexprs, attrs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})

for dt, block_m, split in (("bf16", 16, 4), ("fp32", 64, 1)):
    dot = "tf32x3" if dt == "fp32" else "tf32"
    common = dict(T=1, S=1, K=3, R=16, KR=48)
    compile_for_sm90(m._shrink_kernel,
        {"x": "*" + dt, "lora_a": "*" + dt, "seg_indptr": "*i32", "lora_ids": "*i32", "lora_weights": "*fp32",
         "t_buf": "*fp32"}, dict(common, D_IN=4096, x_row_stride=4096, split_len=1024),
        dict(BLOCK_M=block_m, BLOCK_K=64, BLOCK_C=64, NUM_J=16, SPLIT=split, PROBES=32, UPCAST=False,
             PRECISION=dot))
    compile_for_sm90(m._expand_kernel,
        {"y": "*" + dt, "t_buf": "*fp32", "lora_b": "*" + dt, "seg_indptr": "*i32", "lora_ids": "*i32"},
        dict(common, D_OUT=4096, y_row_stride=4096),
        dict(BLOCK_M=block_m, BLOCK_N=128, R_PAD=16, NUM_J=16, SPLIT=split, PROBES=32, PRECISION="tf32x3"))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences Triton 3.9's notice; the default in 3.6
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this Triton cannot compile ahead of time")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.parametrize("name", ["y", "x", "lora_a", "lora_b", "seg_indptr", "lora_ids", "lora_weights"])
def test_raw_launcher_refuses_strided_layouts(name):
    """The raw launcher (no dlp_lora.ops validation in front) names a layout it cannot address."""
    from dlp_lora.triton_kernels.multi_lora import multi_lora_triton

    case = next(c for c in CASE_SWEEP if c.K >= 2 and c.S >= 2)  # no size-1 dims: strided != contiguous
    args = case.tensors(torch.float32, device=DEVICE)._asdict()
    y_before = args["y"].clone()
    tensor = args[name]
    # same shape and values, but strided: every other column of a tensor twice as wide
    wide = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype, device=tensor.device)
    wide[..., ::2] = tensor
    args[name] = wide[..., ::2]
    assert not args[name].is_contiguous()
    with pytest.raises(ValueError, match=f"`{name}`" if name not in ("x", "y") else "`x` and `y`"):
        multi_lora_triton(**args)
    assert torch.equal(args["y"] if name != "y" else tensor, y_before)  # nothing was launched
