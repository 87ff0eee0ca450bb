"""Sampling microbenchmarks: the fused sampler vs its sort-based twin vs Hugging Face's logits-warper chain.

    pytest benchmarks/suites/test_sampling.py --benchmark-only [--bench-quick]

One decode step's sampling from logits [B, V] (fp32, 3 * N(0, 1): peaked like LM logits). Per (V, B, setting), one
pytest-benchmark group holds:
- `fused`: `flythinker.kernels.sample` (backend "auto": top-k + radix select on CPU, the Triton kernel on CUDA),
- `twin`: `sample_naive` (softmax + two sorts; the oracle),
- `hf`: Temperature -> TopK -> TopP -> MinP logits warpers -> softmax -> torch.multinomial, what
  `generate(do_sample=True, ...)` runs per step (benchmarks/bench_sampling.py `hf_chain`).
Settings: "all" (T=0.7, top_k=50, top_p=0.9, min_p=0.05: the usual chat setting) and "top_p" (T=1, top_p=0.9
alone: no top-k to shrink the candidate set, the hard case for a sorting-free method).
"""

from __future__ import annotations

import pytest
import torch
from flythinker.kernels import sample, sample_naive
from flythinker.kernels._backend import choose

from benchmarks.bench_sampling import SETTINGS, hf_chain
from benchmarks.suites._common import parametrize_shapes, run_facts, synced

# `flythinker bench` contract: the quick mode's pytest arguments and its time on 2 idle CPU cores
QUICK = {"args": ["--bench-quick"], "seconds": 45}

SHAPES = {f"V{V}_B{B}": dict(V=V, B=B) for V in (49152, 151936) for B in (1, 8)}
QUICK_SHAPES = ("V151936_B1",)
IMPLS = ("fused", "twin", "hf")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_shapes(metafunc, SHAPES, QUICK_SHAPES)


@pytest.fixture(scope="module")
def logits(shape, bench_device):
    g = torch.Generator().manual_seed(shape["V"] + shape["B"])
    return (3.0 * torch.randn(shape["B"], shape["V"], generator=g)).to(bench_device)


def sampler(impl: str, setting: dict, x: torch.Tensor):
    g = torch.Generator(device=x.device).manual_seed(0)
    if impl == "fused":
        return lambda: sample(x, generator=g, **setting)
    if impl == "twin":
        return lambda: sample_naive(x, generator=g, **setting)
    chain = hf_chain(setting)
    return lambda: chain(x, g)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("impl", IMPLS)
def test_sampling(benchmark, logits, shape, setting, impl, bench_quick, bench_device):
    benchmark.group = f"sampling {setting} {shape['name']}"
    benchmark.extra_info.update(run_facts(bench_device, impl=impl, baseline="twin", setting=SETTINGS[setting],
                                          fused_backend=choose("sample", None, bench_device),
                                          shape={k: v for k, v in shape.items() if k != "name"}))
    fn = synced(sampler(impl, SETTINGS[setting], logits), bench_device)
    if bench_quick:
        benchmark.pedantic(fn, rounds=7, warmup_rounds=1, iterations=1)
    else:
        benchmark(fn)
