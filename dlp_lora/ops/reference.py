"""Plain-PyTorch oracle for the segmented multi-LoRA op.

Every other backend (cpp, triton, cuda) is tested against this file. It favours being
obviously right over being fast: a Python loop over segments and slots.

Contract (shared by every backend; see dlp_lora/ops/__init__.py and docs/architecture.md)::

    y[t] += sum_k  lora_weights[s, k] * lora_b[id] @ (lora_a[id] @ x[t])
            for every t in seg_indptr[s] : seg_indptr[s+1],  id = lora_ids[s, k] >= 0

The delta is accumulated in float32 (float64 when x is float64) and added to y once, so the
result is ``(y.float() + delta).to(y.dtype)``, the same rounding the kernels do.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def multi_lora_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    lora_ids: torch.Tensor,
    lora_weights: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Return the delta only, shape [T, d_out], in ``dtype`` (default: the accumulation dtype).

    x [T, d_in], lora_a [N, r, d_in], lora_b [N, d_out, r], seg_indptr [S+1] int32,
    lora_ids [S, K] int32 (-1 = empty slot), lora_weights [S, K] float32.
    Rows outside every segment get a zero delta.
    """
    acc = dtype or accumulation_dtype(x.dtype)
    T, d_out = x.shape[0], lora_b.shape[1]
    delta = torch.zeros(T, d_out, dtype=acc, device=x.device)
    bounds = seg_indptr.tolist()
    ids = lora_ids.tolist()
    weights = lora_weights.to(acc).tolist()
    for s in range(len(bounds) - 1):
        start, end = bounds[s], bounds[s + 1]
        if end <= start:
            continue
        xs = x[start:end].to(acc)
        for k, idx in enumerate(ids[s]):
            if idx < 0:
                continue
            a = lora_a[idx].to(acc)  # [r, d_in]
            b = lora_b[idx].to(acc)  # [d_out, r]
            delta[start:end] += weights[s][k] * ((xs @ a.T) @ b.T)
    return delta


def multi_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    lora_ids: torch.Tensor,
    lora_weights: torch.Tensor,
) -> None:
    """In place: ``y += delta`` (see module docstring). y [T, d_out], same dtype as x."""
    delta = multi_lora_delta(x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights)
    y.copy_((y.to(delta.dtype) + delta).to(y.dtype))
