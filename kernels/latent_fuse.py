"""Fused embedding gather + latent fusion: `flythinker.kernels.latent_fuse`.

    e_t = E[x_t] + lam * m_{t-1} * (c / max(||h_{t-1}||, eps)) * P(h_{t-1})     (docs/design.md, Fusion rule)

One pass per output row: gather E[x_t], take h_{t-1} (prev_latent at t = 0), its L2 norm, rescale to the norm
target c, pad (or add the "linear" projection), multiply by lam and the SOURCE mask m_{t-1}, add, store.
Backends behind one dispatcher: Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1), the C++ CPU op
(csrc/latent_fuse.cpp via kernels/latent_fuse_cpp.py), and the PyTorch twin (kernels/latent_fuse_naive.py).

"linear" projection: the per-row scale is a scalar, so s * P(h) = P(s * h); P(h) (and P^T g in backward) is a
plain matmul outside the kernels and everything else stays fused. "vocab_mean" c is a constant (no gradient to
the table through c); pass a float (or 0-dim tensor) norm_target to reuse a cached vocab mean on the decode path.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from . import latent_fuse_cpp
from ._backend import HAS_TRITON, choose, register
from .latent_fuse_naive import latent_fuse_naive, vocab_mean_norm

if HAS_TRITON:
    import triton
    import triton.language as tl

_CONST, _TOKEN, _CONST_PTR = 0, 1, 2  # norm modes (C++ knows 0 and 1; a tensor target is read as float there)

if HAS_TRITON:

    @triton.jit
    def _latent_fuse_fwd_kernel(
        IDS, W, LAT, MASK, PREV, PLAT, PPREV, OUT, RS, CPTR,
        T, H_g, H_r,
        s_ib, s_it, s_wv, s_wh, s_lb, s_lt, s_lh, s_mb, s_mt, s_pb, s_ph,
        lam, norm_const, eps,
        HAS_MASK: tl.constexpr, HAS_PREV: tl.constexpr, LINEAR: tl.constexpr, NORM_MODE: tl.constexpr,
        ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # one program per output row b * T + t
        b = row // T
        t = row % T
        tp = tl.maximum(t - 1, 0)
        from_lat = t > 0  # h_{t-1} comes from `latent`; at t = 0 from `prev_latent` (if any)
        # row-conditional masks are written `lanes < where(cond, H, 0)`: one compare, and it sidesteps the
        # triton 3.9 interpreter turning `bool_tensor & bool_scalar` into int32 (rejected as a load mask)
        cg = tl.arange(0, BLOCK_G)
        gmask = cg < H_g
        idx = tl.load(IDS + b * s_ib + t * s_it).to(tl.int64)
        e = tl.load(W + idx * s_wv + cg * s_wh, mask=gmask, other=0.0).to(ACC)  # [BLOCK_G] E[x_t]
        # "pad": the source lives in the first H_r lanes of the H_g-wide row; "linear": its own H_r-wide row
        if LINEAR:
            cs = tl.arange(0, BLOCK_R)
        else:
            cs = cg
        s = tl.load(LAT + b * s_lb + tp * s_lt + cs * s_lh, mask=cs < tl.where(from_lat, H_r, 0), other=0.0).to(ACC)
        if HAS_MASK:
            m = tl.load(MASK + b * s_mb + tp * s_mt, mask=from_lat, other=0).to(ACC)
        else:
            m = from_lat.to(ACC)
        if HAS_PREV:
            s += tl.load(PREV + b * s_pb + cs * s_ph, mask=cs < tl.where(t == 0, H_r, 0), other=0.0).to(ACC)
            m = tl.where(t == 0, 1.0, m).to(ACC)
        n = tl.sqrt(tl.sum(s * s, axis=0))
        if NORM_MODE == 1:
            c = tl.sqrt(tl.sum(e * e, axis=0))
        elif NORM_MODE == 2:
            c = tl.load(CPTR).to(ACC)
        else:
            c = norm_const
        coef = lam * m * c / tl.maximum(n, eps)
        if LINEAR:  # P(h) precomputed [B, T, H_g] / [B, H_g], contiguous, ACC dtype
            p = tl.load(PLAT + (b * T + tp) * H_g + cg, mask=cg < tl.where(from_lat, H_g, 0), other=0.0).to(ACC)
            if HAS_PREV:
                p += tl.load(PPREV + b * H_g + cg, mask=cg < tl.where(t == 0, H_g, 0), other=0.0).to(ACC)
        else:
            p = s
        tl.store(OUT + row * H_g + cg, (e + coef * p).to(OUT.dtype.element_ty), mask=gmask)
        tl.store(RS + row, coef)

    @triton.jit
    def _latent_fuse_bwd_kernel(
        G, IDS, W, LAT, PREV, GPROJ, RS, GLAT, GPREV, GW,
        T, H_g, H_r,
        s_gb, s_gt, s_gh, s_ib, s_it, s_wv, s_wh, s_lb, s_lt, s_lh, s_pb, s_ph,
        eps,
        HAS_PREV: tl.constexpr, LINEAR: tl.constexpr, DETACH: tl.constexpr, TOKEN_FULL: tl.constexpr,
        NEED_LAT: tl.constexpr, NEED_PREV: tl.constexpr, NEED_W: tl.constexpr,
        ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # k = lam * m * c / max(n, eps) (saved by forward), gp = P^T g, s = h_{t-1}:
        #   dL/dh_{t-1} = k * gp  [- k * (gp . s) / n^2 * s  without detach, when n >= eps]
        #   dL/dE[x_t]  = g       [+ k * (gp . s) / c^2 * E[x_t]  for "token" without detach]
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        t = row % T
        tp = tl.maximum(t - 1, 0)
        from_lat = t > 0
        cg = tl.arange(0, BLOCK_G)
        gmask = cg < H_g
        g = tl.load(G + b * s_gb + t * s_gt + cg * s_gh, mask=gmask, other=0.0).to(ACC)  # [BLOCK_G]
        k = tl.load(RS + row).to(ACC)
        if LINEAR:
            cs = tl.arange(0, BLOCK_R)
        else:
            cs = cg
        smask = cs < H_r
        pd = 0.0
        if NEED_LAT or NEED_PREV or TOKEN_FULL:
            if LINEAR:
                gp = tl.load(GPROJ + row * H_r + cs, mask=smask, other=0.0).to(ACC)
            else:
                gp = tl.where(smask, g, 0.0)
            s = tl.load(LAT + b * s_lb + tp * s_lt + cs * s_lh, mask=cs < tl.where(from_lat, H_r, 0), other=0.0).to(ACC)
            if HAS_PREV:
                s += tl.load(PREV + b * s_pb + cs * s_ph, mask=cs < tl.where(t == 0, H_r, 0), other=0.0).to(ACC)
            gs = k * gp
            if not DETACH:
                pd = tl.sum(gp * s, axis=0)
                n2 = tl.sum(s * s, axis=0)
                ok = (n2 > 0) & (tl.sqrt(n2) >= eps)  # below eps the clamp makes the norm a constant
                gs += tl.where(ok, -k * pd / tl.where(ok, n2, 1.0), 0.0) * s
            if NEED_LAT:  # slot t feeds h_{t-1}; h_{T-1} feeds nothing
                gl = GLAT.dtype.element_ty
                tl.store(GLAT + tl.maximum(row - 1, 0) * H_r + cs, gs.to(gl), mask=cs < tl.where(from_lat, H_r, 0))
                tl.store(GLAT + row * H_r + cs, tl.zeros_like(gs).to(gl), mask=cs < tl.where(t == T - 1, H_r, 0))
            if NEED_PREV:
                tl.store(GPREV + b * H_r + cs, gs.to(GPREV.dtype.element_ty), mask=cs < tl.where(t == 0, H_r, 0))
        if NEED_W:
            idx = tl.load(IDS + b * s_ib + t * s_it).to(tl.int64)
            ge = g
            if TOKEN_FULL:
                e = tl.load(W + idx * s_wv + cg * s_wh, mask=gmask, other=0.0).to(ACC)
                c2 = tl.sum(e * e, axis=0)
                ge += tl.where(c2 > 0, k * pd / tl.where(c2 > 0, c2, 1.0), 0.0) * e
            # repeated token ids hit the same row: atomics (fp32/fp64 accumulator, cast once afterwards)
            tl.atomic_add(GW + idx * H_g + cg, ge.to(GW.dtype.element_ty), mask=gmask)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _acc_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _triton_fwd(ids, weight, latent, mask, prev, plat, pprev, lam, norm_mode, norm_const, eps):
    B, T = ids.shape
    H_g, H_r = weight.shape[1], latent.shape[2]
    acc = _acc_dtype(weight, latent)
    out = torch.empty(B, T, H_g, device=weight.device, dtype=weight.dtype)  # [B, T, H_g]
    rs = torch.empty(B, T, device=weight.device, dtype=acc)  # [B, T] row scale for backward
    cptr = norm_const if isinstance(norm_const, torch.Tensor) else rs
    const = 0.0 if isinstance(norm_const, torch.Tensor) else float(norm_const)
    mk = mask if mask is not None else rs
    pv = prev if prev is not None else latent[:, 0]
    BG, BR = triton.next_power_of_2(H_g), triton.next_power_of_2(H_r)
    _latent_fuse_fwd_kernel[(B * T,)](
        ids, weight, latent, mk, pv, plat if plat is not None else rs, pprev if pprev is not None else rs,
        out, rs, cptr, T, H_g, H_r, ids.stride(0), ids.stride(1), weight.stride(0), weight.stride(1),
        *latent.stride(), mk.stride(0), mk.stride(1) if mk.dim() > 1 else 0, pv.stride(0), pv.stride(1),
        float(lam), const, float(eps),
        HAS_MASK=mask is not None, HAS_PREV=prev is not None, LINEAR=plat is not None, NORM_MODE=norm_mode,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_G=BG, BLOCK_R=BR,
        num_warps=_warps(max(BG, BR)),
    )
    return out, rs


def _triton_bwd(g, ids, weight, latent, prev, gproj, rs, norm_mode, eps, detach, need_lat, need_prev, need_w):
    B, T = ids.shape
    V, H_g = weight.shape
    H_r = latent.shape[2]
    acc = _acc_dtype(weight, latent)
    token_full = norm_mode == _TOKEN and not detach and need_w
    glat = torch.empty(B if need_lat else 0, T, H_r, device=latent.device, dtype=latent.dtype)
    gprev = torch.empty(B if need_prev else 0, H_r, device=latent.device, dtype=latent.dtype)
    gw = torch.zeros(V if need_w else 0, H_g, device=weight.device, dtype=acc)
    pv = prev if prev is not None else latent[:, 0]
    BG, BR = triton.next_power_of_2(H_g), triton.next_power_of_2(H_r)
    _latent_fuse_bwd_kernel[(B * T,)](
        # outputs not asked for are 0-row tensors (data_ptr 0 on CUDA): hand the kernel a real dummy instead
        g, ids, weight, latent, pv, gproj if gproj is not None else rs, rs, glat if need_lat else rs,
        gprev if need_prev else rs, gw if need_w else rs,
        T, H_g, H_r, *g.stride(), ids.stride(0), ids.stride(1), weight.stride(0), weight.stride(1),
        *latent.stride(), pv.stride(0), pv.stride(1), float(eps),
        HAS_PREV=prev is not None, LINEAR=gproj is not None, DETACH=detach, TOKEN_FULL=token_full,
        NEED_LAT=need_lat, NEED_PREV=need_prev, NEED_W=need_w,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_G=BG, BLOCK_R=BR,
        num_warps=_warps(max(BG, BR)),
    )
    return glat, gprev, gw


def _cpp_fwd(ids, weight, latent, mask, prev, plat, pprev, lam, norm_mode, norm_const, eps):
    mode = _TOKEN if norm_mode == _TOKEN else _CONST
    return latent_fuse_cpp.fwd(ids, weight, latent, mask, prev, plat, pprev, lam, mode, float(norm_const), eps)


def _cpp_bwd(g, ids, weight, latent, prev, gproj, rs, norm_mode, eps, detach, need_lat, need_prev, need_w):
    mode = _TOKEN if norm_mode == _TOKEN else _CONST
    return latent_fuse_cpp.bwd(g, ids, weight, latent, prev, gproj, rs, mode, eps, detach, need_lat, need_prev,
                               need_w)


_IMPLS = {"triton": (_triton_fwd, _triton_bwd), "cpp": (_cpp_fwd, _cpp_bwd)}


class LatentFuseFunction(torch.autograd.Function):
    """Autograd wrapper shared by the Triton and C++ backends (inputs already validated and laid out)."""

    @staticmethod
    def forward(ctx, input_ids, weight, latent, mask, prev_latent, projection, lam, norm_mode, norm_const, eps,
                detach_norm, backend):
        fwd = _IMPLS[backend][0]
        acc = _acc_dtype(weight, latent)
        plat = pprev = None
        if projection is not None:  # P(h) as a matmul; the per-row scale is applied inside the kernel
            pw = projection.to(acc).T  # [H_r, H_g]
            plat = (latent.to(acc) @ pw).contiguous()  # [B, T, H_g]
            pprev = (prev_latent.to(acc) @ pw).contiguous() if prev_latent is not None else None
        out, rs = fwd(input_ids, weight, latent, mask, prev_latent, plat, pprev, lam, norm_mode, norm_const, eps)
        ctx.save_for_backward(input_ids, weight, latent, prev_latent, projection, rs)
        ctx.cfg = (norm_mode, eps, detach_norm, backend)
        return out

    @staticmethod
    def backward(ctx, g):
        ids, weight, latent, prev, projection, rs = ctx.saved_tensors
        norm_mode, eps, detach, backend = ctx.cfg
        need_w, need_lat, need_prev, need_proj = (ctx.needs_input_grad[i] for i in (1, 2, 4, 5))
        need_prev = need_prev and prev is not None
        acc = _acc_dtype(weight, latent)
        token_full = norm_mode == _TOKEN and not detach and need_w
        g = g.to(weight.dtype)
        gproj = None
        if projection is not None and (need_lat or need_prev or token_full):
            gproj = (g.to(acc) @ projection.to(acc)).contiguous()  # [B, T, H_r] = P^T g
        glat, gprev, gw = _IMPLS[backend][1](g, ids, weight, latent, prev, gproj, rs, norm_mode, eps, detach,
                                             need_lat, need_prev, need_w)
        gP = None
        if need_proj:  # dL/dP = sum_t (k_t g_t) h_{t-1}^T
            H_g, H_r = weight.shape[1], latent.shape[2]
            gs = g.to(acc) * rs[..., None]  # [B, T, H_g]
            gP = gs[:, 1:].reshape(-1, H_g).T @ latent[:, :-1].reshape(-1, H_r).to(acc)
            if prev is not None:
                gP += gs[:, 0].T @ prev.to(acc)
            gP = gP.to(projection.dtype)
        return (None, gw.to(weight.dtype) if need_w else None, glat if need_lat else None, None,
                gprev if need_prev else None, gP) + (None,) * 6


def _cpp_why_not(device: torch.device) -> Exception | None:
    if device.type != "cpu":
        return ValueError(f"needs CPU tensors, got {device} tensors")
    if not latent_fuse_cpp.load():
        return RuntimeError(f"needs the C++ op, which is unavailable ({latent_fuse_cpp._state['error']})")
    return None


register("latent_fuse", ("triton", "cpp", "torch"), {"cpp": _cpp_why_not})


def _is_float_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _check_shapes(input_ids, weight, latent) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex() \
            or input_ids.dtype == torch.bool:
        raise TypeError(f"latent_fuse: input_ids must be an integer tensor, got {_describe(input_ids)}")
    if input_ids.dim() != 2:
        raise ValueError(f"latent_fuse: input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    for name, x, rank in (("weight", weight, 2), ("latent", latent, 3)):
        if not _is_float_tensor(x):
            raise TypeError(f"latent_fuse: {name} must be a floating-point tensor, got {_describe(x)}")
        if x.dim() != rank:
            raise ValueError(f"latent_fuse: {name} must have {rank} dims, got shape {tuple(x.shape)}")
    B, T = input_ids.shape
    if tuple(latent.shape[:2]) != (B, T) or latent.shape[2] == 0 or weight.shape[1] == 0:
        raise ValueError(f"latent_fuse: latent must be [B, T, H_r] = [{B}, {T}, H_r>0], got {tuple(latent.shape)} "
                         f"(weight {tuple(weight.shape)})")


def _check_optional(input_ids, weight, latent, mask, projection, prev_latent) -> None:
    """mask [B, T], prev_latent [B, H_r], projection [H_g, H_r] (None: "pad", needs H_r <= H_g), one device."""
    (B, T), H_g, H_r = input_ids.shape, weight.shape[1], latent.shape[2]
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.is_complex()):
        raise TypeError(f"latent_fuse: mask must be a bool/int/float tensor or None, got {_describe(mask)}")
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ValueError(f"latent_fuse: mask must be [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
    for name, x, dims, shape in (("prev_latent", prev_latent, "B, H_r", (B, H_r)),
                                 ("projection", projection, "H_g, H_r", (H_g, H_r))):
        if x is not None and not _is_float_tensor(x):
            raise TypeError(f"latent_fuse: {name} must be a floating-point tensor, got {_describe(x)}")
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"latent_fuse: {name} must be [{dims}] = {list(shape)}, got {tuple(x.shape)}")
    if projection is None and H_r > H_g:
        raise ValueError(f"latent_fuse: the 'pad' projection needs H_r <= H_g, got H_r={H_r} > H_g={H_g}; "
                         "pass a [H_g, H_r] linear projection instead")
    tensors = {"input_ids": input_ids, "weight": weight, "latent": latent, "mask": mask,
               "prev_latent": prev_latent, "projection": projection}
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"latent_fuse: all tensors must be on one device, got {devices}")


def _check_scalars(lam, eps, allow_negative_lambda) -> float:
    if isinstance(lam, torch.Tensor) and lam.numel() == 1 and not lam.is_complex():
        lam = float(lam)  # a host sync on CUDA: pass a Python float on hot paths
    if isinstance(lam, bool) or not isinstance(lam, Real):
        raise TypeError(f"latent_fuse: lam must be a real number, got {type(lam).__name__}")
    lam = float(lam)
    if not math.isfinite(lam):
        raise ValueError(f"latent_fuse: lam must be finite, got {lam}")
    if lam < 0 and not allow_negative_lambda:
        raise ValueError(f"latent_fuse: lam must be >= 0, got {lam} (pass allow_negative_lambda=True to allow it)")
    if isinstance(eps, bool) or not isinstance(eps, Real) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"latent_fuse: eps must be a finite number > 0, got {eps!r}")
    return lam


def _unknown_norm(norm_target) -> str:
    return f"latent_fuse: unknown norm_target {norm_target!r}; expected 'vocab_mean', 'token' or a number"


def _norm_mode(norm_target, device):
    """-> (norm mode, norm constant: a float, a 0-dim tensor on `device`, or None for "vocab_mean"). The error text
    is built only on error: the repr of a tensor norm_target (what every decode step passes) formats its value, a
    dozen ops and on an accelerator a host sync (measured ~0.2 ms a decode step on CPU)."""
    if isinstance(norm_target, str):
        if norm_target not in ("vocab_mean", "token"):
            raise ValueError(_unknown_norm(norm_target))
        return (_CONST_PTR, None) if norm_target == "vocab_mean" else (_TOKEN, 0.0)
    if isinstance(norm_target, torch.Tensor):
        if norm_target.numel() != 1 or not norm_target.is_floating_point():
            raise ValueError(f"latent_fuse: a tensor norm_target must be a 1-element float tensor, got "
                             f"{_describe(norm_target)}")
        return _CONST_PTR, norm_target.detach().reshape(()).to(device=device)
    if isinstance(norm_target, bool) or not isinstance(norm_target, Real):
        raise ValueError(_unknown_norm(norm_target))
    if not (math.isfinite(norm_target) and norm_target >= 0):
        raise ValueError(f"latent_fuse: a numeric norm_target must be finite and >= 0, got {norm_target}")
    return _CONST, float(norm_target)


def validate(input_ids, weight, latent, mask, lam, norm_target, projection, prev_latent, eps, allow_negative_lambda):
    """Shape/dtype/device/scalar checks (no host sync). -> (lam: float, norm mode, norm constant or tensor)."""
    _check_shapes(input_ids, weight, latent)
    _check_optional(input_ids, weight, latent, mask, projection, prev_latent)
    lam = _check_scalars(lam, eps, allow_negative_lambda)
    return (lam, *_norm_mode(norm_target, weight.device))


def check_values(input_ids, V, latent, prev_latent, norm_tensor) -> None:
    """Ids in [0, V) and finite latents, with ONE host sync: a few reductions stacked and read together.

    Finiteness uses the (fp32-accumulated) sum: any NaN/inf makes it non-finite; only then is the exact
    elementwise check run, so a huge-but-finite latent whose sum overflows is not rejected by mistake.
    """
    f64 = torch.float64
    stats = [input_ids.amin().to(f64), input_ids.amax().to(f64), latent.sum(dtype=_acc_dtype(latent)).to(f64)]
    if prev_latent is not None:
        stats.append(prev_latent.sum(dtype=_acc_dtype(prev_latent)).to(f64))
    if norm_tensor is not None:
        stats.append(norm_tensor.to(f64))
    lo, hi, *sums = torch.stack(stats).tolist()
    if lo < 0 or hi >= V:
        raise ValueError(f"latent_fuse: input_ids out of range [0, {V}): min {int(lo)}, max {int(hi)}")
    names = ["latent"] + (["prev_latent"] if prev_latent is not None else [])
    for name, x, sm in zip(names, (latent, prev_latent), sums, strict=False):
        if not math.isfinite(sm) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"latent_fuse: {name} contains NaN or inf")
    if norm_tensor is not None and not (math.isfinite(sums[-1]) and sums[-1] >= 0):
        raise ValueError(f"latent_fuse: norm_target tensor must be finite and >= 0, got {sums[-1]}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor(dtype={x.dtype}, shape={tuple(x.shape)}, device={x.device})"
    return type(x).__name__


def latent_fuse(
    input_ids: torch.Tensor,  # [B, T] int
    weight: torch.Tensor,  # [V, H_g] generator input embedding E
    latent: torch.Tensor,  # [B, T, H_r] reasoner latents h_t (fused into position t + 1)
    mask: torch.Tensor | None = None,  # [B, T] source mask: mask[b, t] = 0 -> h_t is never fused
    *,
    lam: float,
    norm_target: str | float | torch.Tensor = "vocab_mean",
    projection: torch.Tensor | None = None,  # [H_g, H_r] "linear"; None = "pad" (needs H_r <= H_g)
    prev_latent: torch.Tensor | None = None,  # [B, H_r] h_{-1}, fused into position 0 with multiplier 1
    eps: float = 1e-6,
    detach_norm: bool = True,
    allow_negative_lambda: bool = False,
    backend: str | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:  # [B, T, H_g] in weight.dtype
    """Generator input embeddings with the reasoner's latents fused in (docs/design.md, Fusion rule).

    norm_target: "vocab_mean" (mean row norm of `weight`, a constant), "token" (||E[x_t]||, differentiable
    unless detach_norm), or a fixed float / 0-dim tensor (e.g. a cached vocab mean: avoids re-reading the table).
    detach_norm=False also differentiates through ||h|| (and ||E[x_t]|| for "token").
    backend: "auto" (Triton for CUDA, C++ for CPU, else the twin), "triton", "cpp" or "torch"; None: from
    FLYTHINKER_LATENT_FUSE_BACKEND, else "auto" (kernels/_backend.py). check_inputs=False skips the value checks (ids in range, finite latents),
    which cost one host sync; shapes, dtypes and devices are always checked.
    """
    lam, mode, c = validate(input_ids, weight, latent, mask, lam, norm_target, projection, prev_latent, eps,
                            allow_negative_lambda)
    B, T = input_ids.shape
    if B * T == 0:
        return weight[input_ids]
    chosen = choose("latent_fuse", backend, weight.device)
    if check_inputs:
        check_values(input_ids, weight.shape[0], latent, prev_latent, c if isinstance(c, torch.Tensor) else None)
    if chosen == "torch":
        return latent_fuse_naive(input_ids, weight, latent, mask, lam=lam, norm_target=norm_target,
                                 projection=projection, prev_latent=prev_latent, eps=eps, detach_norm=detach_norm)
    if mode == _CONST_PTR and c is None:  # "vocab_mean": one reduction over the table, kept on device
        c = vocab_mean_norm(weight)
    if chosen == "cpp":  # the C++ op reads one dtype with unit inner stride; casts here stay differentiable
        input_ids = input_ids.long()
        latent = latent.to(weight.dtype)
        latent = latent if latent.stride(-1) == 1 else latent.contiguous()
        if prev_latent is not None:
            prev_latent = prev_latent.to(weight.dtype)
            prev_latent = prev_latent if prev_latent.stride(-1) == 1 else prev_latent.contiguous()
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        mask = mask.float() if mask is not None else None
        c = float(c) if mode == _CONST_PTR else c
    elif mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # Triton loads bytes; no copy
    return LatentFuseFunction.apply(input_ids, weight, latent, mask, prev_latent, projection, lam, mode, c,
                                    eps, detach_norm, chosen)
