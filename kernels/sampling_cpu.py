"""Sorting-free sampling on CPU with plain torch ops (semantics: see `sampling_naive`).

Why not the twin: it sorts the whole vocabulary (twice). Measured on this 2-core box at V=151936, one row,
one thread: torch.sort 42 ms, exp 0.12 ms, cumsum 0.17 ms, bincount 0.3 ms, topk(k=50) 0.3 ms.
So this path finds the keep-threshold without a full sort:

* top-k: ``torch.topk`` (partial selection) gives the k-th value; ties at it are kept by ``w >= kth``.
* top-p: radix select on the fp32 bit pattern (monotone for w >= 0). One ``bincount`` with weights gives the
  mass per bucket of the top 11 bits (1/8 octave); a reverse cumsum locates the bucket holding the crossing
  token; only that bucket's few elements are sorted. Exact, whatever the shape of the distribution.
* min-p: ``w >= min_p`` (``max(w) == 1``).
* draw: inverse CDF with ``cumsum`` + ``searchsorted`` over the kept weights, in vocabulary order.
"""

from __future__ import annotations

import torch

from .sampling_naive import SamplingArgs

_SHIFT = 20  # bucket = fp32 bits >> 20: sign, 8 exponent bits, 3 mantissa bits; w <= 1.0 -> bucket <= 1016
_NBUCKET = (0x3F800000 >> _SHIFT) + 1


def _top_p_threshold(w: torch.Tensor, tau: torch.Tensor, P: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Smallest value v among w >= tau with mass(w > v) < P, per row in `rows`. w [B, V], tau/P [B]."""
    B, V = w.shape
    wk = torch.where(w >= tau[:, None], w, 0.0) if bool((tau > 0).any()) else w  # [B, V]
    bucket = wk.view(torch.int32) >> _SHIFT  # [B, V], 0 for removed tokens
    flat = bucket + torch.arange(B, dtype=torch.int32)[:, None] * _NBUCKET if B > 1 else bucket
    mass = torch.bincount(flat.flatten(), weights=wk.flatten(), minlength=B * _NBUCKET)
    mass = mass.view(B, _NBUCKET).double()  # [B, NB]
    above = mass.flip(-1).cumsum(-1).flip(-1) - mass  # [B, NB] mass in buckets strictly above
    out = tau.clone()
    for r in rows:
        # first bucket (from the bottom) whose "strictly above" mass is < P holds the threshold.
        j = int((above[r] >= P[r]).sum())
        sub = wk[r][bucket[r] == j]
        if sub.numel() == 0:  # only possible through rounding: fall back to an exact sort of the row
            sub, base = wk[r], 0.0
        else:
            base = float(above[r, j])
        out_floor = float(tau[r])
        sub = sub.sort(descending=True).values.double()
        before = base + torch.cat([sub.new_zeros(1), sub.cumsum(0)[:-1]])
        n = max(int((before < P[r]).sum()), 1)
        out[r] = max(float(sub[n - 1]), out_floor)  # never below the top-k threshold
    return out


def sample_cpu(logits: torch.Tensor, a: SamplingArgs) -> torch.Tensor:
    """logits [B, V] (any float dtype, any strides), validated args -> tokens [B, S] int64."""
    x = logits.float()  # [B, V]
    B, V = x.shape
    greedy = a.temperature == 0
    t = torch.where(greedy, torch.ones_like(a.temperature), a.temperature)[:, None]
    w = torch.sub(x, x.amax(-1, keepdim=True)).div_(t).exp_()  # [B, V], max exactly 1 (in place: 1 buffer)
    tau = torch.zeros(B, dtype=torch.float32)  # keep w >= tau
    k = a.top_k
    has_top_k = a.has_top_k and bool((k > 0).any())  # unchecked per-row tensors arrive with has_top_k=True
    if has_top_k:
        vals = torch.topk(w, int(k.max()), dim=-1, sorted=True).values  # [B, kmax] descending
        tau = torch.where(k > 0, vals.gather(1, (k.clamp(min=1) - 1)[:, None])[:, 0], tau)
    if a.has_top_p:
        zk = torch.where(w >= tau[:, None], w, 0.0).sum(-1) if has_top_k else w.sum(-1)  # [B] top-k mass
        P = a.top_p * zk
        if has_top_k:
            # top-k rows: the top-p threshold lies among the k sorted values topk already returned (extra
            # tokens tied at the k-th value share its "mass strictly above", so they need not be listed).
            before = vals.double().cumsum(-1) - vals.double()  # [B, kmax] mass strictly before position j
            inside = torch.arange(vals.shape[1])[None, :] < k[:, None]
            n = ((before < P[:, None]) & inside).sum(-1).clamp(min=1)
            tau = torch.where((k > 0) & (a.top_p < 1), torch.maximum(tau, vals.gather(1, (n - 1)[:, None])[:, 0]), tau)
        rows = ((a.top_p < 1) & (k == 0)).nonzero()[:, 0].tolist()
        if rows:
            tau = _top_p_threshold(w, tau, P, rows)
    if a.has_min_p:
        tau = torch.maximum(tau, a.min_p)
    wk = torch.where(w >= tau[:, None], w, 0.0)  # [B, V]
    cdf = wk.cumsum(-1)  # sequential fp32 cumsum of non-negatives: monotone
    target = a.uniforms * cdf[:, -1:]  # [B, S]
    tok = torch.searchsorted(cdf, target, right=True)  # [B, S]; lands on a token with mass, or V
    if bool((tok >= V).any()):  # u * total rounded up to total: take the last token with mass
        last = (wk > 0).cumsum(-1).argmax(-1, keepdim=True)
        tok = torch.minimum(tok, last)
    if a.any_greedy:
        tok = torch.where(greedy[:, None], x.argmax(-1, keepdim=True), tok)
    return tok
