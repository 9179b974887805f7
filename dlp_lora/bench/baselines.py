"""Token-level gating baselines (MeteoRA-style), the method DLP-LoRA is measured against.

MeteoRA (Xu et al. 2024, arXiv 2405.13053; github.com/NJUDeepEngine/meteora, ``MoELoRA/layer.py``)
gives every targeted Linear its own gate ``Linear(d_in, N, bias=False)``. On every token, in
prefill and in decode, the gate scores the N adapters, keeps the top-2 logits and weights them
with ``softmax(top2 / T)``::

    y[t] = W x[t] + sum_{k<2}  g[t,k] * scale[i_k] * B[i_k] A[i_k] x[t]      i = top2(G x[t])

This module implements that gate and three ways to apply the selected adapters, so the
benchmark can compare DLP-LoRA against the strongest one:

``loop``  (form 1) a Mixtral-style loop over adapters: one-hot mask, ``torch.where`` per adapter,
          two matmuls on the selected tokens, ``index_add_`` (MeteoRA's ``_accelerated_forward_inner_loop``).
          Like transformers' current Mixtral block we only visit adapters that some token selected;
          MeteoRA itself visits all N and skips the empty ones, which is slower for large N.
``bmm``   (form 2) gather the selected A and B per (token, slot), then bmm, bmm and a weighted sum
          (MeteoRA's default "batch" path, ``_moelinear_fwd_inner_bmm_torch_v1``).
``op``    (form 3) our segmented op (dlp_lora.ops) with one-token segments:
          seg_indptr = arange(T+1), lora_ids = top-2 ids, lora_weights = gate weight * scaling.
          This is the fastest way we know to run their method, so the comparison is fair to them.

``patch_token_gating(model, stacks, form=...)`` wraps the named ``nn.Linear`` modules of a model in
place; ``unpatch_token_gating(model)`` restores them. Gates are random (a speed baseline, not a
trained MeteoRA model); the adapters are the same stacked tensors a LoRABank holds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import multi_lora, resolve_backend

__all__ = [
    "FORMS", "LoRAStack", "TokenGatedLoRALinear", "apply_gather_bmm", "apply_loop", "apply_segmented_op",
    "gate_top_k", "patch_token_gating", "stacks_from_bank", "unpatch_token_gating",
]


@dataclass(frozen=True)
class LoRAStack:
    """The N adapters of one module, stacked as the op contract stores them.

    lora_a [N, r, d_in] and lora_b [N, d_out, r] in the model's dtype; scaling [N] float32
    (lora_alpha / r, or / sqrt(r) with rsLoRA).
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: torch.Tensor


def gate_top_k(x: torch.Tensor, gate_weight: torch.Tensor, *, top_k: int = 2,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MeteoRA's gate: top-k of the logits ``x @ gate_weight.T``, then softmax(top / temperature).

    x [T, d_in], gate_weight [N, d_in] (same dtype). Returns lora_ids [T, k] int64 and
    weights [T, k] float32 (each row sums to 1), k = min(top_k, N).
    """
    if temperature <= 0:
        raise ValueError(f"gate_top_k: `temperature` must be > 0, got {temperature}")
    k = min(top_k, gate_weight.shape[0])
    top_logits, lora_ids = torch.topk(F.linear(x, gate_weight), k, dim=-1)
    # As MeteoRA: the softmax runs in float32 over the k kept logits only.
    return lora_ids, F.softmax(top_logits.float() / temperature, dim=-1)


def apply_loop(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, lora_ids: torch.Tensor,
               weights: torch.Tensor) -> None:
    """Form 1, in place: ``y[t] += sum_k weights[t,k] * scale * B A x[t]``, one adapter at a time.

    y [T, d_out], x [T, d_in] (same dtype), lora_ids [T, k] int64, weights [T, k] float32.
    """
    mask = F.one_hot(lora_ids, num_classes=stack.lora_a.shape[0])  # [T, k, N]
    # One host read of the selected ids (free on CPU), then one pass per selected adapter.
    for idx in torch.unique(lora_ids).tolist():
        token_idx, slot_idx = torch.where(mask[:, :, idx])
        coeff = (weights[token_idx, slot_idx] * stack.scaling[idx]).to(x.dtype)[:, None]
        delta = F.linear(F.linear(x[token_idx], stack.lora_a[idx]), stack.lora_b[idx]) * coeff
        y.index_add_(0, token_idx, delta)


def apply_gather_bmm(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, lora_ids: torch.Tensor,
                     weights: torch.Tensor) -> None:
    """Form 2, in place: gather the k selected (A, B) of every token, bmm, bmm, weighted sum.

    Shapes as apply_loop. Memory: T*k copies of A and B, as MeteoRA's batch path.
    """
    T, k = lora_ids.shape
    flat_ids = lora_ids.reshape(-1)
    a_t = stack.lora_a[flat_ids].transpose(1, 2)          # [T*k, d_in, r]
    b_t = stack.lora_b[flat_ids].transpose(1, 2)          # [T*k, r, d_out]
    xs = x[:, None, :].expand(T, k, x.shape[1]).reshape(T * k, 1, x.shape[1])
    coeff = (weights.reshape(-1) * stack.scaling[flat_ids]).to(x.dtype)[:, None]
    delta = torch.bmm(torch.bmm(xs, a_t), b_t).squeeze(1) * coeff   # [T*k, d_out]
    y.add_(delta.view(T, k, -1).sum(dim=1))


def apply_segmented_op(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, lora_ids: torch.Tensor,
                       weights: torch.Tensor, *, backend: str | None = None) -> None:
    """Form 3, in place: the dlp_lora op with one segment per token.

    Shapes as apply_loop. ``backend``: a resolved backend name (ops.resolve_backend), default the
    automatic one for x's device, resolved once by the caller. Ids come from topk, so they are
    valid by construction and the op's host validation is skipped, as the patched DLP-LoRA Linear
    skips it.
    """
    T = x.shape[0]
    seg_indptr = torch.arange(T + 1, dtype=torch.int32, device=x.device)
    lora_weights = (weights * stack.scaling[lora_ids]).contiguous()
    multi_lora(y, x.contiguous(), stack.lora_a, stack.lora_b, seg_indptr, lora_ids.to(torch.int32),
               lora_weights, backend=backend, validate=False)


FORMS: dict[str, Callable[..., None]] = {
    "loop": apply_loop,
    "bmm": apply_gather_bmm,
    "op": apply_segmented_op,
}


class TokenGatedLoRALinear(nn.Module):
    """``base`` (an nn.Linear) plus MeteoRA-style per-token top-k gating over a LoRAStack.

    The gate is ``nn.Linear(d_in, N, bias=False)`` in the base weight's dtype, initialised
    normal(0, 1/sqrt(d_in)) from ``generator``. Input [..., d_in], output [..., d_out].
    """

    def __init__(self, base: nn.Linear, stack: LoRAStack, *, form: str = "op", top_k: int = 2,
                 temperature: float = 1.0, backend: str | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"TokenGatedLoRALinear: `form` must be one of {sorted(FORMS)}, got {form!r}")
        n, r, d_in = stack.lora_a.shape
        if d_in != base.in_features or tuple(stack.lora_b.shape) != (n, base.out_features, r):
            raise ValueError(
                f"TokenGatedLoRALinear: `stack` has A {tuple(stack.lora_a.shape)}, "
                f"B {tuple(stack.lora_b.shape)}; "
                f"expected [N, r, {base.in_features}] and [N, {base.out_features}, r] for this Linear")
        if temperature <= 0:
            raise ValueError(f"TokenGatedLoRALinear: `temperature` must be > 0, got {temperature}")
        self.base = base
        self.form, self.top_k, self.temperature = form, top_k, temperature
        weight = base.weight
        self.gate = nn.Linear(d_in, n, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            gate_init = torch.randn(n, d_in, generator=generator, dtype=torch.float32) / d_in**0.5
            self.gate.weight.copy_(gate_init)
        self.stack = LoRAStack(stack.lora_a.to(weight), stack.lora_b.to(weight),
                               stack.scaling.to(device=weight.device, dtype=torch.float32))
        # The op's backend is resolved once here, not on every token.
        if form == "op":
            name = resolve_backend(weight.device, backend)
            self._apply = functools.partial(apply_segmented_op, backend=name)
        else:
            self._apply = FORMS[form]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        flat_x = x.reshape(-1, x.shape[-1])
        flat_y = y.view(-1, y.shape[-1])
        lora_ids, weights = gate_top_k(flat_x, self.gate.weight, top_k=self.top_k,
                                       temperature=self.temperature)
        self._apply(flat_y, flat_x, self.stack, lora_ids, weights)
        return y

    def extra_repr(self) -> str:
        n, r, _ = self.stack.lora_a.shape
        return f"token-gated LoRA: form={self.form}, N={n}, r={r}, top_k={self.top_k}, T={self.temperature}"


def patch_token_gating(model: nn.Module, stacks: Mapping[str, LoRAStack], *, form: str = "op",
                       top_k: int = 2, temperature: float = 1.0, backend: str | None = None,
                       seed: int = 0) -> nn.Module:
    """Replace every ``nn.Linear`` named in ``stacks`` (keys as in model.named_modules()) by a
    TokenGatedLoRALinear; in place, returns ``model``.

    Everything is checked and built first, then swapped in, so a bad stack leaves the model as
    it was. Gates are drawn from ``torch.Generator().manual_seed(seed)`` in module order.
    """
    if getattr(model, "_token_gating_originals", None):
        raise RuntimeError("patch_token_gating: `model` is already patched; call unpatch_token_gating first")
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name, stack in stacks.items():
        base = modules.get(name)
        if not isinstance(base, nn.Linear):
            found = type(base).__name__ if base is not None else "nothing"
            raise ValueError(f"patch_token_gating: `stacks` names {name!r}, which is not an nn.Linear of "
                             f"the model (found {found})")
        wrapped[name] = TokenGatedLoRALinear(base, stack, form=form, top_k=top_k, temperature=temperature,
                                             backend=backend, generator=generator)
    originals = {}
    for name, module in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        originals[name] = getattr(parent, child)
        setattr(parent, child, module)
    model._token_gating_originals = originals
    return model


def unpatch_token_gating(model: nn.Module) -> nn.Module:
    """Put back the original Linear modules replaced by patch_token_gating; returns ``model``."""
    originals = getattr(model, "_token_gating_originals", None)
    if not originals:
        raise RuntimeError("unpatch_token_gating: `model` is not patched")
    for name, module in originals.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)
    del model._token_gating_originals
    return model


def stacks_from_bank(bank) -> dict[str, LoRAStack]:
    """The per-module stacks of a LoRABank (dlp_lora.bank), keyed by module name.

    The bank's tensors are shared, not copied. A LoRABank has each adapter's scaling already
    folded into lora_b, so the stacks carry scaling = 1 (the forms still multiply by it, as
    MeteoRA multiplies by its per-adapter scalings, so the work done is the same).
    """
    ones = lambda entry: torch.ones(entry.lora_a.shape[0], dtype=torch.float32, device=entry.lora_a.device)
    return {name: LoRAStack(entry.lora_a, entry.lora_b, ones(entry)) for name, entry in bank.modules.items()}
