"""The one small training loop (no HF `Trainer`) that the demo and the benchmarks share.

AdamW over the parameters that require grad (:func:`~flythinker.training.trainable.set_trainable` decides which),
linear warm-up then cosine decay to zero (transformers' ``get_cosine_schedule_with_warmup``, the schedule HF
``Trainer`` runs), gradient clipping, one loss per step. The pieces that differ between its users are arguments: the
data order (``"shuffle"``: one seeded permutation, cycled, as the demo trains; ``"sample"``: a fresh seeded
``random.sample`` per batch, as ``benchmarks/personalization.py`` trains), separate learning rates for the reasoner
and for the fusion parameters (a learned projection/gate: everything outside ``generator.`` and ``reasoner.``), and
a progress callback.

Long runs (``flythinker train``) use :class:`~flythinker.training.trainer.FlyThinkerTrainer` instead: checkpoints,
DDP, gradient accumulation, evaluation.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from flythinker.training.trainable import part_of

ORDERS = ("shuffle", "sample")


@dataclass
class LoopResult:
    """``losses``: the training loss of every step (a float each); ``seconds``: wall time of the loop."""

    losses: list[float]
    seconds: float


def param_groups(model: nn.Module, lr: float, *, reasoner_lr: float | None = None,
                 fusion_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: one per part (generator, projection = the fusion
    parameters, reasoner) that has any, at `lr` unless `reasoner_lr` / `fusion_lr` say otherwise.

    A plain HF model (no ``.reasoner``) is all generator."""
    lrs = {"generator": lr, "projection": lr if fusion_lr is None else fusion_lr,
           "reasoner": lr if reasoner_lr is None else reasoner_lr}
    pair = hasattr(model, "reasoner")
    by_part: dict[str, list[nn.Parameter]] = {part: [] for part in lrs}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_part[part_of(name) if pair else "generator"].append(p)
    return [{"params": params, "lr": lrs[part], "part": part} for part, params in by_part.items() if params]


def batch_indices(n: int, steps: int, batch_size: int, *, order: str = "shuffle", seed: int = 0) -> list[list[int]]:
    """Indices into `n` examples of every step's batch ([steps][batch_size]), reproducible from `seed`.

    ``"shuffle"``: one ``random.Random(seed)`` permutation, cycled (batch i takes the next `batch_size`).
    ``"sample"``: ``random.Random(seed).sample(range(n), batch_size)`` per batch (no repeats within a batch).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"need at least one example and batch_size >= 1, got {n} examples, batch_size {batch_size}")
    rng = random.Random(seed)
    if order == "sample":
        if batch_size > n:
            raise ValueError(f"order='sample' draws batches without repeats: batch_size {batch_size} > {n} examples")
        return [rng.sample(range(n), batch_size) for _ in range(steps)]
    perm = list(range(n))
    rng.shuffle(perm)
    return [[perm[(step * batch_size + i) % n] for i in range(batch_size)] for step in range(steps)]


def train_loop(
    model: nn.Module,
    features: Sequence[Any],
    collate: Callable[[list[Any]], Mapping[str, torch.Tensor]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    reasoner_lr: float | None = None,
    fusion_lr: float | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_steps: int | None = None,
    max_grad_norm: float = 1.0,
    order: str = "shuffle",
    seed: int = 0,
    progress: Callable[[int, list[float]], None] | None = None,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
) -> LoopResult:
    """Train `model` for `steps` optimizer steps on batches of `features`; returns the loss history.

    Args:
        model: a FlyThinker pair or a plain HF causal LM; it must return ``.loss`` for ``model(**batch)``.
        features: the examples (anything `collate` takes: collator features, or records that `collate` turns into
            views first, so that only the examples actually drawn are tokenised).
        collate: ``list of features -> batch`` (e.g. a :class:`~flythinker.training.FlyThinkerCollator`):
            ``input_ids``/``attention_mask``/``labels`` ``[B, L]`` (+ ``reasoner_*`` ``[B, L_r]``).
        steps / batch_size / lr: optimizer steps, examples per step, peak learning rate of the generator.
        reasoner_lr / fusion_lr: peak learning rates of the reasoner's and of the fusion parameters (default `lr`).
        weight_decay / betas: AdamW's.
        warmup_steps: linear warm-up length (default ``max(1, steps // 10)``), then cosine decay to 0 at `steps`:
            transformers' ``get_cosine_schedule_with_warmup``. Step s < warmup_steps runs at ``lr * s /
            warmup_steps`` (so the first step runs at lr 0), step warmup_steps at the peak, and step s after it at
            ``lr * 0.5 * (1 + cos(pi * (s - warmup_steps) / (steps - warmup_steps)))``.
        max_grad_norm: gradient clipping over all trainable parameters.
        order / seed: the data order (:func:`batch_indices`); the same seed gives the same batches.
        progress: called after every step with (step index, losses so far); it may switch the model to eval
            mode and back (e.g. for an evaluation curve).
        loss_fn: ``(model, batch) -> scalar loss`` to train on instead of ``model(**batch).loss`` (e.g. a
            per-token weighting of the response).

    The model is in train mode during the loop and left in eval mode. Dropout, if the model has any, draws from
    torch's global RNG: seed it before the call for reproducible runs.
    """
    if steps < 0 or lr <= 0 or (warmup_steps is not None and warmup_steps < 1):
        raise ValueError(f"need steps >= 0, lr > 0 and warmup_steps >= 1, got steps={steps}, lr={lr}, "
                         f"warmup_steps={warmup_steps}")
    groups = param_groups(model, lr, reasoner_lr=reasoner_lr, fusion_lr=fusion_lr)
    if not groups:
        raise ValueError("the model has no trainable parameters (see flythinker.training.set_trainable)")
    batches = batch_indices(len(features), steps, batch_size, order=order, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]  # model order: the clipping norm's sum order
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "part"} for g in groups], lr=lr,
                            weight_decay=weight_decay, betas=betas)
    # transformers' schedule, as HF Trainer runs it: step 0 at lr 0, the peak at step `warmup_steps`, then cosine
    sched = get_cosine_schedule_with_warmup(opt, warmup_steps or max(1, steps // 10), steps)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step, idx in enumerate(batches):
        batch = collate([features[i] for i in idx])
        loss = model(**batch, use_cache=False).loss if loss_fn is None else loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses)
    model.eval()
    return LoopResult(losses, time.perf_counter() - start)
