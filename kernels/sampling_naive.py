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


def _row_param(value: Param, name: str, B: int, device, dtype) -> tuple[torch.Tensor, float | None]:
    """-> (tensor [B], the Python value when a scalar was given, else None)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(B)
        if value.shape != (B,):
            raise ValueError(f"{name} must be a scalar or a tensor of shape [B]={B}, got {tuple(value.shape)}")
        if dtype == torch.int64 and value.is_floating_point():
            raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
        # contiguous: the Triton kernel reads row r at ptr + r (a 0-dim value expanded above has stride 0)
        return value.to(device=device, dtype=dtype).contiguous(), None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a tensor of shape [B], got {type(value).__name__}")
    if dtype == torch.int64 and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value}")
    return torch.full((B,), value, device=device, dtype=dtype), float(value)


_RANGES = {  # name -> (test on a value, message)
    "temperature": (lambda v: v >= 0, "temperature must be >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "top_k must be >= 0 (0/None = off)"),
    "top_p": (lambda v: (v > 0) & (v <= 1), "top_p must be in (0, 1] (1 = off)"),
    "min_p": (lambda v: (v >= 0) & (v < 1), "min_p must be in [0, 1) (0 = off)"),
}


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape [B, V], got {got}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.numel() == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")


def _uniforms(uniforms: torch.Tensor | None, generator: torch.Generator | None, B: int,
              dev: torch.device) -> tuple[torch.Tensor, bool, bool]:
    """(uniforms [B, S] fp32 on dev, squeeze the output to [B], whether the values need a range check)."""
    if uniforms is None:
        gdev = generator.device if generator is not None else dev
        return torch.rand((B, 1), generator=generator, device=gdev, dtype=torch.float32).to(dev), True, False
    if not isinstance(uniforms, torch.Tensor) or uniforms.dim() not in (1, 2) or uniforms.shape[0] != B:
        raise ValueError(f"uniforms must have shape [B] or [B, S] with B={B}")
    squeeze = uniforms.dim() == 1
    uniforms = uniforms.reshape(B, -1).to(device=dev, dtype=torch.float32)
    if uniforms.shape[1] == 0:
        raise ValueError("uniforms must hold at least one sample per row")
    return uniforms, squeeze, True


def _value_checks(logits: torch.Tensor, params: dict, uniforms: torch.Tensor | None
                  ) -> tuple[list[torch.Tensor], list[str]]:
    """Device-side checks (0-dim bool tensors, True = bad) and their messages, read later in one host sync."""
    # One pass over the logits: a row max is NaN if the row holds a NaN (max propagates NaN), +inf if it holds
    # +inf, -inf if the row is all -inf.
    row_max = logits.amax(-1)  # [B]
    checks = [torch.isnan(row_max).any(), (row_max == float("inf")).any(), (row_max == float("-inf")).any()]
    msgs = ["logits contain NaN", "logits contain +inf", "a row of logits is all -inf (no token can be sampled)"]
    for name, (tensor, scalar) in params.items():
        if scalar is None:
            checks.append(~_RANGES[name][0](tensor).all())
            msgs.append(_RANGES[name][1])
    if uniforms is not None:
        checks.append(~((uniforms >= 0) & (uniforms < 1)).all())
        msgs.append("uniforms must lie in [0, 1)")
    return checks, msgs


def check_sampling_args(logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = None, top_p: Param = 1.0,
                        min_p: Param = 0.0, generator: torch.Generator | None = None,
                        uniforms: torch.Tensor | None = None, check_inputs: bool = True) -> SamplingArgs:
    """Validate the arguments of `sample` and broadcast them to per-row tensors.

    Scalar parameters are checked on the host for free. Tensor data (logits, per-row tensors, uniforms) is
    checked on the device with one host sync when check_inputs=True; with check_inputs=False and scalar
    parameters there is no sync at all (what a CUDA decode loop wants).
    """
    _check_logits(logits)
    B, V = logits.shape
    dev = logits.device
    params = {}
    for name, value, dtype in (("temperature", temperature, torch.float32),
                               ("top_k", 0 if top_k is None else top_k, torch.int64),
                               ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32)):
        tensor, scalar = _row_param(value, name, B, dev, dtype)
        ok, msg = _RANGES[name]
        if scalar is not None and not ok(scalar):
            raise ValueError(f"{msg}, got {scalar}")
        params[name] = (tensor, scalar)
    (t, t_s), (k, k_s), (p, p_s), (mp, mp_s) = params.values()
    uniforms, squeeze, check_u = _uniforms(uniforms, generator, B, dev)
    checks, msgs = _value_checks(logits, params, uniforms if check_u else None) if check_inputs else ([], [])
    k = torch.where(k >= V, torch.zeros_like(k), k)
    # "is this filter on for some row": known on the host for scalars; for unchecked tensors assume yes
    # (every path also handles a disabled row inside an enabled batch).
    flags = {"greedy": (t, t_s, lambda v: v == 0), "k": (k, k_s, lambda v: (v > 0) & (v < V)),
             "p": (p, p_s, lambda v: v < 1), "m": (mp, mp_s, lambda v: v > 0)}
    has = {n: bool(f(s)) if s is not None else (None if check_inputs else True) for n, (_, s, f) in flags.items()}
    lazy = [n for n, v in has.items() if v is None]
    checks += [flags[n][2](flags[n][0]).any() for n in lazy]
    if checks:
        values = torch.stack(checks).tolist()  # the one host sync
        for bad, msg in zip(values, msgs, strict=False):  # values also holds the lazy flags, after the checks
            if bad:
                raise ValueError(msg)
        for n, v in zip(lazy, values[len(msgs):], strict=True):
            has[n] = bool(v)
    return SamplingArgs(t, k, p, mp, uniforms, squeeze, has["greedy"], has["k"], has["p"], has["m"])


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
