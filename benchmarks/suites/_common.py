"""What the kernel suites share: device-synchronised callables, run facts for `extra_info`, per-mode shapes."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """`fn` followed by a device synchronisation on CUDA (pytest-benchmark reads a host clock); `fn` on CPU."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def run_facts(device: torch.device, **extra: Any) -> dict[str, Any]:
    """Facts every benchmark records: device, torch threads, load average (the machine may be shared)."""
    return {"device": str(device), "torch_threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
            **extra}


def parametrize_shapes(metafunc: pytest.Metafunc, shapes: dict[str, dict], quick: tuple[str, ...]) -> None:
    """Parametrize a test's `shape` argument with `shapes` (name -> dict), or only the `quick` ones under
    `--bench-quick`; the id is the shape's name."""
    if "shape" not in metafunc.fixturenames:
        return
    names = quick if metafunc.config.getoption("--bench-quick") else tuple(shapes)
    metafunc.parametrize("shape", [dict(shapes[n], name=n) for n in names], ids=list(names), scope="module")


def rounds(quick: bool, full: int, fast: int) -> dict[str, int]:
    """`benchmark.pedantic` rounds for slow cases (seconds per call): one warm-up, then `full` or `fast` rounds."""
    return {"rounds": fast if quick else full, "warmup_rounds": 1, "iterations": 1}
