"""Plain-PyTorch twin of `flythinker.kernels.sample`: the oracle for tests, the fallback for any device.

Semantics shared by every path (twin, CPU path, Triton kernel)
-------------------------------------------------------------
All math is fp32. For a row of logits ``x`` [V]:

1. temperature ``T``: ``T == 0`` is greedy (argmax of ``x``, ties -> lowest index; the filters are ignored).
   Otherwise ``w = exp((x - max(x)) / T)`` (so ``max(w) == 1`` exactly) and ``p = w / sum(w)``.
2. top_k (``k``; ``None``/0 or ``k >= V`` disables): keep every token whose value is ``>=`` the k-th largest
   value. Ties at the k-th value are all kept (as HF's TopKLogitsWarper), so more than k tokens can survive;
   equivalently keep ``i`` iff ``#{j : p_j > p_i} < k``.
3. top_p (``P``; ``P == 1`` disables), applied to the top-k distribution renormalised: keep ``i`` iff the
   renormalised mass of the tokens strictly more probable than ``i`` is ``< P``. So the token whose cumulative
   probability crosses ``P`` is KEPT, and every token tied with it too.
4. min_p (``min_p == 0`` disables): keep ``i`` iff ``p_i >= min_p * max(p)`` (i.e. ``w_i >= min_p``).
   Min-p is relative to the max, which every filter keeps, so its position in the chain does not matter.

The kept set is always ``{i : w_i >= tau}`` for one threshold ``tau`` per row. Sampling is inverse-CDF in
vocabulary (index) order over the kept, renormalised probabilities with one uniform ``u`` in [0, 1) per
sample: the token is the first index whose inclusive cumulative mass exceeds ``u * total``. Given the same
``u`` every path returns the same token, up to fp32 rounding at a CDF boundary or at a filter threshold.
Uniforms come from ``torch.rand(..., generator=generator)`` on the generator's device (logits' device if
no generator) or are passed in (``uniforms``), so seeded runs are reproducible and comparable across paths.

Bad input raises ValueError: NaN or +inf logits, a row that is all -inf, temperature < 0, top_k < 0,
top_p outside (0, 1], min_p outside [0, 1), per-row tensors whose shape is not [B], uniforms outside [0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Param = float | int | torch.Tensor | None


@dataclass
class SamplingArgs:
    """Validated per-row parameters, all tensors [B] on the logits' device."""

    temperature: torch.Tensor  # [B] fp32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off (k >= V is stored as 0 too)
    top_p: torch.Tensor  # [B] fp32, 1 = off
    min_p: torch.Tensor  # [B] fp32, 0 = off
    uniforms: torch.Tensor  # [B, S] fp32 in [0, 1)
    squeeze: bool  # caller asked for [B] output (uniforms drawn or given as [B])
    any_greedy: bool
    has_top_k: bool
    has_top_p: bool
    has_min_p: bool


def _row_param(value: Param, name: str, B: int, device, dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(B)
        if value.shape != (B,):
            raise ValueError(f"{name} must be a scalar or a tensor of shape [B]={B}, got {tuple(value.shape)}")
        if dtype == torch.int64 and value.is_floating_point():
            raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
        return value.to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a tensor of shape [B], got {type(value).__name__}")
    if dtype == torch.int64 and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value}")
    return torch.full((B,), value, device=device, dtype=dtype)


def check_sampling_args(logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = None, top_p: Param = 1.0,
                        min_p: Param = 0.0, generator: torch.Generator | None = None,
                        uniforms: torch.Tensor | None = None, check_input: bool = True) -> SamplingArgs:
    """Validate the arguments of `sample` and broadcast them to per-row tensors (one host sync on GPU)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape [B, V], got {got}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    B, V = logits.shape
    if B == 0 or V == 0:
        raise ValueError(f"logits must be non-empty, got shape {(B, V)}")
    dev = logits.device
    t = _row_param(temperature, "temperature", B, dev, torch.float32)
    k = _row_param(0 if top_k is None else top_k, "top_k", B, dev, torch.int64)
    p = _row_param(top_p, "top_p", B, dev, torch.float32)
    mp = _row_param(min_p, "min_p", B, dev, torch.float32)
    if uniforms is None:
        gdev = generator.device if generator is not None else dev
        uniforms = torch.rand((B, 1), generator=generator, device=gdev, dtype=torch.float32).to(dev)
        squeeze = True
    else:
        if not isinstance(uniforms, torch.Tensor) or uniforms.dim() not in (1, 2) or uniforms.shape[0] != B:
            raise ValueError(f"uniforms must have shape [B] or [B, S] with B={B}")
        squeeze = uniforms.dim() == 1
        uniforms = uniforms.reshape(B, -1).to(device=dev, dtype=torch.float32)
        if uniforms.shape[1] == 0:
            raise ValueError("uniforms must hold at least one sample per row")
    if check_input:
        # One pass over the logits: a row max is NaN if the row holds a NaN (max propagates NaN), +inf if it
        # holds +inf, -inf if the row is all -inf. One host sync for all flags.
        row_max = logits.amax(-1)  # [B]
        flags = torch.stack([
            torch.isnan(row_max).any(), (row_max == float("inf")).any(), (row_max == float("-inf")).any(),
            ~(t >= 0).all(), (k < 0).any(), ~((p > 0) & (p <= 1)).all(), ~((mp >= 0) & (mp < 1)).all(),
            ~((uniforms >= 0) & (uniforms < 1)).all(),
        ]).tolist()
        msgs = ["logits contain NaN", "logits contain +inf", "a row of logits is all -inf (no token can be sampled)",
                "temperature must be >= 0 (0 = greedy)", "top_k must be >= 0 (0/None = off)",
                "top_p must be in (0, 1] (1 = off)", "min_p must be in [0, 1) (0 = off)",
                "uniforms must lie in [0, 1)"]
        for bad, msg in zip(flags, msgs):
            if bad:
                raise ValueError(msg)
    k = torch.where(k >= V, torch.zeros_like(k), k)
    greedy, has_k, has_p, has_m = torch.stack([(t == 0).any(), (k > 0).any(), (p < 1).any(), (mp > 0).any()]).tolist()
    return SamplingArgs(t, k, p, mp, uniforms, squeeze, greedy, has_k, has_p, has_m)


def sampling_probs_naive(logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = None,
                         top_p: Param = 1.0, min_p: Param = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort-based reference filters. logits [B, V] -> (allowed mask [B, V] bool, renormalised probs [B, V] fp32).

    The mask is the kept set of the semantics above; tokens with probability 0 (e.g. -inf logits) may be in it
    but are never sampled. Greedy rows get a one-hot mask at the argmax.
    """
    a = check_sampling_args(logits, temperature, top_k, top_p, min_p, uniforms=torch.zeros(logits.shape[0]))
    return _filter(logits, a)


def _filter(logits: torch.Tensor, a: SamplingArgs) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()  # [B, V]
    B, V = x.shape
    greedy = a.temperature == 0  # [B]
    t = torch.where(greedy, torch.ones_like(a.temperature), a.temperature)[:, None]
    probs = torch.softmax((x - x.amax(-1, keepdim=True)) / t, dim=-1)  # [B, V]
    keep = torch.ones_like(probs, dtype=torch.bool)
    sp, _ = probs.sort(dim=-1, descending=True)  # [B, V]
    # top-k: threshold at the k-th largest probability, ties kept.
    k = torch.where(a.top_k > 0, a.top_k, V)[:, None]
    keep &= probs >= sp.gather(1, k - 1)
    # top-p on the renormalised top-k distribution: sorted positions whose preceding mass is < P are kept
    # (the crossing one included); the smallest kept value is the threshold, so its ties are kept too.
    pk = torch.where(keep, probs, 0.0)
    pk = pk / pk.sum(-1, keepdim=True)
    spk, _ = pk.sort(dim=-1, descending=True)
    before = torch.cat([torch.zeros_like(spk[:, :1]), spk.cumsum(-1)[:, :-1]], dim=-1)  # exclusive cumsum
    n_keep = (before < a.top_p[:, None]).sum(-1, keepdim=True).clamp(min=1)
    keep_p = pk >= spk.gather(1, n_keep - 1)
    keep &= torch.where((a.top_p < 1)[:, None], keep_p, True)
    # min-p relative to the max probability.
    keep &= probs >= a.min_p[:, None] * probs.amax(-1, keepdim=True)
    # greedy rows: one-hot at the first argmax.
    onehot = torch.zeros_like(keep).scatter_(1, x.argmax(-1, keepdim=True), True)
    keep = torch.where(greedy[:, None], onehot, keep)
    out = torch.where(keep, probs, 0.0)
    out = torch.where(greedy[:, None], onehot.float(), out / out.sum(-1, keepdim=True))
    return keep, out


def sample_naive(logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = None, top_p: Param = 1.0,
                 min_p: Param = 0.0, generator: torch.Generator | None = None,
                 uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Reference sampler: logits [B, V] -> tokens [B] int64 (or [B, S] when uniforms is [B, S])."""
    a = check_sampling_args(logits, temperature, top_k, top_p, min_p, generator, uniforms)
    _, probs = _filter(logits, a)
    cdf = probs.double().cumsum(-1)  # [B, V], fp64 so the oracle's own rounding is negligible
    target = a.uniforms.double() * cdf[:, -1:]  # [B, S]
    tok = torch.searchsorted(cdf, target, right=True)  # first index with cdf > target
    last = (probs > 0).cumsum(-1).argmax(-1, keepdim=True)  # last index with mass
    tok = torch.minimum(tok, last)
    return tok[:, 0] if a.squeeze else tok
