"""Fused linear cross-entropy: LM head + softmax cross-entropy without materialising the [N, V] logits.

Lineage: mgmalek/efficient_cross_entropy and Liger-Kernel's FusedLinearCrossEntropy. The tokens are processed
in chunks of C rows; per chunk
    logits = x_chunk @ W^T                       # [C, V], cuBLAS/MKL matmul into one reused buffer
    loss, dlogits = CE(logits) (in place)        # Triton online-softmax kernel (CUDA) or in-place torch ops (CPU)
    grad_hidden[chunk] = dlogits @ W             # [C, H]
    grad_weight += dlogits^T @ x_chunk           # [V, H], fp32 accumulator
Cross-entropy is the last op of the graph, so the gradients are computed in forward (scaled by 1/denominator)
and backward only multiplies them by grad_output. Peak extra memory is one [C, V] slab (+ an fp32 twin for
half inputs on the CPU path) and the [V, H] fp32 grad accumulator instead of several [N, V] fp32 tensors.

Measured on this shared CPU (benchmarks/bench_loss.py, fwd+bwd, N=4096, H=576, fp32, C=512, 1 thread, peak RSS
growth / CPU time vs logits + F.cross_entropy): V=49152: 224 MiB vs 2314 MiB (0.097x), 13.3 s vs 13.9 s (0.96x);
V=151936: 651 MiB vs 7132 MiB (0.091x), 34.7 s vs 43.7 s (0.79x). The three matmuls are ~93% of the fused
time on CPU (per 512-row chunk: 0.60 + 0.47 + 0.47 s vs 0.12 s for all the in-place softmax passes).
"""

from __future__ import annotations

import torch

from ._backend import HAS_TRITON, choose, register
from .linear_cross_entropy_naive import loss_denominator

if HAS_TRITON:
    import triton
    import triton.language as tl

# Default chunk: the [C, V] logits slab is kept no larger than the LM head itself (C ~ H rows, e.g. 512 for
# SmolLM2's H=576) and at most 2^27 elements (512 MiB fp32). Liger's original C=1 floor (C ~ N*H/V, 64 rows
# here) made the op launch-bound on GPUs (Liger PR #1414); on this CPU (1 thread, N=4096, H=576, V=49152,
# benchmarks/bench_loss.py --chunks) 64-row chunks took 16.2 s vs 11.9 s at 512 (1.36x) and 10.5 s at 2048,
# with peak growth 140 / 224 / 512 MiB: 512 keeps memory at ~0.1x of the naive path for <= 0.96x its time.
_MAX_SLAB_ELEMENTS = 1 << 27
_MIN_CHUNK = 32
# widest V tile of the Triton kernel: V=49152 takes two tiles (tests shrink it to exercise the online softmax)
_MAX_BLOCK_V = 32768


def default_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk: the largest power of two whose [C, V] slab is <= min(V*H, 2^27) elements."""
    rows = max(1, min(vocab * hidden, _MAX_SLAB_ELEMENTS) // vocab)
    chunk = max(_MIN_CHUNK, 1 << (rows.bit_length() - 1))
    return max(1, min(chunk, n_tokens))


# ----------------------------------------------------------------------------------------------------------
# Triton: one program per row, online softmax over V in BLOCK_V tiles, dlogits written over the logits.
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # no libdevice in the interpreter; tanh(x) = 1 - 2 / (exp(2x) + 1) saturates cleanly at +-1
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _ce_fwd_bwd_kernel(logits_ptr, stride_row, labels_ptr, loss_ptr, scale_ptr, n_cols, ignore_index,
                           softcap, HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                           BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        logits_ptr += row * stride_row
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            if COMPUTE_GRAD:  # a zero dlogits row keeps the following matmuls free of masking
                for off in range(0, n_cols, BLOCK_V):
                    cols = off + tl.arange(0, BLOCK_V)
                    tl.store(logits_ptr + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(logits_ptr.dtype.element_ty),
                             mask=cols < n_cols)
            tl.store(loss_ptr + row, 0.0)
            return

        # pass 1: running max m and running sum d of exp(z - m) (Milakov & Gimelshein, arXiv 1805.02867)
        m = float("-inf")
        d = 0.0
        for off in range(0, n_cols, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            z = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(z - m_new), 0.0), axis=0)
            m = m_new
        z_y = tl.load(logits_ptr + label).to(tl.float32)
        if HAS_SOFTCAP:
            z_y = softcap * _tanh(z_y / softcap)
        lse = m + tl.log(d)
        tl.store(loss_ptr + row, lse - z_y)

        # pass 2: dlogits = (softmax - onehot) * scale (* dz/dlogit under softcap), written in place
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr).to(tl.float32)
            for off in range(0, n_cols, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                mask = cols < n_cols
                x = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(x / softcap)
                    z = softcap * t
                else:
                    z = x
                g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
                g = g * scale
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                tl.store(logits_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _ce_chunk_triton(logits, labels, loss_rows, scale, ignore_index, softcap, compute_grad):
    """logits [c, V] (overwritten by dlogits), labels [c] int64, loss_rows [c] fp32 (unscaled per-row loss)."""
    c, V = logits.shape
    block = min(_MAX_BLOCK_V, triton.next_power_of_2(V))
    # wide rows: 32 warps keep 32 fp32 values per thread at BLOCK_V=32768 (Liger's setting)
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    _ce_fwd_bwd_kernel[(c,)](logits, logits.stride(0), labels, loss_rows, scale, V, ignore_index,
                             float(softcap) if softcap is not None else 1.0, HAS_SOFTCAP=softcap is not None,
                             COMPUTE_GRAD=compute_grad, BLOCK_V=block, num_warps=num_warps)
    return logits


# ----------------------------------------------------------------------------------------------------------
# PyTorch (CPU) twin of the kernel: in-place ops on one fp32 [c, V] buffer, no [c, V] temporaries.
# ----------------------------------------------------------------------------------------------------------
def _ce_chunk_torch(logits, labels, loss_rows, scale, ignore_index, softcap, compute_grad, work, tanh_buf):
    """Same contract as `_ce_chunk_triton`; `work` is an fp32 [>=c, V] buffer (may alias `logits`)."""
    c = logits.shape[0]
    z = work[:c]
    if z.data_ptr() != logits.data_ptr():
        z.copy_(logits)  # half inputs: softmax in fp32
    t = None
    if softcap is not None:
        z.div_(softcap).tanh_()
        if compute_grad:
            t = tanh_buf[:c]
            t.copy_(z)
        z.mul_(softcap)
    valid = labels != ignore_index  # [c]
    safe = torch.where(valid, labels, 0)
    rows = torch.arange(c, device=z.device)
    z_y = z[rows, safe]  # [c], gathered before z is overwritten
    m = z.amax(dim=1, keepdim=True)  # [c, 1]
    z.sub_(m).exp_()
    s = z.sum(dim=1)  # [c]
    lse = m.squeeze(1) + s.log()
    loss_rows.copy_((lse - z_y).masked_fill_(~valid, 0.0))
    if not compute_grad:
        return None
    row_scale = valid.to(z.dtype) * scale  # [c]: 0 for ignored rows
    z.mul_((row_scale / s).unsqueeze(1))  # softmax * scale
    z.index_put_((rows, safe), -row_scale, accumulate=True)  # - onehot * scale
    if t is not None:
        z.mul_(t.mul_(t).neg_().add_(1.0))  # d softcap*tanh(x/softcap) / dx = 1 - tanh^2
    if z.data_ptr() != logits.data_ptr():
        logits.copy_(z)  # matmuls in the input dtype, as on the Triton path
    return logits


def _fused_forward(hidden, weight, labels, scale, ignore_index, chunk_size, softcap, need_gx, need_gw,
                   use_triton):
    """Loss (fp32 scalar, fp64 for fp64 inputs; already divided by the denominator) and gradients (or None) of hidden and weight."""
    N, H = hidden.shape
    V = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    compute_grad = need_gx or need_gw
    C = min(chunk_size, N) if N > 0 else 1
    acc_dtype = torch.promote_types(dtype, torch.float32)  # fp32 for fp16/bf16/fp32, fp64 for gradcheck
    loss_rows = torch.empty(N, dtype=acc_dtype, device=device)  # [N] unscaled per-token loss
    grad_hidden = torch.empty((N, H), dtype=dtype, device=device) if need_gx else None  # [N, H]
    grad_weight = torch.zeros((V, H), dtype=acc_dtype, device=device) if need_gw else None  # [V, H]
    slab = torch.empty((C, V), dtype=dtype, device=device)  # [C, V], reused by every chunk
    work = tanh_buf = None
    if not use_triton:
        work = slab if dtype == acc_dtype else torch.empty((C, V), dtype=acc_dtype, device=device)
        if softcap is not None and compute_grad:
            tanh_buf = torch.empty((C, V), dtype=acc_dtype, device=device)
    w_t = weight.t()  # [H, V] view
    for start in range(0, N, C):
        end = min(start + C, N)
        x = hidden[start:end]  # [c, H]
        logits = torch.mm(x, w_t, out=slab[: end - start])  # [c, V]
        if use_triton:
            dlogits = _ce_chunk_triton(logits, labels[start:end], loss_rows[start:end], scale, ignore_index,
                                       softcap, compute_grad)
        else:
            dlogits = _ce_chunk_torch(logits, labels[start:end], loss_rows[start:end], scale, ignore_index,
                                      softcap, compute_grad, work, tanh_buf)
        if need_gx:
            torch.mm(dlogits, weight, out=grad_hidden[start:end])
        if need_gw:
            if dlogits.dtype == acc_dtype:
                grad_weight.addmm_(dlogits.t(), x)
            else:  # half: per-chunk product rounded once, then accumulated in fp32 across chunks
                grad_weight.add_(dlogits.t() @ x)
    # scale is [] (torch) or [1] (triton). .sum(), not .reshape(()): a view returned from an autograd Function
    # forbids in-place ops on the loss, and HF Trainer does `loss *= num_processes`.
    loss = (loss_rows.sum() * scale).sum()
    if grad_weight is not None and weight.dtype != acc_dtype:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, ignore_index, chunk_size, softcap, use_triton):
        """hidden: [N, H], weight: [V, H], labels: [N] int64, scale: [] fp32 (1/denominator)."""
        need_gx, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, gx, gw = _fused_forward(hidden, weight, labels, scale, ignore_index, chunk_size, softcap,
                                      need_gx, need_gw, use_triton)
        ctx.save_for_backward(gx, gw)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        gx, gw = ctx.saved_tensors
        # grad_output == 1 (the usual case) is checked only on CPU, where .item() is free: the saved gradients
        # are returned as they are (autograd steals them, and a retained graph can run backward again).
        # Otherwise they are scaled in place, as Liger does, to avoid a second [V, H] buffer; a second backward
        # through a retained graph then raises autograd's "modified by an inplace operation" error.
        if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
            return gx, gw, None, None, None, None, None, None
        if gx is not None:
            gx.mul_(grad_output)
        if gw is not None:
            gw.mul_(grad_output)
        return gx, gw, None, None, None, None, None, None


register("linear_cross_entropy", ("triton", "torch"))


def _check_args(hidden, weight, labels, chunk_size, softcap):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"linear_cross_entropy: expected hidden [N, H], weight [V, H], labels [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden width {hidden.shape[1]} != weight width {weight.shape[1]}")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: {labels.shape[0]} labels for {hidden.shape[0]} hidden rows")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"linear_cross_entropy: hidden/weight must be floating point, got {hidden.dtype}, "
                        f"{weight.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: tensors on different devices: hidden {hidden.device}, "
                         f"weight {weight.device}, labels {labels.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive int or None, got {chunk_size!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"linear_cross_entropy: softcap must be a positive number or None, got {softcap!r}")


def _check_label_range(labels, vocab, ignore_index):
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"linear_cross_entropy: labels out of range [0, {vocab}) "
                             f"(and != ignore_index={ignore_index}): {labels[bad][:5].tolist()}")
    else:  # device-side assert: no host sync
        torch._assert_async(~bad.any(), f"linear_cross_entropy: labels out of range [0, {vocab})")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, num_items_in_batch: torch.Tensor | int | None = None,
                         chunk_size: int | None = None, softcap: float | None = None,
                         backend: str | None = None, check_inputs: bool = True, impl: str | None = None
                         ) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` without materialising the [N, V] logits.

    hidden: [N, H], weight: [V, H] (the LM head), labels: [N] int (`ignore_index` rows contribute nothing).
    Returns an fp32 scalar: sum of token losses / `num_items_in_batch` (HF Trainer's gradient-accumulation
    count; tensor or int) or / the number of non-ignored labels; 0 (and zero gradients) if all are ignored.
    chunk_size: tokens per chunk (default `default_chunk_size`). softcap: Gemma-2 final-logit softcapping.
    backend: "auto" (Triton for CUDA tensors, else the chunked PyTorch path), "triton" (also on CPU under
    TRITON_INTERPRET=1) or "torch"; None: from FLYTHINKER_LINEAR_CROSS_ENTROPY_BACKEND, else "auto"
    (kernels/_backend.py; `impl` is the earlier name of this argument). The materialising oracle is
    `linear_cross_entropy_naive`. check_inputs=False skips the label range check (a host sync on CPU, an
    asynchronous device assert on CUDA). Gradients flow only to inputs that require grad (a frozen LM head gets no
    [V, H] accumulator); fp32 accumulation for fp16/bf16 inputs.
    """
    if impl is not None:
        if backend is not None and backend != impl:
            raise ValueError(f"linear_cross_entropy: impl={impl!r} and backend={backend!r} disagree (impl is the "
                             "earlier name of backend)")
        backend = impl
    _check_args(hidden, weight, labels, chunk_size, softcap)
    use_triton = choose("linear_cross_entropy", backend, hidden.device) == "triton"
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # what F.linear would do under autocast
        amp_dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(amp_dtype), weight.to(amp_dtype)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    N, H = hidden.shape
    V = weight.shape[0]
    labels = labels.long()
    if check_inputs:
        _check_label_range(labels, V, ignore_index)
    scale = loss_denominator(labels, ignore_index, num_items_in_batch).reciprocal()  # [] fp32, on device
    if use_triton:
        labels = labels.contiguous()
        scale = scale.reshape(1)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(N, V, H)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        # evaluation: ctx.needs_input_grad stays True under no_grad, so decide here and skip the gradient matmuls
        return _fused_forward(hidden, weight, labels, scale, ignore_index, chunk,
                              None if softcap is None else float(softcap), False, False, use_triton)[0]
    return LinearCrossEntropyFunction.apply(hidden, weight, labels, scale, ignore_index, chunk,
                                            None if softcap is None else float(softcap), use_triton)
