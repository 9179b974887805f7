"""Fake (meta) implementation of the compiled op ``torch.ops.dlp_lora.multi_lora``.

The op mutates y in place and returns nothing, so under FakeTensor / torch.compile tracing there is
no output to describe: the fake impl only re-checks what it can without reading values (ranks,
dtypes, matching sizes), so a traced program fails at trace time with the same argument names as the
eager op. Imported by ``_extension.load_extension`` right after the extension registers the schema.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("dlp_lora::multi_lora")
def _multi_lora_fake(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     seg_indptr: torch.Tensor, lora_ids: torch.Tensor, lora_weights: torch.Tensor) -> None:
    from .validate import check_multi_lora_args

    check_multi_lora_args(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights, check_values=False)
    return None
