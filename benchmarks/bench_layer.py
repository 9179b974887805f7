"""One adapted Linear layer, decode and prefill: DLP-LoRA vs MeteoRA-style gating vs PEFT.

    pytest benchmarks/bench_layer.py --benchmark-enable --benchmark-only \
        --benchmark-json=benchmarks/results/layer_cpu_raw.json

(Without --benchmark-enable, pytest runs every case once as a smoke test. On a shared machine,
OMP_NUM_THREADS=1 gives steadier numbers; the thread count is recorded with every case.)

Every case times y = layer(x) for x [T, d_in] and one Linear(d_in, d_out) of the CPU end-to-end
model (up_proj 1024 -> 2816) or a 4096 x 4096 projection, N adapters of rank 8:

  base              the bare nn.Linear
  peft_single       PEFT's LoRA Linear (inject_adapter_in_model), one adapter
  peft_mixed        the same layer holding 8 adapters, ``adapter_names=`` one per row (decode T=8 only)
  dlp               what a patch_model'ed Linear runs per forward: the base GEMM, then one multi_lora
                    call; routing (segments, K=3 ids and weights per sequence) is prepared once
                    per forward for all modules, so it is set up outside the timed call
  meteora_<form>    TokenGatedLoRALinear: a gate Linear(d_in, N) on every token, top-2, then the
                    loop / gather+bmm / op form (dlp_lora.bench.baselines)

Decode: T = 1 (batch 1) and T = 8 (batch 8, one token per sequence, each its own mixture).
Prefill: T = 512 = 8 sequences x 64 tokens, one segment per sequence.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dlp_lora import ops
from dlp_lora.bench.baselines import LoRAStack, TokenGatedLoRALinear

RANK, K_DLP, N_MIXED_PEFT = 8, 3, 8
SHAPES = {"up_1024x2816": (1024, 2816), "proj_4096x4096": (4096, 4096)}
# name -> (tokens, sequences)
PHASES = {"decode_b1": (1, 1), "decode_b8": (8, 8), "prefill_8x64": (512, 8)}
ADAPTER_COUNTS = (26, 100)
VARIANTS = ("base", "peft_single", "peft_mixed", "dlp", "meteora_loop", "meteora_bmm", "meteora_op")


class _Holder(nn.Module):
    """PEFT's inject_adapter_in_model needs a parent module to find the Linear by name."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear


def _peft_layer(base: nn.Linear, n_adapters: int) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    holder = _Holder(base)
    names = [f"task_{i}" for i in range(n_adapters)]
    config = LoraConfig(r=RANK, lora_alpha=16, target_modules=["proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        # adapters 2..n trigger PEFT's "several adapters" warning: several adapters are the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in names:
            inject_adapter_in_model(config, holder, adapter_name=name)
    holder.proj.set_adapter(names[0])
    return holder.proj


def _dlp_call(base: nn.Linear, stack: LoRAStack, tokens: int, sequences: int):
    kernel = ops.get_kernel(ops.resolve_backend(base.weight.device))
    n = stack.lora_a.shape[0]
    generator = torch.Generator().manual_seed(1)
    seg_indptr = torch.linspace(0, tokens, sequences + 1).round().to(torch.int32)
    lora_ids = torch.stack([torch.randperm(n, generator=generator)[:K_DLP] for _ in range(sequences)])
    lora_ids = lora_ids.to(torch.int32)
    lora_weights = torch.softmax(torch.randn(sequences, K_DLP, generator=generator), -1)
    ops.check_multi_lora_args(torch.empty(tokens, base.out_features), torch.empty(tokens, base.in_features),
                              stack.lora_a, stack.lora_b, seg_indptr, lora_ids, lora_weights)

    def forward(x):
        y = base(x)
        kernel(y, x, stack.lora_a, stack.lora_b, seg_indptr, lora_ids, lora_weights)
        return y

    return forward


def _build(variant: str, base: nn.Linear, stack: LoRAStack, tokens: int, sequences: int):
    """A callable x -> y for the variant, or None when the variant does not apply to the case."""
    if variant == "base":
        return base
    if variant == "peft_single":
        return _peft_layer(base, 1)
    if variant == "peft_mixed":
        if sequences != tokens or sequences == 1:
            return None
        layer = _peft_layer(base, N_MIXED_PEFT)
        names = [f"task_{i % N_MIXED_PEFT}" for i in range(sequences)]
        return lambda x: layer(x[:, None, :], adapter_names=names)
    if variant == "dlp":
        return _dlp_call(base, stack, tokens, sequences)
    form = variant.removeprefix("meteora_")
    return TokenGatedLoRALinear(base, stack, form=form, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_adapters", ADAPTER_COUNTS)
@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_layer(benchmark, shape, phase, n_adapters, variant):
    d_in, d_out = SHAPES[shape]
    tokens, sequences = PHASES[phase]
    if variant in ("base", "peft_single", "peft_mixed") and n_adapters != ADAPTER_COUNTS[0]:
        pytest.skip("independent of N: measured once")
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    stack = LoRAStack(torch.randn(n_adapters, RANK, d_in) / d_in**0.5,
                      torch.randn(n_adapters, d_out, RANK) * 0.02, torch.full((n_adapters,), 2.0))
    layer = _build(variant, base, stack, tokens, sequences)
    if layer is None:
        pytest.skip(f"{variant} applies to multi-sequence decode only")
    x = torch.randn(tokens, d_in)
    benchmark.group = f"{shape} {phase}"
    benchmark.extra_info.update(d_in=d_in, d_out=d_out, tokens=tokens, sequences=sequences,
                                n_adapters=n_adapters, rank=RANK, variant=variant,
                                backend=ops.resolve_backend(x.device), threads=torch.get_num_threads())
    with torch.inference_mode():
        if not benchmark.disabled:
            layer(x)  # warm-up: the first call of a shape pays one-off allocator / GEMM setup costs
        out = benchmark(layer, x)
    assert out.reshape(tokens, d_out).shape == (tokens, d_out)
