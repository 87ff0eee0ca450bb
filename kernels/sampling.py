"""Fused sampling: temperature, top-k, top-p and min-p in one sorting-free pass per row.

`sample(logits [B, V], *, temperature, top_k, top_p, min_p, generator) -> tokens [B]` dispatches to

* "triton": a Triton kernel (CUDA tensors; also CPU tensors under TRITON_INTERPRET=1),
* "torch": `sampling_cpu.sample_cpu` on CPU tensors (torch.topk + a bincount radix select, no full sort), the
  sort-based twin's torch ops on other devices,
and `sampling_naive.sample_naive` is the sort-based twin and oracle (a function, not a backend).

Semantics (filter order, ties, the crossing token kept, greedy, the inverse-CDF draw) are documented once in
`sampling_naive`'s module docstring and shared by all three paths: given the same uniforms they return the
same tokens, up to fp32 rounding at a CDF boundary or a filter threshold.

The kernel (one program per row, fp32 math) never sorts. The kept set is always {i : w_i >= tau} with
w = exp((x - max x) / T) in [0, 1], and fp32 bit patterns of non-negative floats are ordered like the floats,
so tau is found by a bisection over the int32 bit pattern b in (-1, bits(1.0)]: the predicate
"count(w > b) < k" (top-k) or "mass(w > b) < top_p * Z_k" (top-p) is monotone in b, and each pass over the
row evaluates NPIV pivots at once ([BLOCK, NPIV] compare + column sums), shrinking the interval NPIV+1-fold:
8 passes at NPIV=16 for the 2^30-wide range, exact (no epsilon, ties handled by construction). Then one
pass sums the kept mass and a last pass walks the row in vocabulary order with a running sum + tl.cumsum
until the first kept token whose cumulative mass exceeds u * total (early exit: about half a row on
average). Unlike FlashInfer's dual-pivot rejection sampler this spends a fixed number of passes, but it
maps a uniform to exactly the token the twin picks, so seeded runs agree across backends.
GPU timings were not measured here (no GPU on the development box): see benchmarks/bench_sampling.py.
"""

from __future__ import annotations

import os

import torch

from ._backend import HAS_TRITON, choose, register
from .sampling_cpu import sample_cpu
from .sampling_naive import Param, SamplingArgs, check_sampling_args, sample_naive

if HAS_TRITON:
    import triton
    import triton.language as tl

register("sample", ("triton", "torch"))

if HAS_TRITON:
    _ONE_BITS = tl.constexpr(0x3F800000)  # bits of 1.0f == max(w)

    @triton.jit
    def _load_w(row_ptr, offs, V, m, t):
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        return tl.exp((x - m) / t)  # -inf and out-of-range lanes -> 0

    @triton.jit
    def _bisect(row_ptr, V, m, t, lo, hi, limit, COUNT: tl.constexpr, BLOCK: tl.constexpr, NPIV: tl.constexpr):
        """Smallest int32 b in (lo, hi] with agg{w : bits(w) > b} < limit (agg = count or sum)."""
        piv_idx = tl.arange(0, NPIV) + 1  # [NPIV]
        while hi - lo > 1:
            step = (hi - lo + NPIV) // (NPIV + 1)  # ceil((hi - lo) / (NPIV + 1)) >= 1
            piv = tl.minimum(lo + step * piv_idx, hi - 1)  # [NPIV] ascending, inside (lo, hi)
            acc = tl.zeros([NPIV], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                w = _load_w(row_ptr, offs, V, m, t)  # [BLOCK]
                gt = w.to(tl.int32, bitcast=True)[:, None] > piv[None, :]  # [BLOCK, NPIV]
                if COUNT:
                    acc += tl.sum(gt.to(tl.float32), axis=0)  # exact: counts < 2^24
                else:
                    acc += tl.sum(tl.where(gt, w[:, None], 0.0), axis=0)
            ok = acc < limit  # monotone in the pivot: a suffix of the pivots is ok
            new_hi = tl.min(tl.where(ok, piv, hi), axis=0)
            lo = tl.max(tl.where(ok, lo, piv), axis=0)
            hi = new_hi
        return hi

    @triton.jit
    def _kept_mass(row_ptr, V, m, t, b, BLOCK: tl.constexpr):
        total = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            w = _load_w(row_ptr, offs, V, m, t)
            total += tl.sum(tl.where(w.to(tl.int32, bitcast=True) >= b, w, 0.0), axis=0)
        return total

    @triton.jit
    def _sample_kernel(
        x_ptr, stride_b, u_ptr, out_ptr, t_ptr, k_ptr, p_ptr, mp_ptr, V, S,
        HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, HAS_MINP: tl.constexpr,
        BLOCK: tl.constexpr, NPIV: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = x_ptr + row * stride_b
        # pass 1: max (for exp stability and greedy), first index of the max.
        m = tl.full([], float("-inf"), tl.float32)
        amax = tl.full([], 0, tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            bm = tl.max(x, axis=0)
            bi = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int32)
            amax = tl.where(bm > m, start + bi, amax)  # strict: earlier tile wins ties
            m = tl.maximum(m, bm)
        t = tl.load(t_ptr + row)
        s_offs = tl.arange(0, BLOCK_S)
        if t == 0.0:  # greedy
            for s0 in range(0, S, BLOCK_S):
                so = s0 + s_offs
                tl.store(out_ptr + row * S + so, (amax + so * 0).to(tl.int64), mask=so < S)
        else:
            b = tl.full([], 0, tl.int32)  # keep bits(w) >= b
            if HAS_TOPK:
                k = tl.load(k_ptr + row)
                if k > 0:
                    b = _bisect(row_ptr, V, m, t, tl.full([], -1, tl.int32), tl.full([], _ONE_BITS, tl.int32),
                                k.to(tl.float32), True, BLOCK, NPIV)
            if HAS_TOPP:
                p = tl.load(p_ptr + row)
                if p < 1.0:
                    limit = p * _kept_mass(row_ptr, V, m, t, b, BLOCK)  # top_p of the renormalised top-k mass
                    b = _bisect(row_ptr, V, m, t, b - 1, tl.full([], _ONE_BITS, tl.int32), limit, False, BLOCK, NPIV)
            if HAS_MINP:
                b = tl.maximum(b, tl.load(mp_ptr + row).to(tl.int32, bitcast=True))
            total = _kept_mass(row_ptr, V, m, t, b, BLOCK)
            # inverse CDF in vocabulary order; the running sum repeats _kept_mass's additions exactly.
            for s0 in range(0, S, BLOCK_S):
                so = s0 + s_offs
                target = tl.load(u_ptr + row * S + so, mask=so < S, other=0.0) * total  # [BLOCK_S]
                res = tl.where(so < S, -1, 0)  # -1 = not found yet
                running = tl.full([], 0.0, tl.float32)
                last = tl.full([], -1, tl.int32)
                start = tl.full([], 0, tl.int32)
                while (start < V) & (tl.min(res, axis=0) < 0):
                    offs = start + tl.arange(0, BLOCK)
                    w = _load_w(row_ptr, offs, V, m, t)
                    kept = (w.to(tl.int32, bitcast=True) >= b) & (w > 0.0)
                    wk = tl.where(kept, w, 0.0)
                    cs = running + tl.cumsum(wk, axis=0)  # [BLOCK]
                    hit = (cs[:, None] > target[None, :]) & kept[:, None]  # [BLOCK, BLOCK_S]
                    cand = tl.min(tl.where(hit, offs[:, None], V), axis=0)
                    res = tl.where((res < 0) & (cand < V), cand, res)
                    last = tl.maximum(last, tl.max(tl.where(kept, offs, -1), axis=0))
                    running += tl.sum(wk, axis=0)
                    start += BLOCK
                res = tl.where(res < 0, last, res)  # u * total rounded up to total: last kept token
                tl.store(out_ptr + row * S + so, res.to(tl.int64), mask=so < S)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sample_triton(logits: torch.Tensor, a: SamplingArgs, block: int | None = None) -> torch.Tensor:
    """Launch one program per row. logits [B, V], validated args -> tokens [B, S] int64.

    block: tile width override (a power of 2), so tests can exercise the multi-tile loops on small V."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    S = a.uniforms.shape[1]
    out = torch.empty((B, S), dtype=torch.int64, device=logits.device)
    interp = _interpreting()
    # Interpreter: each loop iteration costs ~1.5 ms regardless of width, so use wide tiles and many pivots
    # (5 passes at NPIV=64 instead of 8 at 16). GPU: 1024 x 16 compare tile = 64 values per thread at 8 warps.
    BLOCK = block or min(triton.next_power_of_2(V), 4096 if interp else 1024)
    NPIV = 64 if interp else 16
    BLOCK_S = max(2, min(triton.next_power_of_2(S), 1024 if interp else 16))
    _sample_kernel[(B,)](
        logits, logits.stride(0), a.uniforms.contiguous(), out, a.temperature, a.top_k, a.top_p, a.min_p, V, S,
        HAS_TOPK=a.has_top_k, HAS_TOPP=a.has_top_p, HAS_MINP=a.has_min_p,
        BLOCK=BLOCK, NPIV=NPIV, BLOCK_S=BLOCK_S, num_warps=8,
    )
    return out


def sample(logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = None, top_p: Param = 1.0,
           min_p: Param = 0.0, generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None,
           backend: str | None = None, check_inputs: bool = True) -> torch.Tensor:
    """Draw one token per row: logits [B, V] -> LongTensor [B].

    temperature / top_k / top_p / min_p: Python scalars or per-row tensors [B] (0 / None / 1.0 / 0.0 = off;
    temperature 0 = greedy). generator: a torch.Generator for the uniforms (drawn on its device). uniforms:
    optional [B] or [B, S] in [0, 1) to use instead (output then [B] or [B, S]; S draws per row share one
    threshold search). backend: "auto" (Triton on CUDA, the torch path otherwise), "triton" or "torch"; None: from
    FLYTHINKER_SAMPLE_BACKEND, else "auto" (kernels/_backend.py). The sort-based oracle is `sample_naive`.
    check_inputs=False skips the NaN/inf/range checks (one host sync on GPU): only for trusted callers.
    """
    chosen = choose("sample", backend, logits.device if isinstance(logits, torch.Tensor) else "cpu")
    a = check_sampling_args(logits, temperature, top_k, top_p, min_p, generator, uniforms, check_inputs)
    if chosen == "triton":
        tok = sample_triton(logits, a)
    elif logits.device.type == "cpu":
        tok = sample_cpu(logits, a)
    else:  # another accelerator, or CUDA without triton: the twin's torch ops run anywhere
        return sample_naive(logits, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                            uniforms=a.uniforms[:, 0] if a.squeeze else a.uniforms)
    return tok[:, 0] if a.squeeze else tok
