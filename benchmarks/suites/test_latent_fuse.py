"""latent_fuse microbenchmarks: the fused op vs its plain-PyTorch twin vs what a plain model runs.

    pytest benchmarks/suites/test_latent_fuse.py --benchmark-only [--bench-quick]

Per shape and phase (forward; forward+backward with the gradient to the latent, the frozen-embedding case), one
pytest-benchmark group holds:
- `fused`: `latent_fuse(..., backend="auto")` (the compiled C++ op on CPU, Triton on CUDA),
- `twin`: `latent_fuse_naive` (plain PyTorch, the oracle), and `compiled_twin` (torch.compile'd, full mode only),
- `embedding`: `F.embedding` alone, what the generator alone runs in the same place (the floor of any fusion),
- `clone`: `torch.clone` of a tensor moving the same bytes (reads + writes) as the op: the memory roofline.
`extra_info["bytes"]` is what the op must move, so GB/s = bytes / time (the report computes it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flythinker.kernels import latent_fuse, latent_fuse_naive, vocab_mean_norm
from flythinker.kernels._backend import choose

from benchmarks.suites._common import parametrize_shapes, rounds, run_facts, synced

# `flythinker bench` contract: the quick mode's pytest arguments and its time on 2 idle CPU cores
QUICK = {"args": ["--bench-quick"], "seconds": 45}

SHAPES = {  # rows = B*T tokens; H_g / H_r generator / reasoner widths; V the generator's vocabulary
    "smollm2_4k": dict(B=8, T=512, H_g=576, H_r=576, V=49152),
    "llama1b_8k": dict(B=8, T=1024, H_g=2048, H_r=1536, V=16384),
}
QUICK_SHAPES = ("smollm2_4k",)
IMPLS = ("fused", "twin", "compiled_twin", "embedding", "clone")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_shapes(metafunc, SHAPES, QUICK_SHAPES)


@pytest.fixture(scope="module")
def inputs(shape, bench_device):
    g = torch.Generator().manual_seed(0)
    B, T, H_g, H_r, V = (shape[k] for k in ("B", "T", "H_g", "H_r", "V"))
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    W = torch.randn(V, H_g, generator=g).to(bench_device, dtype)
    x = dict(ids=torch.randint(0, V, (B, T), generator=g).to(bench_device), W=W,
             L=torch.randn(B, T, H_r, generator=g).to(bench_device, dtype),
             mask=torch.ones(B, T, device=bench_device), c=float(vocab_mean_norm(W)),
             grad=torch.randn(B, T, H_g, generator=g).to(bench_device, dtype))
    x["mask"][: B // 2, :16] = 0  # some left padding
    return x


def moved_bytes(x: dict, phase: str) -> int:
    """Bytes the op must move: forward reads the gathered rows and latents, writes the output (+ ids, mask);
    backward ("pad" projection, detached norm) reads the gradient's first H_r columns, writes the latent's grad."""
    n, es = x["ids"].numel(), x["W"].element_size()
    H_g, H_r = x["W"].shape[1], x["L"].shape[-1]
    fwd = n * (2 * H_g + H_r) * es + n * (x["ids"].element_size() + 4)
    return fwd + (n * 2 * H_r * es if phase == "fwdbwd" else 0)


def _forward(impl: str, x: dict):
    if impl == "fused":
        return lambda lat: latent_fuse(x["ids"], x["W"], lat, x["mask"], lam=0.5, norm_target=x["c"])
    if impl == "twin":
        return lambda lat: latent_fuse_naive(x["ids"], x["W"], lat, x["mask"], lam=0.5, norm_target=x["c"])
    if impl == "compiled_twin":
        fn = torch.compile(latent_fuse_naive, dynamic=False)
        return lambda lat: fn(x["ids"], x["W"], lat, x["mask"], lam=0.5, norm_target=x["c"])
    if impl == "embedding":
        return lambda lat: F.embedding(x["ids"], x["W"])
    raise ValueError(impl)


def workload(impl: str, phase: str, x: dict):
    """The callable one benchmark round runs."""
    if impl == "clone":
        src = torch.empty(moved_bytes(x, phase) // 8, device=x["W"].device)  # clone reads + writes these bytes
        return src.clone
    fwd = _forward(impl, x)
    if phase == "fwd":
        return lambda: fwd(x["L"])
    if impl == "embedding":  # the generator alone has no latent to differentiate: the forward is its whole cost
        pytest.skip("the plain embedding has no latent gradient")

    def fwdbwd():
        lat = x["L"].detach().requires_grad_()
        fwd(lat).backward(x["grad"])

    return fwdbwd


@pytest.mark.parametrize("phase", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_latent_fuse(benchmark, inputs, shape, phase, impl, bench_quick, bench_device):
    if impl == "compiled_twin" and bench_quick:
        pytest.skip("quick mode: no torch.compile (its compile time dominates)")
    benchmark.group = f"latent_fuse {phase} {shape['name']}"
    benchmark.extra_info.update(run_facts(bench_device, impl=impl, bytes=moved_bytes(inputs, phase), baseline="twin",
                                          roofline="clone", dtype=str(inputs["W"].dtype),
                                          fused_backend=choose("latent_fuse", None, bench_device),
                                          shape={k: v for k, v in shape.items() if k != "name"}))
    fn = synced(workload(impl, phase, inputs), bench_device)
    benchmark.pedantic(fn, **rounds(bench_quick, full=7, fast=3))
