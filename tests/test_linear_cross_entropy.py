"""linear_cross_entropy (chunked torch path and Triton kernel under TRITON_INTERPRET=1) vs the naive oracle."""

from __future__ import annotations

import importlib

import pytest
import torch
from flythinker.kernels import linear_cross_entropy, linear_cross_entropy_naive
from flythinker.kernels.linear_cross_entropy import default_chunk_size

from flythinker.configuration import IGNORE_INDEX

# (N, H, V): odd sizes, H and V not powers of two, N not a multiple of the chunk sizes used
SHAPES = [(47, 31, 123), (64, 32, 256), (5, 7, 11)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected| (elementwise relative error is ill-posed near 0)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = e.abs().max().clamp(min=1e-12)
    err = (a - e).abs().max() / scale
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def make_inputs(N, H, V, dtype=torch.float32, ignore_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE_INDEX
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, *, grad_hidden=True, grad_weight=True, **kw):
    h = hidden.detach().clone().requires_grad_(grad_hidden)
    w = weight.detach().clone().requires_grad_(grad_weight)
    loss = fn(h, w, labels, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", [None, 1, 10, 16, 1000])
def test_torch_path_matches_naive_fp32(shape, chunk_size):
    hidden, weight, labels = make_inputs(*shape)
    ref = loss_and_grads(linear_cross_entropy_naive, hidden, weight, labels)
    out = loss_and_grads(linear_cross_entropy, hidden, weight, labels, backend="torch", chunk_size=chunk_size)
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), out, ref, strict=False):
        assert_rel(a, e, 1e-5, name)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loose(dtype):
    hidden, weight, labels = make_inputs(47, 31, 123, dtype)
    ref = loss_and_grads(linear_cross_entropy_naive, hidden.float(), weight.float(), labels)
    for impl in ("torch", "triton"):
        out = loss_and_grads(linear_cross_entropy, hidden, weight, labels, backend=impl, chunk_size=16)
        assert out[1].dtype == dtype and out[2].dtype == dtype  # grads come back in the input dtype
        for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), out, ref, strict=False):
            assert_rel(a, e, TOL[dtype], f"{impl} {dtype} {name}")


@pytest.mark.parametrize("kw", [{}, {"softcap": 2.5}, {"num_items_in_batch": 100}, {"ignore_index": 3}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_matches_torch_path(kw, dtype):
    """The Triton kernel (interpreter) equals the chunked PyTorch path: same chunking, same semantics."""
    hidden, weight, labels = make_inputs(23, 31, 123, dtype)
    if "ignore_index" in kw:
        labels[labels == IGNORE_INDEX] = 3
    tri = loss_and_grads(linear_cross_entropy, hidden, weight, labels, backend="triton", chunk_size=10, **kw)
    ref = loss_and_grads(linear_cross_entropy, hidden, weight, labels, backend="torch", chunk_size=10, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: dlogits rounded to fp16 on both paths
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), tri, ref, strict=False):
        assert_rel(a, e, tol, f"{kw} {name}")


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_triton_online_softmax_over_many_tiles(monkeypatch, softcap):
    """Rows spanning many V tiles (V=1000 in 64-wide tiles, the last one partial) equal the oracle."""
    lce_module = importlib.import_module("flythinker.kernels.linear_cross_entropy")  # the module, not the fn
    monkeypatch.setattr(lce_module, "_MAX_BLOCK_V", 64)
    hidden, weight, labels = make_inputs(9, 8, 1000)
    hidden = hidden * 4
    labels[1] = 999  # target in the partial last tile
    ref = loss_and_grads(linear_cross_entropy_naive, hidden, weight, labels, softcap=softcap)
    out = loss_and_grads(linear_cross_entropy, hidden, weight, labels, backend="triton", chunk_size=4,
                         softcap=softcap)
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), out, ref, strict=False):
        assert_rel(a, e, 1e-5, name)


@pytest.mark.parametrize("softcap", [1.0, 30.0])
def test_softcap_matches_naive(softcap):
    hidden, weight, labels = make_inputs(47, 31, 123)
    hidden = hidden * 3  # logits large enough for the cap to matter
    ref = loss_and_grads(linear_cross_entropy_naive, hidden, weight, labels, softcap=softcap)
    out = loss_and_grads(linear_cross_entropy, hidden, weight, labels, backend="torch", chunk_size=10, softcap=softcap)
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), out, ref, strict=False):
        assert_rel(a, e, 1e-5, name)
    plain = linear_cross_entropy(hidden, weight, labels)
    assert not torch.allclose(plain, out[0])  # the cap changed the loss


@pytest.mark.parametrize("impl", ["torch", "triton", "naive"])
def test_all_ignored_gives_zero_loss_and_grads(impl):
    hidden, weight, labels = make_inputs(12, 8, 20)
    labels[:] = IGNORE_INDEX
    if impl == "naive":
        loss, gh, gw = loss_and_grads(linear_cross_entropy_naive, hidden, weight, labels)
    else:
        loss, gh, gw = loss_and_grads(linear_cross_entropy, hidden, weight, labels, backend=impl, chunk_size=5)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_ignored_rows_get_zero_grad_and_do_not_count():
    hidden, weight, labels = make_inputs(20, 16, 50, ignore_every=3)
    loss, gh, _ = loss_and_grads(linear_cross_entropy, hidden, weight, labels, backend="torch", chunk_size=7)
    assert torch.count_nonzero(gh[labels == IGNORE_INDEX]) == 0
    keep = labels != IGNORE_INDEX
    sub = linear_cross_entropy(hidden[keep], weight, labels[keep], backend="torch")
    assert_rel(loss, sub, 1e-6, "mean over valid rows only")


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_gradient_accumulation(as_tensor):
    """Two micro-batches divided by the global count sum to the loss/grads of the whole batch."""
    hidden, weight, labels = make_inputs(40, 16, 50, ignore_every=3)
    full = loss_and_grads(linear_cross_entropy_naive, hidden, weight, labels)
    n_items = int((labels != IGNORE_INDEX).sum())
    n_items = torch.tensor(n_items) if as_tensor else n_items
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    total = 0.0
    for sl in (slice(0, 17), slice(17, 40)):
        part = linear_cross_entropy(h[sl], w, labels[sl], num_items_in_batch=n_items, backend="torch", chunk_size=6)
        part.backward()
        total = total + part.detach()
    assert_rel(total, full[0], 1e-5, "loss")
    assert_rel(h.grad, full[1], 1e-5, "grad_hidden")
    assert_rel(w.grad, full[2], 1e-5, "grad_weight")
    # and the naive oracle agrees on the num_items semantics
    ref = loss_and_grads(linear_cross_entropy_naive, hidden, weight, labels, num_items_in_batch=n_items)
    out = loss_and_grads(linear_cross_entropy, hidden, weight, labels, num_items_in_batch=n_items)
    assert_rel(out[0], ref[0], 1e-5, "loss with num_items")


def test_non_contiguous_hidden_and_int32_labels():
    hidden, weight, labels = make_inputs(31, 24, 77)
    big = torch.randn(24, 62)
    hidden_nc = big.t()[::2]  # [31, 24], neither row- nor column-contiguous
    assert not hidden_nc.is_contiguous()
    ref = loss_and_grads(linear_cross_entropy_naive, hidden_nc.contiguous(), weight, labels)
    for impl in ("torch", "triton"):
        out = loss_and_grads(linear_cross_entropy, hidden_nc, weight, labels.int(), backend=impl, chunk_size=8)
        for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), out, ref, strict=False):
            assert_rel(a, e, 1e-5, f"{impl} {name}")


def test_frozen_weight_or_hidden():
    hidden, weight, labels = make_inputs(47, 31, 123)
    ref = loss_and_grads(linear_cross_entropy_naive, hidden, weight, labels)
    loss, gh, gw = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_weight=False, chunk_size=10)
    assert gw is None
    assert_rel(gh, ref[1], 1e-5, "grad_hidden (frozen head)")
    loss, gh, gw = loss_and_grads(linear_cross_entropy, hidden, weight, labels, grad_hidden=False, chunk_size=10)
    assert gh is None
    assert_rel(gw, ref[2], 1e-5, "grad_weight (frozen hidden)")


def test_grad_output_scaling_and_downstream_use():
    hidden, weight, labels = make_inputs(20, 16, 50)
    ref = loss_and_grads(lambda *a, **k: 3.0 * linear_cross_entropy_naive(*a, **k) ** 2, hidden, weight, labels)
    out = loss_and_grads(lambda *a, **k: 3.0 * linear_cross_entropy(*a, **k) ** 2, hidden, weight, labels,
                         chunk_size=7)
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), out, ref, strict=False):
        assert_rel(a, e, 1e-5, name)


def test_gradcheck_fp64():
    hidden, weight, labels = make_inputs(6, 5, 9, torch.float64, ignore_every=3)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, labels, chunk_size=4, backend="torch"),
                                    (h, w))
    assert torch.autograd.gradcheck(
        lambda a, b: linear_cross_entropy(a, b, labels, chunk_size=4, softcap=2.0, backend="torch"), (h, w))


def test_no_grad_and_backward_twice():
    hidden, weight, labels = make_inputs(20, 16, 50)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, labels)
    assert not loss.requires_grad
    assert_rel(loss, linear_cross_entropy_naive(hidden, weight, labels), 1e-5, "no_grad loss")
    loss = linear_cross_entropy(h, w, labels)
    loss.backward(retain_graph=True)
    g1 = h.grad.clone()
    loss.backward()  # grad_output == 1: the saved gradients are untouched, a retained graph runs again
    assert_rel(h.grad, 2 * g1, 1e-6, "second backward")
    scaled = 2.0 * linear_cross_entropy(h, w, labels)
    scaled.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # scaled in place: a second pass must not be silent
        scaled.backward()


def test_autocast_bf16_casts_like_linear():
    hidden, weight, labels = make_inputs(20, 16, 50)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels, chunk_size=8)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = loss_and_grads(linear_cross_entropy_naive, hidden, weight, labels)
    assert_rel(loss, ref[0], 2e-2, "loss under autocast")
    assert_rel(h.grad, ref[1], 5e-2, "grad_hidden under autocast")


def test_default_chunk_size():
    assert default_chunk_size(4096, 49152, 576) == 512  # logits slab no larger than the LM head
    assert default_chunk_size(4096, 151936, 576) == 512
    assert default_chunk_size(100, 49152, 576) == 100  # never more than N
    assert default_chunk_size(10**6, 262144, 8192) == 512  # capped at 2^27 elements


@pytest.mark.parametrize(
    "args, kw, err, match",
    [
        (((4, 8), (10, 8), (4, 2)), {}, ValueError, "labels \\[N\\]"),
        (((4, 8), (10, 7), (4,)), {}, ValueError, "width"),
        (((4, 8), (10, 8), (5,)), {}, ValueError, "5 labels for 4"),
        (((4, 8), (10, 8), (4,)), {"chunk_size": 0}, ValueError, "chunk_size"),
        (((4, 8), (10, 8), (4,)), {"backend": "cuda"}, ValueError, "unknown backend 'cuda'"),
        (((4, 8), (10, 8), (4,)), {"backend": "naive"}, ValueError, "call linear_cross_entropy_naive"),
        (((4, 8), (10, 8), (4,)), {"backend": "cpp"}, ValueError, "not implemented"),
        (((4, 8), (10, 8), (4,)), {"impl": "torch", "backend": "triton"}, ValueError, "disagree"),
        (((4, 8), (10, 8), (4,)), {"softcap": -1.0}, ValueError, "softcap"),
        (((4, 8), (10, 8), (4,)), {"num_items_in_batch": -3}, ValueError, "num_items_in_batch"),
        (((4, 8), (10, 8), (4,)), {"num_items_in_batch": torch.ones(2)}, ValueError, "scalar"),
        (((4, 8), (10, 8), (4,)), {"num_items_in_batch": "7"}, TypeError, "num_items_in_batch"),
    ],
)
def test_bad_input_errors(args, kw, err, match):
    hs, ws, ls = args
    with pytest.raises(err, match=match):
        linear_cross_entropy(torch.randn(hs), torch.randn(ws), torch.zeros(ls, dtype=torch.long), **kw)


def test_bad_dtypes_and_labels():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(TypeError, match="integer"):
        linear_cross_entropy(h, w, torch.zeros(4))
    with pytest.raises(TypeError, match="dtypes differ"):
        linear_cross_entropy(h, w.double(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 10, IGNORE_INDEX]))
    with pytest.raises(ValueError, match="out of range"):
        linear_cross_entropy(h, w, torch.tensor([0, -1, 2, 3]))
    # the earlier argument name still selects the backend
    ok = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(linear_cross_entropy(h, w, ok, impl="torch"), linear_cross_entropy_naive(h, w, ok))


def test_no_grad_skips_gradient_work_and_matches():
    """Under no_grad (evaluation) the loss is the same and no gradient buffers are built (the autograd Function,
    whose needs_input_grad stays True under no_grad, is bypassed)."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 24, requires_grad=True)
    weight = torch.randn(101, 24, requires_grad=True)
    labels = torch.randint(0, 101, (37,))
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    assert got.grad_fn is None
    want = linear_cross_entropy_naive(hidden.detach(), weight.detach(), labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
