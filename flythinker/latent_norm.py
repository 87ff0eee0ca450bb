"""Standardised latents (`latent_norm="standardize"`): centre and scale the reasoner's latent per channel before the
fusion's rescale and projection, with frozen statistics calibrated on the latents a pair actually fuses.

Why: a pretrained reasoner's final hidden state is almost entirely its mean direction, and the user-dependent
residual is a small fraction of its energy. After the paper's rescale to the vocabulary's mean norm, the person is a
small signal next to a constant vector, so a learned projection mostly learns a user-independent shift (style) and
Adam's per-weight steps move the informative channels far less than the constant ones. Standardising first gives
every channel unit variance. The measurements on SmolLM2-135M-Instruct and the fusion-only pilot that chose it are
in docs/fusion.md ("Standardised latents"; benchmarks/results/personalization_fusion_std_pilot.json).

    h' = (h - latent_mean) * latent_inv_std        per channel, [..., H_r]; an all-zero row stays zero

The all-zero rule keeps the library's convention that a zeroed latent row means "no latent" (a disabled
`prev_latent`, an unused slot); a real final hidden state is never exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

BUFFERS = ("latent_mean", "latent_inv_std")


def standardize_latent(h: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    """`(h - mean) * inv_std` for h `[..., H_r]` (mean, inv_std `[H_r]`), in h's dtype; all-zero rows stay zero."""
    live = h.ne(0).any(-1, keepdim=True).to(h.dtype)  # [..., 1]
    return (h - mean.to(h.dtype)) * inv_std.to(h.dtype) * live


class LatentStats:
    """Streaming per-channel mean and standard deviation (fp64 sums) of latent rows `[N, H_r]`."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.s1 = torch.zeros(width, dtype=torch.float64)
        self.s2 = torch.zeros(width, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        r = rows.detach().reshape(-1, rows.shape[-1]).to("cpu", torch.float64)
        self.n += r.shape[0]
        self.s1 += r.sum(0)
        self.s2 += (r * r).sum(0)

    def result(self, min_std: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / max(std, min_std)) as fp32 `[H_r]`."""
        if self.n < 2:
            raise ValueError(f"calibrate_latent_norm saw {self.n} fused latent(s); it needs at least 2")
        mean = self.s1 / self.n
        var = (self.s2 / self.n - mean * mean).clamp_min(0) * (self.n / (self.n - 1))
        return mean.float(), 1.0 / var.sqrt().clamp_min(min_std).float()


class _Captured(Exception):
    """Raised out of `fuse` once the latents of one batch are recorded (the generator forward is not needed)."""


class _Capture:
    """Installed as `model._latent_capture`: `fuse` hands it the latents it is about to fuse; `sink` gets the
    selected rows `[N, H_r]` of each batch."""

    def __init__(self, sink: Callable[[torch.Tensor], None], positions: str) -> None:
        self.sink, self.positions = sink, positions

    def __call__(self, latent: torch.Tensor, mask: torch.Tensor | None, prev: torch.Tensor | None) -> None:
        B, T, H = latent.shape
        live = torch.ones(B, T, dtype=torch.bool, device=latent.device) if mask is None else mask.bool().clone()
        live[:, -1] = False  # slot T-1 would feed position T: never fused
        has_prev = prev.ne(0).any(-1) if prev is not None else torch.zeros(B, dtype=torch.bool)
        if self.positions == "boundary":  # each row's first fused latent: prev if it has one, else its first slot
            first = torch.zeros_like(live)
            first[torch.arange(B), live.int().argmax(1)] = True
            live = live & first & ~has_prev[:, None].to(live.device)
        rows = [latent[live]]
        if prev is not None:
            rows.append(prev[has_prev])
        self.sink(torch.cat(rows).detach())
        raise _Captured


def _run_capture(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], positions: str,
                 sink: Callable[[torch.Tensor], None], caller: str) -> None:
    """Run the pair's forward on each batch up to its fusion, handing the selected latents to `sink`."""
    if positions not in ("fused", "boundary"):
        raise ValueError(f"positions must be 'fused' or 'boundary', got {positions!r}")
    was_training = model.training
    model.eval()
    model._latent_capture = _Capture(sink, positions)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _Captured:
                continue
            raise RuntimeError(f"{caller}: the forward fused no latent (is fusion_lambda 0, or are the batches "
                               "missing the response?)")
    finally:
        model._latent_capture = None
        model.train(was_training)


@torch.no_grad()
def capture_latents(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                    positions: str = "boundary") -> torch.Tensor:
    """The raw reasoner latents `[N, H_r]` (before any standardisation) that the pair fuses on `batches`, at
    `positions` as in :func:`calibrate_latent_norm`. Only the reasoner runs."""
    rows: list[torch.Tensor] = []
    _run_capture(model, batches, positions, lambda r: rows.append(r.float().cpu()), "capture_latents")
    return torch.cat(rows)


@torch.no_grad()
def calibrate_latent_norm(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                          positions: str = "fused", min_std: float = 1e-3) -> dict[str, float]:
    """Set a `latent_norm="standardize"` pair's `latent_mean` / `latent_inv_std` `[H_r]` from the latents it fuses
    on `batches` (training batches as the pair's forward takes them: `input_ids`, `attention_mask`, `labels`, and
    `reasoner_*` in split context). Only the reasoner runs: the capture stops each forward at the fusion.

    Calibrate once, before training the projection, on the same views the pair is trained on: the statistics are
    frozen afterwards (buffers, saved with the model), and the projection learns in their coordinates. With a
    zero-initialised projection the calibrated, untrained pair still computes exactly what its generator computes.

    Args:
        model: a pair with `latent_norm="standardize"`.
        batches: the batches to read latents from (any iterable of mappings the pair's forward takes).
        positions: `"fused"` (every latent the pair fuses) or `"boundary"` (each row's first fused latent: in split
            context the one the generator's last prompt position receives, the latent that must set the reply's
            opening). With statistics over every fused position the later positions, which read the reply itself,
            dominate and the boundary latent keeps most of its common offset (measured: docs/fusion.md).
        min_std: floor of each channel's standard deviation (a near-constant channel is not blown up).

    Returns:
        A summary dict with the keys `latents` (rows seen), `mean_norm` (the norm of the mean latent) and
        `median_std` (the median channel standard deviation).
    """
    if getattr(model.config, "latent_norm", "none") != "standardize":
        raise ValueError(f"calibrate_latent_norm needs a pair with latent_norm='standardize', got "
                         f"{getattr(model.config, 'latent_norm', None)!r}")
    stats = LatentStats(model.config.reasoner.hidden_size)
    _run_capture(model, batches, positions, stats.add, "calibrate_latent_norm")
    mean, inv_std = stats.result(min_std)
    with torch.no_grad():
        model.latent_mean.copy_(mean.to(model.latent_mean))
        model.latent_inv_std.copy_(inv_std.to(model.latent_inv_std))
    return {"latents": stats.n, "mean_norm": float(mean.norm()), "median_std": float((1 / inv_std).median())}


__all__ = ["BUFFERS", "LatentStats", "calibrate_latent_norm", "capture_latents", "standardize_latent"]
