"""linear_cross_entropy microbenchmarks: the chunked fused loss vs its twin vs Hugging Face's loss on full logits.

    pytest benchmarks/suites/test_linear_cross_entropy.py --benchmark-only [--bench-quick]

One forward+backward of the LM-head loss, hidden [N, H] and the head W [V, H] both requiring grad (fp32 on CPU,
bf16 on CUDA), 1 in 7 labels ignored. Per shape, one pytest-benchmark group holds:
- `fused`: `linear_cross_entropy` (backend "auto": the chunked PyTorch path on CPU, Triton on CUDA),
- `twin`: `linear_cross_entropy_naive` (materialises the [N, V] logits, fp32 softmax; the oracle),
- `hf`: `F.linear` to full logits, upcast to fp32, then transformers' `fixed_cross_entropy` (what a causal LM's
  `loss_function` runs in HF Trainer).
Time only: peak memory needs a process per case (benchmarks/bench_loss.py measures it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flythinker.kernels import linear_cross_entropy, linear_cross_entropy_naive
from flythinker.kernels._backend import choose

from benchmarks.suites._common import parametrize_shapes, rounds, run_facts, synced

# `flythinker bench` contract: the quick mode's pytest arguments and its time on 2 idle CPU cores
QUICK = {"args": ["--bench-quick"], "seconds": 60}

SHAPES = {
    "smollm2_n4096": dict(N=4096, H=576, V=49152),
    "qwen2vocab_n4096": dict(N=4096, H=576, V=151936),
    "smollm2_n512": dict(N=512, H=576, V=49152),
}
QUICK_SHAPES = ("smollm2_n512",)
IMPLS = ("fused", "twin", "hf")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_shapes(metafunc, SHAPES, QUICK_SHAPES)


@pytest.fixture(scope="module")
def inputs(shape, bench_device):
    g = torch.Generator().manual_seed(0)
    N, H, V = shape["N"], shape["H"], shape["V"]
    dtype = torch.bfloat16 if bench_device.type == "cuda" else torch.float32
    hidden = torch.randn(N, H, generator=g).to(bench_device, dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).mul_(H**-0.5).to(bench_device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g).to(bench_device)
    labels[::7] = -100  # some prompt tokens
    return hidden, weight, labels


def hf_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a transformers causal LM computes: full logits, upcast to fp32, `fixed_cross_entropy`."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    return fixed_cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100)


LOSSES = {"fused": linear_cross_entropy, "twin": linear_cross_entropy_naive, "hf": hf_loss}


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy(benchmark, inputs, shape, impl, bench_quick, bench_device):
    hidden, weight, labels = inputs
    loss_fn = LOSSES[impl]

    def step():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, labels).backward()

    benchmark.group = f"linear_cross_entropy fwdbwd {shape['name']}"
    benchmark.extra_info.update(run_facts(bench_device, impl=impl, baseline="twin", dtype=str(hidden.dtype),
                                          fused_backend=choose("linear_cross_entropy", None, bench_device),
                                          shape={k: v for k, v in shape.items() if k != "name"}))
    benchmark.pedantic(synced(step, bench_device), **rounds(bench_quick, full=3, fast=2))
