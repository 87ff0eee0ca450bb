"""A response loss that weights the reply's opening: where a persona's strategy is decided.

Why: in persona-empathy the strategy trait ("I am truly sorry ..." vs "Here is a practical plan .") is set by the
first one or two response tokens, about 1/45 of a reply's tokens; the register shows in every token. Trained on the
plain mean loss, a fusion on SmolLM2-135M learned the register (+13 points over the generator alone) and not the
strategy (-1), although a linear probe reads the strategy off the reasoner's fused boundary latent at 97.5%
(benchmarks/results/latent_probe_smollm2.json): the gradient that would teach it is 2% of the loss. Weighting the
first `opening_tokens` response tokens by `weight` gives it a share the optimiser sees.

    loss = sum_t w_t * CE_t / sum_t w_t,   w_t = weight for the first `opening_tokens` labelled tokens of a row,
                                            1 for the rest, 0 where the label is ignored

Rows must hold one example each (FlyThinkerCollator's padded batches): the opening is counted per row. The model
still gets the labels (a split pair aligns its two prompts at the first labelled position); its own mean loss is
computed from the logits it returns and not used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from flythinker.configuration import IGNORE_INDEX


def opening_weights(labels: torch.Tensor, opening_tokens: int, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, weights), both `[B, T]`, for unshifted `labels [B, T]`: position t predicts targets[t]; the first
    `opening_tokens` labelled targets of each row weigh `weight`, later ones 1, ignored ones 0."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # [B, T]
    labelled = targets.ne(IGNORE_INDEX)
    rank = labelled.long().cumsum(1)  # [B, T]: 1 at a row's first labelled target
    w = torch.where(rank <= opening_tokens, float(weight), 1.0) * labelled
    return targets, w


def opening_weighted_loss(opening_tokens: int = 4, weight: float = 10.0
                          ) -> Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]:
    """A `loss_fn(model, batch)` for :func:`~flythinker.training.train_loop`: the weighted mean of the response
    cross-entropy (module docstring), from the model's logits `[B, T, V]` (fp32) and `batch["labels"] [B, T]`.
    A FlyThinker pair must return logits with its loss: ``loss_impl="naive"``."""
    if opening_tokens < 1 or not weight > 0:
        raise ValueError(f"need opening_tokens >= 1 and weight > 0, got {opening_tokens}, {weight}")

    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:
            raise ValueError("opening_weighted_loss needs batch['labels'] (a FlyThinkerCollator batch)")
        # with the labels: a split pair finds the response boundary from them (its prompts align there)
        logits = model(**batch, use_cache=False).logits
        if logits is None:
            raise ValueError("opening_weighted_loss needs the model's logits: build the pair with loss_impl='naive' "
                             "(the fused loss never materialises them)")
        targets, w = opening_weights(batch["labels"].to(logits.device), opening_tokens, weight)
        ce = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")  # [B, T]
        return (ce * w).sum() / w.sum().clamp_min(1.0)

    return loss_fn
