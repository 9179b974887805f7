"""Top-p adapter selection: router probabilities -> (lora_ids, weights) for the multi-LoRA op.

DLP-LoRA keeps, per sequence, the smallest set of adapters whose router probability
mass reaches ``top_p`` and mixes them with their probabilities renormalised to sum 1.

A deliberate departure from the official code: it applies a *second* softmax to the
kept probabilities (softmax over values that are already probabilities in [0, 1]).
That squashes the weights towards uniform (e.g. kept probabilities [0.9, 0.1] become
[0.69, 0.31]), so a confident router still gets a nearly even mixture. We renormalise
the kept probabilities instead ([0.9, 0.1] stays [0.9, 0.1]), which is what the
paper's description of top-p selection means and what a user reading the weights expects.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_max_loras", "check_top_p", "route_top_p"]

# Mass comparisons tolerate this much float error (relative to the row's total), so a
# prefix whose mass equals top_p in exact arithmetic (0.5 + 0.3 for p=0.8) is kept as it
# is, without dragging in the next adapter because float32 summed it to 0.7999999.
MASS_EPS = 1e-6


def check_top_p(top_p) -> float:
    """Return ``top_p`` as a float, or raise ValueError unless it lies in (0, 1]."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not (0.0 < float(top_p) <= 1.0):  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return float(top_p)


def check_max_loras(max_loras) -> int | None:
    """Return ``max_loras`` (None = no cap), or raise ValueError unless it is an int >= 1."""
    if max_loras is None:
        return None
    if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
        raise ValueError(f"max_loras must be None or an integer >= 1, got {max_loras!r}")
    return max_loras


def _check_probs(probs: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor):
        raise ValueError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    if probs.dim() != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must have shape [B, N] with N >= 1, got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be floating point, got {probs.dtype}")
    if probs.numel() and not bool(
        (torch.isfinite(probs).all() & (probs >= 0).all() & (probs.sum(dim=1) > 0).all()).item()
    ):
        raise ValueError("probs must be finite, non-negative, with a positive sum in every row")


def route_top_p(
    probs: torch.Tensor, top_p: float, max_loras: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick adapters per row by top-p and renormalise their weights.

    Args:
        probs: [B, N] float, router probabilities (a softmax; rows need not sum to exactly 1,
            mass is measured relative to each row's sum).
        top_p: in (0, 1]. Per row, sort descending and keep the smallest prefix whose mass
            reaches ``top_p`` (always at least one adapter). ``top_p=1`` keeps every adapter
            with non-zero probability.
        max_loras: optional cap on the number kept per row (applied after top-p).

    Returns:
        lora_ids: [B, K] int32, adapter indices in descending probability; -1 pads short rows.
        weights:  [B, K] float32, the kept probabilities renormalised to sum 1 per row; 0 at -1.
        K is the largest number kept over the batch (K = 1 when B = 0). Same device as ``probs``.
    """
    top_p = check_top_p(top_p)
    max_loras = check_max_loras(max_loras)
    _check_probs(probs)
    B, N = probs.shape

    # float64 so cumulative sums of many small probabilities stay exact to ~1e-16
    sorted_p, order = probs.double().sort(dim=1, descending=True, stable=True)
    total = sorted_p.sum(dim=1, keepdim=True)
    mass_before = sorted_p.cumsum(dim=1) - sorted_p  # mass of the adapters ranked above slot j
    # Slot j is needed while the mass above it has not reached top_p. At top_p = 1 every slot
    # with non-zero probability is needed, however small (no epsilon there).
    threshold = math.inf if top_p >= 1.0 else (top_p - MASS_EPS) * total
    keep = (mass_before < threshold) & (sorted_p > 0)
    keep[:, 0] = True  # always at least one adapter
    if max_loras is not None:
        keep &= torch.arange(N, device=probs.device) < max_loras
    # keep is a prefix of each sorted row (mass_before grows, sorted_p shrinks), so K slots hold it
    K = max(1, int(keep.sum(dim=1).max().item())) if B else 1
    keep, order, sorted_p = keep[:, :K], order[:, :K], sorted_p[:, :K]

    kept_p = sorted_p * keep
    weights = kept_p / kept_p.sum(dim=1, keepdim=True)
    lora_ids = torch.where(keep, order, torch.full_like(order, -1))
    return lora_ids.to(torch.int32), weights.to(torch.float32)
