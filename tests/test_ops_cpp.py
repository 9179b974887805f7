"""The `cpp` backend (compiled CPU kernel, torch.ops.dlp_lora.multi_lora) and its registration.

Every path of the kernel is compared with the float64 oracle on the shared sweep (tests/op_cases.py):
the fused decode loops under each instruction set this CPU has (AVX-512 / AVX2 / generic C++), the
gather+GEMM prefill path, and the default per-length mix of the two. Tolerances: op_cases.TOLERANCES.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from op_cases import CASE_SWEEP, PATTERNS, OpCase, assert_matches_reference, reference_delta

from dlp_lora import ops
from dlp_lora.ops import MultiLoRAArgumentError
from dlp_lora.ops._extension import load_extension

_C = load_extension()
pytestmark = pytest.mark.skipif(_C is None, reason=f"compiled extension not built ({ops.extension_error()})")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("fp32", "fp16", "bf16")
ISAS = ("avx512", "avx2", "generic")
NEVER, ALWAYS = 1 << 30, 1  # gemm_min_rows: fused loops only / gather+GEMM only


@contextlib.contextmanager
def kernel_path(isa: str = "auto", gemm_min_rows: int = 0):
    """Force the CPU kernel's instruction set and prefill threshold, restoring the defaults after."""
    if not _C.set_cpu_isa(isa):
        pytest.skip(f"this CPU has no {isa}")
    previous = _C.set_gemm_min_rows(gemm_min_rows)
    try:
        yield
    finally:
        _C.set_gemm_min_rows(previous)
        _C.set_cpu_isa("auto")


def run_cpp(args) -> torch.Tensor:
    """y after ops.multi_lora(..., backend='cpp') on a copy; the inputs stay as they were."""
    y = args.y.clone()
    ops.multi_lora(y, *args[1:], backend="cpp")
    return y


# --- correctness against the oracle -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASE_SWEEP, ids=lambda c: c.id)
def test_sweep_matches_reference(case, dtype):
    args = case.tensors(dtype)
    assert_matches_reference(args.y, run_cpp(args), args, dtype, "cpp", case=case)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "isa, gemm_min_rows",
    [(isa, NEVER) for isa in ISAS] + [("auto", ALWAYS)],
    ids=[f"fused-{isa}" for isa in ISAS] + ["gemm"],
)
def test_every_kernel_path_matches_reference(isa, gemm_min_rows, dtype):
    """The whole sweep through one path; T=300 decode cases run 300 fused segments of one token."""
    with kernel_path(isa, gemm_min_rows):
        assert _C.cpu_isa() == isa or isa == "auto"
        for case in CASE_SWEEP:
            args = case.tensors(dtype)
            assert_matches_reference(args.y, run_cpp(args), args, dtype, f"cpp[{isa}]", case=case)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("r", [4, 8, 16, 32, 64])
def test_specialised_ranks(r, dtype):
    """Ranks with unrolled / packed-row expand loops; d_out = 2 full 16-row blocks + a tail; K = 9 slots
    exceeds the packed loop's stack patterns (falls back), K = 3 does not."""
    for K in (3, 9):
        case = OpCase(48, 40, 12, r, K, (1, 1, 2, 0, 3), pattern="zipf", empty_slot_prob=0.2, seed=r + K)
        args = case.tensors(dtype)
        with kernel_path("auto", NEVER):
            assert_matches_reference(args.y, run_cpp(args), args, dtype, "cpp", case=case)


def test_thread_count_does_not_change_fused_results():
    """Work is split by rows of A and blocks of outputs, never inside a sum: bitwise the same on 1 thread."""
    case = OpCase(1024, 520, 30, 16, 3, (1,) * 24 + (5, 0, 7), pattern="skewed", seed=5)
    args = case.tensors(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        with kernel_path("auto", NEVER):
            torch.set_num_threads(1)
            single = run_cpp(args)
            torch.set_num_threads(max(2, threads))
            multi = run_cpp(args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


def test_in_place_contract():
    case = CASE_SWEEP[7]  # offset rows, empty segments, -1 slots
    args = case.tensors(torch.bfloat16)
    inputs_before = [t.clone() for t in args[1:]]
    y = args.y.clone()
    ptr = y.data_ptr()
    out = ops.multi_lora(y, *args[1:], backend="cpp")
    assert out is y and y.data_ptr() == ptr
    for before, after in zip(inputs_before, args[1:], strict=True):
        assert torch.equal(before, after), "an input other than y was modified"
    assert_matches_reference(args.y, y, args, torch.bfloat16, "cpp", case=case)
    # the raw compiled op returns nothing and also updates in place
    y2 = args.y.clone()
    assert torch.ops.dlp_lora.multi_lora(y2, *args[1:]) is None
    assert torch.equal(y2, y)


def test_kernel_paths_agree_on_fp32_decode():
    """AVX-512, AVX2 and generic loops differ only in summation order: fp32 results agree to ~1e-5."""
    args = CASE_SWEEP[5].tensors(torch.float32)
    results = []
    for isa in ISAS:
        with kernel_path(isa, NEVER):
            results.append(run_cpp(args))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seg_lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    offset=st.integers(0, 3),
    d_in=st.integers(1, 80),
    d_out=st.integers(1, 80),
    N=st.integers(1, 9),
    r=st.integers(1, 20),
    K=st.integers(1, 4),
    pattern=st.sampled_from(PATTERNS),
    empty_slot_prob=st.sampled_from([0.0, 0.3, 1.0]),
    dtype=st.sampled_from(DTYPES),
    gemm_min_rows=st.sampled_from([0, 1, 5, NEVER]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_shape_space(seg_lengths, offset, d_in, d_out, N, r, K, pattern, empty_slot_prob, dtype,
                          gemm_min_rows, seed):
    case = OpCase(d_in, d_out, N, r, K, tuple(seg_lengths), offset=offset, pattern=pattern,
                  empty_slot_prob=empty_slot_prob, seed=seed)
    args = case.tensors(dtype)
    with kernel_path("auto", gemm_min_rows):
        y = run_cpp(args)
    assert_matches_reference(args.y, y, args, dtype, "cpp", case=case, delta=reference_delta(args))


def test_degenerate_shapes_do_nothing():
    """T = 0, S = 0, or every slot empty: y untouched, no crash."""
    for case in (OpCase(8, 8, 2, 4, 2, (0, 0)), OpCase(8, 8, 2, 4, 2, (3,), empty_slot_prob=1.0)):
        args = case.tensors(torch.float32)
        assert torch.equal(run_cpp(args), args.y)
    y, x = torch.randn(4, 8), torch.randn(4, 8)
    a, b = torch.randn(2, 4, 8), torch.randn(2, 8, 4)
    seg = torch.tensor([4], dtype=torch.int32)  # S = 0 segments, all 4 rows outside
    ids, w = torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2)
    y0 = y.clone()
    torch.ops.dlp_lora.multi_lora(y, x, a, b, seg, ids, w)
    assert torch.equal(y, y0)


# --- bad input: named before the kernel runs, and never a crash in a direct call ---------------

def _base():
    return list(OpCase(12, 10, 3, 4, 2, (4, 0, 5), seed=3, empty_slot_prob=0.0).tensors(torch.float32))


def _set(i, make):
    def mutate(c):
        c[i] = make(c)
    return mutate


BAD_INPUTS = [
    ("id >= N", _set(5, lambda c: torch.tensor([[0, 3], [1, 1], [0, 0]], dtype=torch.int32)), "lora_ids"),
    ("id far past N", _set(5, lambda c: torch.tensor([[0, 2**31 - 1], [1, 1], [0, 0]], dtype=torch.int32)),
     "lora_ids"),
    ("id < -1", _set(5, lambda c: torch.tensor([[0, -2], [1, 1], [0, 0]], dtype=torch.int32)), "lora_ids"),
    ("seg_indptr decreasing", _set(4, lambda c: torch.tensor([0, 5, 4, 9], dtype=torch.int32)), "seg_indptr"),
    ("seg_indptr short of T", _set(4, lambda c: torch.tensor([0, 4, 4, 8], dtype=torch.int32)), "seg_indptr"),
    ("seg_indptr past T", _set(4, lambda c: torch.tensor([0, 4, 4, 10], dtype=torch.int32)), "seg_indptr"),
    ("seg_indptr negative", _set(4, lambda c: torch.tensor([-1, 4, 4, 9], dtype=torch.int32)), "seg_indptr"),
    ("seg_indptr int64", _set(4, lambda c: c[4].long()), "seg_indptr"),
    ("lora_ids int64", _set(5, lambda c: c[5].long()), "lora_ids"),
    ("lora_weights float64", _set(6, lambda c: c[6].double()), "lora_weights"),
    ("lora_a dtype", _set(2, lambda c: c[2].half()), "lora_a"),
    ("lora_b dtype", _set(3, lambda c: c[3].bfloat16()), "lora_b"),
    ("y dtype", _set(0, lambda c: c[0].half()), "y"),
    ("lora_a d_in", _set(2, lambda c: c[2][:, :, :5].contiguous()), "lora_a"),
    ("lora_b rank", _set(3, lambda c: c[3][:, :, :2].contiguous()), "lora_b"),
    ("lora_b N", _set(3, lambda c: c[3][:2].contiguous()), "lora_b"),
    ("y rows", _set(0, lambda c: c[0][:5].contiguous()), "y"),
    ("x non-contiguous", _set(1, lambda c: c[1].T.contiguous().T), "x"),
    ("lora_a non-contiguous", _set(2, lambda c: c[2].transpose(0, 1).contiguous().transpose(0, 1)), "lora_a"),
    ("y non-contiguous", _set(0, lambda c: torch.randn(10, 9).T), "y"),
    ("lora_weights shape", _set(6, lambda c: c[6][:2].contiguous()), "lora_weights"),
    ("lora_ids rows", _set(5, lambda c: c[5][:2].contiguous()), "lora_ids"),
    ("x integer", _set(1, lambda c: c[1].to(torch.int64)), "x"),
    ("x 3-D", _set(1, lambda c: c[1][None]), "x"),
    ("lora_b on meta", _set(3, lambda c: c[3].to("meta")), "lora_b"),
]


@pytest.mark.parametrize("mutate, arg", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_named_before_kernel(mutate, arg):
    case = _base()
    mutate(case)
    y_before = case[0].clone() if case[0].device.type == "cpu" else None
    with pytest.raises(MultiLoRAArgumentError, match=f"`{arg}`"):
        ops.multi_lora(*case, backend="cpp")
    if y_before is not None:
        assert torch.equal(case[0], y_before), "y was modified before the error"


@pytest.mark.parametrize("mutate, arg", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_direct_call_raises(mutate, arg):
    """The compiled op re-checks on its own: a direct call raises (naming the argument), never segfaults."""
    case = _base()
    mutate(case)
    y_before = case[0].clone() if case[0].device.type == "cpu" else None
    # RuntimeError from the C++ TORCH_CHECK; a meta tensor routes to the fake impl, which validates too
    with pytest.raises((RuntimeError, MultiLoRAArgumentError), match=f"`{arg}`"):
        torch.ops.dlp_lora.multi_lora(*case)
    if y_before is not None:
        assert torch.equal(case[0], y_before)


@pytest.mark.parametrize("index, arg", [(0, "y"), (2, "lora_a"), (5, "lora_ids")])
def test_non_tensor_argument_is_named(index, arg):
    """The door leaves type checks to the op's schema; its error still names the argument."""
    case = _base()
    case[index] = case[index].tolist()
    with pytest.raises(MultiLoRAArgumentError, match=f"argument '{arg}'"):
        ops.multi_lora(*case, backend="cpp")


def test_float64_is_reference_only():
    args = CASE_SWEEP[1].tensors(torch.float64)
    with pytest.raises(MultiLoRAArgumentError, match="float64"):
        ops.multi_lora(*args, backend="cpp")
    with pytest.raises(RuntimeError, match="`x`"):
        torch.ops.dlp_lora.multi_lora(*args)


# --- registration: opcheck, torch.compile ---------------------------------------------------------

@pytest.mark.parametrize("case", [CASE_SWEEP[3], CASE_SWEEP[6]], ids=["fused", "gemm"])
def test_opcheck_compiled_op(case):
    args = tuple(case.tensors(torch.float32))
    torch.library.opcheck(torch.ops.dlp_lora.multi_lora.default, args)


def test_opcheck_op_of_the_python_backends():
    """The registered op that traced forwards run for the reference and triton backends."""
    args = tuple(CASE_SWEEP[3].tensors(torch.bfloat16))
    torch.library.opcheck(torch.ops.dlp_lora.multi_lora_python.default, (*args, "reference"))


@pytest.mark.parametrize(
    "backend, compiler",
    [("cpp", "aot_eager"), (None, "aot_eager"), pytest.param(None, "inductor", marks=pytest.mark.slow)],
)
def test_torch_compile_fullgraph(backend, compiler, monkeypatch):
    monkeypatch.delenv("DLP_LORA_BACKEND", raising=False)

    def lora_linear(y, x, a, b, seg, ids, w):
        ops.multi_lora(y, x, a, b, seg, ids, w, backend=backend)
        return y * 2

    args = CASE_SWEEP[3].tensors(torch.float32)
    compiled = torch.compile(lora_linear, fullgraph=True, backend=compiler)
    y_compiled, y_eager = args.y.clone(), args.y.clone()
    out = compiled(y_compiled, *args[1:])
    expected = lora_linear(y_eager, *args[1:])
    assert torch.equal(y_compiled, y_eager) and torch.equal(out, expected)
    assert not torch.equal(y_compiled, args.y)


# --- backend choice ---------------------------------------------------------------------------------

def _record_backends(monkeypatch):
    used = []
    real = ops.get_kernel

    def spy(name):
        used.append(name)
        return real(name)

    monkeypatch.setattr(ops, "get_kernel", spy)
    return used


def test_cpp_is_the_cpu_default_and_forcible(monkeypatch):
    monkeypatch.delenv("DLP_LORA_BACKEND", raising=False)
    used = _record_backends(monkeypatch)
    args = CASE_SWEEP[1].tensors(torch.float32)
    assert "cpp" in ops.available_backends("cpu")
    ops.multi_lora(args.y.clone(), *args[1:])
    ops.multi_lora(args.y.clone(), *args[1:], backend="reference")
    ops.multi_lora(args.y.clone(), *args[1:], backend="cpp")
    assert used == ["cpp", "reference", "cpp"]


def test_backend_forced_by_env_var(monkeypatch):
    used = _record_backends(monkeypatch)
    args = CASE_SWEEP[1].tensors(torch.float32)
    monkeypatch.setenv("DLP_LORA_BACKEND", "reference")
    ops.multi_lora(args.y.clone(), *args[1:])
    monkeypatch.setenv("DLP_LORA_BACKEND", "cpp")
    ops.multi_lora(args.y.clone(), *args[1:])
    ops.multi_lora(args.y.clone(), *args[1:], backend="reference")  # the argument wins over the env var
    assert used == ["reference", "cpp", "reference"]
    monkeypatch.setenv("DLP_LORA_BACKEND", "fastest")
    with pytest.raises(MultiLoRAArgumentError, match="`backend`"):
        ops.multi_lora(args.y.clone(), *args[1:])


def test_cpu_isa_knob():
    assert _C.cpu_isa() in ISAS
    assert _C.set_cpu_isa("generic") and _C.cpu_isa() == "generic"
    assert not _C.set_cpu_isa("sse9") and _C.cpu_isa() == "generic"
    assert _C.set_cpu_isa("auto")


# --- a missing extension -----------------------------------------------------------------------------

_NO_EXTENSION = textwrap.dedent("""
    import sys, warnings
    import torch

    class BlockCompiledExtension:  # behaves like a wheel built with DLP_LORA_SKIP_EXT=1
        def find_spec(self, name, path=None, target=None):
            if name == "dlp_lora._C":
                raise ImportError("dlp_lora._C blocked by the test")
            return None

    sys.meta_path.insert(0, BlockCompiledExtension())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import dlp_lora
        from dlp_lora import ops
        backends = ops.available_backends("cpu")
        y, x = torch.zeros(3, 4), torch.randn(3, 4)
        a, b = torch.randn(2, 2, 4), torch.randn(2, 4, 2)
        seg, w = torch.tensor([0, 3], dtype=torch.int32), torch.ones(1, 2)
        ids = torch.tensor([[1, -1]], dtype=torch.int32)
        ops.multi_lora(y, x, a, b, seg, ids, w)
        ops.multi_lora(y, x, a, b, seg, ids, w)
        expected = x @ a[1].T @ b[1].T * 2
        assert torch.allclose(y, expected, atol=1e-5), "fallback gave a wrong result"
        try:
            ops.multi_lora(y, x, a, b, seg, ids, w, backend="cpp")
            raise AssertionError("forcing cpp without the extension must fail")
        except RuntimeError as exc:
            assert "blocked by the test" in str(exc), exc
    ours = [str(c.message) for c in caught if "dlp_lora._C" in str(c.message)]
    assert len(ours) == 1, ours
    assert "'reference'" in ours[0], ours[0]
    assert "cpp" not in backends and "reference" in backends, backends
    print("fallback ok")
""")


def test_missing_extension_falls_back_and_warns_once():
    proc = subprocess.run([sys.executable, "-c", _NO_EXTENSION], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fallback ok" in proc.stdout
