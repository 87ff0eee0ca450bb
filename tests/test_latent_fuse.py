"""flythinker.kernels.latent_fuse: Triton (interpreter) and C++ backends against the PyTorch twin, gradcheck,
edge cases and input validation. The C++ op compiles once (~40 s on two busy cores) and is cached."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from flythinker.kernels import latent_fuse_cpp
from flythinker.kernels._backend import choose
from flythinker.kernels.latent_fuse import latent_fuse
from flythinker.kernels.latent_fuse_naive import latent_fuse_naive, vocab_mean_norm

HAS_CPP = latent_fuse_cpp.load()
BACKENDS = ["triton", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler"))]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=1e-1, rtol=5e-2), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def make(B, T, H_g, H_r, *, V=37, dtype=torch.float32, linear=False, prev=False, pad=(), noncontig=False,
         mask_dtype=torch.float32, lat_dtype=None):
    """Inputs for one case. pad[b] = number of left-padding slots of row b (mask 0 there)."""
    lat_dtype = lat_dtype or dtype
    if noncontig:  # every tensor strided: ids transposed, weight rows padded, latent channels interleaved
        ids = torch.randint(0, V, (T, B)).T
        W = torch.randn(V, H_g + 5, dtype=dtype)[:, 3:H_g + 3]
        L = torch.randn(T, B, 2 * H_r, dtype=lat_dtype).transpose(0, 1)[..., ::2]
        P = torch.randn(H_r, H_g, dtype=dtype).T / H_r**0.5 if linear else None
        pv = torch.randn(H_r, B, dtype=lat_dtype).T if prev else None
    else:
        ids = torch.randint(0, V, (B, T))
        W = torch.randn(V, H_g, dtype=dtype)
        L = torch.randn(B, T, H_r, dtype=lat_dtype)
        P = torch.randn(H_g, H_r, dtype=dtype) / H_r**0.5 if linear else None
        pv = torch.randn(B, H_r, dtype=lat_dtype) if prev else None
    ids[0, : T // 2] = ids[0, -1]  # repeated ids: the weight gradient must accumulate
    mask = torch.ones(B, T)
    for b, n in enumerate(pad):
        mask[b, :n] = 0
    return ids, W, L, mask.to(mask_dtype), P, pv


def run(fn, ids, W, L, mask, P, pv, g=None, **kw):
    """Forward + gradients (weight, latent, projection, prev_latent) of fn with a fixed upstream gradient."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (W, L, P, pv)]
    Wl, Ll, Pl, pvl = leaves
    out = fn(ids, Wl, Ll, mask, projection=Pl, prev_latent=pvl, **kw)
    g = torch.randn(out.shape, dtype=torch.float32).to(out.dtype) if g is None else g
    grads = torch.autograd.grad(out, [x for x in leaves if x is not None], g)
    return out, grads, g


def check_case(backend, ids, W, L, mask, P, pv, tol, **kw):
    ref, rgrads, g = run(latent_fuse_naive, ids, W, L, mask, P, pv, **kw)
    out, grads, _ = run(latent_fuse, ids, W, L, mask, P, pv, g=g, backend=backend, **kw)
    assert out.dtype == W.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **tol)
    for name, a, b in zip(["weight", "latent", "projection", "prev_latent"], grads, rgrads, strict=False):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad {name}: {m}")


# (B, T, H_g, H_r, linear, norm_target, prev, left padding, non-contiguous): odd T, H not a power of two
CASES = [
    (1, 7, 576, 576, False, "vocab_mean", False, (2,), False),
    (2, 5, 60, 44, False, "token", True, (0, 3), False),
    (3, 3, 1000, 576, True, 2.5, True, (1, 0, 2), True),
    (4, 3, 60, 100, True, "token", False, (0, 1, 2, 0), False),
    (2, 4, 1000, 576, False, "vocab_mean", True, (3, 0), True),
    (3, 2, 60, 60, False, 0.75, True, (0, 2, 1), True),
    (3, 1, 60, 44, True, "token", True, (), False),  # a decode step: only prev_latent is fused
]


def _case_id(c):
    return f"B{c[0]}T{c[1]}G{c[2]}R{c[3]}-{'lin' if c[4] else 'pad'}-{c[5]}"


# every case with the full norm gradient; the simpler detached gradient on every other case (test time)
FP32_GRID = [pytest.param(c, d, id=f"{_case_id(c)}-{'detach' if d else 'full'}")
             for i, c in enumerate(CASES) for d in ((False, True) if i % 2 == 0 else (False,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,detach", FP32_GRID)
def test_matches_twin_fp32(backend, detach, case):
    B, T, H_g, H_r, linear, nt, prev, pad, nc = case
    inputs = make(B, T, H_g, H_r, linear=linear, prev=prev, pad=pad, noncontig=nc,
                  mask_dtype=[torch.float32, torch.bool, torch.int64][B % 3])
    check_case(backend, *inputs, TOL[torch.float32], lam=0.5, norm_target=nt, detach_norm=detach)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]], ids=_case_id)
def test_matches_twin_fp16(backend, case):
    B, T, H_g, H_r, linear, nt, prev, pad, nc = case
    inputs = make(B, T, H_g, H_r, dtype=torch.float16, linear=linear, prev=prev, pad=pad, noncontig=nc)
    check_case(backend, *inputs, TOL[torch.float16], lam=0.5, norm_target=nt, detach_norm=False)


@pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler")
def test_cpp_bf16_and_fp64():
    for dtype in (torch.bfloat16, torch.float64):
        inputs = make(2, 5, 60, 44, dtype=dtype, prev=True, pad=(0, 2))
        check_case("cpp", *inputs, TOL[dtype], lam=0.5, norm_target="token", detach_norm=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    """fp32 reasoner latents into an fp16 generator: output fp16, latent gradient fp32."""
    inputs = make(2, 5, 60, 44, dtype=torch.float16, lat_dtype=torch.float32, prev=True, pad=(1, 0))
    check_case(backend, *inputs, TOL[torch.float16], lam=0.5, norm_target="vocab_mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_norm_target_and_cached_vocab_mean(backend):
    ids, W, L, mask, _, pv = make(2, 5, 60, 44, prev=True)
    c = vocab_mean_norm(W)
    a = latent_fuse(ids, W, L, mask, lam=0.5, norm_target=c, prev_latent=pv, backend=backend)
    b = latent_fuse(ids, W, L, mask, lam=0.5, norm_target=float(c), prev_latent=pv, backend=backend)
    r = latent_fuse_naive(ids, W, L, mask, lam=0.5, norm_target="vocab_mean", prev_latent=pv)
    torch.testing.assert_close(a, r, **TOL[torch.float32])
    torch.testing.assert_close(b, r, **TOL[torch.float32])


def _gradcheck_inputs(linear, prev, eps_small):
    torch.manual_seed(1)
    B, T, H_g, H_r, V = 2, 3, 6, 4, 5
    ids = torch.tensor([[1, 1, 3], [0, 4, 2]])
    W = torch.randn(V, H_g, dtype=torch.float64)
    L = torch.randn(B, T, H_r, dtype=torch.float64)
    if eps_small:  # every norm below eps: the clamp makes it a constant, so the detached gradient is exact
        L = L * 0.01
    P = torch.randn(H_g, H_r, dtype=torch.float64) if linear else None
    pv = torch.randn(B, H_r, dtype=torch.float64) * (0.01 if eps_small else 1) if prev else None
    mask = torch.tensor([[0.0, 1, 1], [1, 1, 1]], dtype=torch.float64)
    return ids, W, L, mask, P, pv


@pytest.mark.parametrize("impl", ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no C++"))])
@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize(
    "norm_target,detach,grad_w,eps",
    [("token", False, True, 1e-6), (1.7, False, True, 1e-6), ("vocab_mean", False, False, 1e-6),
     (1.7, True, True, 1.0), ("token", True, False, 1.0)],
)
def test_gradcheck_fp64(impl, linear, norm_target, detach, grad_w, eps):
    """gradcheck: "vocab_mean" c is a constant by definition (no grad to the table through it), and with
    detach_norm=True the latent norms are clamped at eps so the detached gradient is the true one."""
    ids, W, L, mask, P, pv = _gradcheck_inputs(linear, True, eps_small=detach)
    W.requires_grad_(grad_w)
    for x in (L, P, pv):
        if x is not None:
            x.requires_grad_()

    def f(W, L, P, pv):
        return latent_fuse(ids, W, L, mask, lam=0.7, norm_target=norm_target, projection=P, prev_latent=pv,
                           eps=eps, detach_norm=detach, backend=impl)

    assert torch.autograd.gradcheck(f, (W, L, P, pv), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("linear", [False, True])
def test_zero_latent_row_no_nan(backend, linear):
    ids, W, L, mask, P, pv = make(2, 4, 60, 44, linear=linear, prev=True)
    L[0, 1] = 0
    pv[1] = 0
    for nt in ("vocab_mean", "token"):
        out, grads, _ = run(latent_fuse, ids, W, L, mask, P, pv, lam=0.5, norm_target=nt, detach_norm=False,
                            backend=backend)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        # a zero source adds nothing: position 2 of row 0 and position 0 of row 1 are the plain embeddings
        torch.testing.assert_close(out[0, 2], W[ids[0, 2]], atol=1e-6, rtol=0)
        torch.testing.assert_close(out[1, 0], W[ids[1, 0]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lambda_zero_is_exact(backend, dtype):
    ids, W, L, mask, P, pv = make(3, 5, 60, 44, dtype=dtype, prev=True, linear=True)
    out = latent_fuse(ids, W, L, mask, lam=0.0, norm_target="token", projection=P, prev_latent=pv, backend=backend)
    assert torch.equal(out, W[ids])


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_lambda_allowed_explicitly(backend):
    ids, W, L, mask, _, pv = make(2, 3, 60, 44, prev=True)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        latent_fuse(ids, W, L, mask, lam=-0.5, backend=backend)
    out = latent_fuse(ids, W, L, mask, lam=-0.5, prev_latent=pv, allow_negative_lambda=True, backend=backend)
    torch.testing.assert_close(out, latent_fuse_naive(ids, W, L, mask, lam=-0.5, prev_latent=pv))


def _bad_inputs():
    ids, W, L, mask, P, pv = make(2, 3, 8, 6, V=10, prev=True)
    base = dict(input_ids=ids, weight=W, latent=L, mask=mask, lam=0.5)
    big = ids.clone()
    big[1, 2] = 10
    neg = ids.clone()
    neg[0, 0] = -1
    nan_lat = L.clone()
    nan_lat[1, 1, 2] = float("nan")
    inf_prev = pv.clone()
    inf_prev[0, 0] = float("inf")
    return [
        ("id too big", dict(base, input_ids=big), ValueError, "out of range"),
        ("negative id", dict(base, input_ids=neg), ValueError, "out of range"),
        ("float ids", dict(base, input_ids=ids.float()), TypeError, "integer"),
        ("ids rank", dict(base, input_ids=ids[0]), ValueError, r"input_ids must be \[B, T\]"),
        ("weight dtype", dict(base, weight=W.long()), TypeError, "weight must be a floating"),
        ("latent rank", dict(base, latent=L[0]), ValueError, "latent must have 3 dims"),
        ("latent shape", dict(base, latent=L[:, :2]), ValueError, r"latent must be \[B, T, H_r\]"),
        ("pad H_r > H_g", dict(base, latent=torch.randn(2, 3, 9)), ValueError, "H_r <= H_g"),
        ("mask shape", dict(base, mask=mask[:, :2]), ValueError, "mask must be"),
        ("prev shape", dict(base, prev_latent=pv[:1]), ValueError, "prev_latent must be"),
        ("projection shape", dict(base, projection=P if P is not None else torch.randn(6, 8)), ValueError,
         "projection must be"),
        ("lam nan", dict(base, lam=float("nan")), ValueError, "lam must be finite"),
        ("lam inf", dict(base, lam=float("inf")), ValueError, "lam must be finite"),
        ("lam str", dict(base, lam="0.5"), TypeError, "lam must be a real number"),
        ("negative lam", dict(base, lam=-0.1), ValueError, "allow_negative_lambda"),
        ("unknown norm", dict(base, norm_target="rms"), ValueError, "unknown norm_target"),
        ("negative norm", dict(base, norm_target=-1.0), ValueError, "finite and >= 0"),
        ("eps", dict(base, eps=0.0), ValueError, "eps must be"),
        ("nan latent", dict(base, latent=nan_lat), ValueError, "latent contains NaN"),
        ("inf prev", dict(base, prev_latent=inf_prev), ValueError, "prev_latent contains NaN"),
        ("device", dict(base, latent=torch.empty(2, 3, 6, device="meta")), ValueError, "one device"),
        ("backend", dict(base, backend="cuda"), ValueError, "unknown backend"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises(case):
    _, kw, exc, msg = case
    with pytest.raises(exc, match=msg):
        latent_fuse(**kw)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert choose("latent_fuse", None, cpu) == ("cpp" if HAS_CPP else "torch")  # never the interpreter
    assert choose("latent_fuse", None, "cuda") == "triton"
    monkeypatch.setenv("FLYTHINKER_LATENT_FUSE_BACKEND", "torch")
    assert choose("latent_fuse", None, cpu) == "torch"
    assert choose("latent_fuse", "triton", cpu) == "triton"  # tests run with TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA"):
        choose("latent_fuse", "triton", cpu)
    with pytest.raises(ValueError, match="needs CPU tensors"):
        choose("latent_fuse", "cpp", torch.device("meta"))
    assert choose("latent_fuse", None, torch.device("meta")) == "torch"
    with pytest.raises(ValueError, match="not implemented"):
        choose("linear_cross_entropy", "cpp", cpu)


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(latent_fuse_cpp, "_state", {"tried": False, "ok": False, "error": None})
    monkeypatch.setattr(latent_fuse_cpp, "_registered", lambda: False)

    def no_compiler():
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(latent_fuse_cpp, "_build", no_compiler)
    monkeypatch.delenv("FLYTHINKER_LATENT_FUSE_BACKEND", raising=False)
    ids, W, L, mask, _, _ = make(2, 3, 8, 6)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = [latent_fuse(ids, W, L, mask, lam=0.5) for _ in range(3)]
    msgs = [str(w.message) for w in rec if "C++ CPU op" in str(w.message)]
    assert len(msgs) == 1 and "command not found" in msgs[0] and "PyTorch twin" in msgs[0]
    torch.testing.assert_close(outs[0], latent_fuse_naive(ids, W, L, mask, lam=0.5))
    with pytest.raises(RuntimeError, match="C\\+\\+ op, which is unavailable"):
        latent_fuse(ids, W, L, mask, lam=0.5, backend="cpp")


@pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler")
def test_cpp_op_traces_under_torch_compile():
    """The fake kernels let dynamo/AOTAutograd trace the custom ops (aot_eager: no inductor compile needed)."""
    ids, W, L, mask, _, pv = make(2, 5, 60, 44, prev=True)
    L.requires_grad_()

    def f(ids, W, L, mask, pv):
        return latent_fuse(ids, W, L, mask, lam=0.5, norm_target=1.3, prev_latent=pv, backend="cpp",
                           check_inputs=False)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(ids, W, L, mask, pv)
    out.sum().backward()
    ref = latent_fuse_naive(ids, W, L.detach().requires_grad_(), mask, lam=0.5, norm_target=1.3, prev_latent=pv)
    torch.testing.assert_close(out, ref)


def test_interpreter_is_on():
    assert os.environ.get("TRITON_INTERPRET") == "1"
