"""Reference linear cross-entropy: materialise the logits, then F.cross_entropy (the oracle for tests).

Semantics shared with the fused op (kernels/linear_cross_entropy.py):
- the loss is the sum over non-ignored tokens divided by `num_items_in_batch` when given (as HF Trainer passes
  it for gradient accumulation), else by the number of non-ignored tokens;
- the denominator is clamped to >= 1, so an all-ignored batch gives loss 0 and zero gradients instead of NaN;
- logits are upcast to fp32 before the softmax (as HF's loss does) and the loss is an fp32 scalar;
- `softcap` (Gemma-2 final-logit softcapping): z = softcap * tanh(logits / softcap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_denominator(labels: torch.Tensor, ignore_index: int,
                     num_items_in_batch: torch.Tensor | int | float | None) -> torch.Tensor:
    """Denominator of the mean as an fp32 device tensor (no host sync): count of valid labels or num_items."""
    if num_items_in_batch is None:
        denom = (labels != ignore_index).sum()
    elif isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.device.type == "cpu" and float(num_items_in_batch) < 0:  # no sync on CPU
            raise ValueError(f"num_items_in_batch must be >= 0, got {float(num_items_in_batch)}")
        denom = num_items_in_batch.reshape(()).to(labels.device, non_blocking=True)
    elif isinstance(num_items_in_batch, (int, float)) and not isinstance(num_items_in_batch, bool):
        if num_items_in_batch < 0:
            raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")
        denom = torch.tensor(float(num_items_in_batch), device=labels.device)
    else:
        raise TypeError(f"num_items_in_batch must be a tensor, int or None, got {type(num_items_in_batch).__name__}")
    return denom.to(torch.float32).clamp(min=1.0)


def linear_cross_entropy_naive(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100,
                               num_items_in_batch: torch.Tensor | int | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels`, materialising the [N, V] logits.

    hidden: [N, H], weight: [V, H], labels: [N] (int, `ignore_index` rows skipped). Returns an fp32 scalar.
    """
    logits = (hidden @ weight.t()).float()  # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    total = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
    return total / loss_denominator(labels, ignore_index, num_items_in_batch)
