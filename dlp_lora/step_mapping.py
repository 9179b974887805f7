"""The op's routing tensors of one forward, built once per step from the requests scheduled in it.

A forward's activations are flattened to rows [B*L, d]; a segment is a run of rows with one
mixture. ``StepMapping.build`` takes, for each sequence of the forward in order, its segments as
[(offset within the sequence's L rows, mixture)], and returns ``seg_indptr [S+1] int32``,
``lora_ids [S, K] int32`` (-1 an empty slot) and ``lora_weights [S, K] float32`` plus each
sequence's last mixture (for a module that sees one row per sequence, e.g. lm_head with
logits_to_keep=1). A step whose layout equals the previous one's (a decode step where no request
joined, left or was re-routed) reuses the previous tensors: no host work, no copy, the same
tensor objects, so a compiled graph sees the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .ops import check_routing_values
from .routing_policy import Mixture

__all__ = ["StepMapping", "StepRouting", "adapter_mask", "mixture_tensors"]


@dataclass
class StepRouting:
    """The routing of one forward: what RoutingState's tensors are set from."""

    num_tokens: int
    num_sequences: int
    seg_indptr: torch.Tensor
    lora_ids: torch.Tensor
    lora_weights: torch.Tensor
    last_seg_indptr: torch.Tensor
    last_lora_ids: torch.Tensor
    last_lora_weights: torch.Tensor
    active: bool  # some row has an adapter (else the patched modules skip the op)
    adapters: int  # bit i set when some row uses adapter i (a module none of them targets skips the op)


class StepMapping:
    """Builds StepRouting for forwards of B sequences of L tokens each; reuses the last one when equal."""

    def __init__(self, num_loras: int, device: torch.device):
        self.num_loras, self.device = num_loras, device
        self._key: tuple | None = None
        self._last: StepRouting | None = None

    def build(self, sequences: Sequence[Sequence[tuple[int, Mixture]]], length: int) -> StepRouting:
        """sequences[b]: [(offset, mixture)] sorted, the first at offset 0, offsets < length."""
        key = (length, tuple(tuple(segs) for segs in sequences))
        if key == self._key:
            return self._last
        B = len(sequences)
        starts, mixtures = [], []
        for b, segs in enumerate(sequences):
            if not segs or segs[0][0] != 0:
                raise ValueError(f"StepMapping: sequence {b} has no segment at offset 0: {segs!r}")
            for offset, mixture in segs:
                starts.append(b * length + offset)
                mixtures.append(mixture)
        seg_indptr = torch.tensor(starts + [B * length], dtype=torch.int32)
        ids, weights = mixture_tensors(mixtures)
        check_routing_values(seg_indptr, ids, num_tokens=B * length, num_loras=self.num_loras)
        last_ids, last_weights = mixture_tensors([segs[-1][1] for segs in sequences])
        last_seg = torch.arange(0, B + 1, dtype=torch.int32)
        to = self.device
        routing = StepRouting(
            num_tokens=B * length,
            num_sequences=B,
            seg_indptr=seg_indptr.to(to),
            lora_ids=ids.to(to),
            lora_weights=weights.to(to),
            last_seg_indptr=last_seg.to(to),
            last_lora_ids=last_ids.to(to),
            last_lora_weights=last_weights.to(to),
            active=bool((ids >= 0).any()),
            adapters=adapter_mask(mixtures),
        )
        self._key, self._last = key, routing
        return routing


def adapter_mask(mixtures: Sequence[Mixture]) -> int:
    """Bit i set when adapter i is in any of the mixtures (RoutingState.adapters)."""
    mask = 0
    for ids, _ in mixtures:
        for i in ids:
            mask |= 1 << i
    return mask


def mixture_tensors(mixtures: Sequence[Mixture], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_ids [S, K] int32 (-1 padded) and lora_weights [S, K] float32 for S mixtures, K >= 1."""
    K = max(1, max(len(ids) for ids, _ in mixtures))
    ids = torch.full((len(mixtures), K), -1, dtype=torch.int32)
    weights = torch.zeros(len(mixtures), K, dtype=torch.float32)
    for s, (mix_ids, mix_weights) in enumerate(mixtures):
        if mix_ids:
            ids[s, : len(mix_ids)] = torch.tensor(mix_ids, dtype=torch.int32)
            weights[s, : len(mix_ids)] = torch.tensor(mix_weights, dtype=torch.float32)
    return (ids, weights) if device is None else (ids.to(device), weights.to(device))
