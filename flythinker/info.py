"""What `flythinker info` and the benchmark report print: versions, the backend each fused op uses per device,
devices, cache folder (`collect()`, a dict; printing lives in `flythinker.cli.info`).

Backends per op (`latent_fuse`, `linear_cross_entropy`, `sample`): the kernels' own registry answers
(`flythinker.kernels._backend.backend_report`, the choice each dispatcher makes with `backend=None`).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

_LABELS = {"triton": "Triton", "cpp": "C++", "torch": "PyTorch"}


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def backends() -> dict[str, dict[str, str]]:
    """op -> {"cpu": ..., "cuda": ...}: `Triton`, `C++` or `PyTorch`, what the op runs on tensors of that device."""
    from flythinker.kernels import latent_fuse_cpp
    from flythinker.kernels._backend import backend_report

    if not latent_fuse_cpp._registered() and os.environ.get("FLYTHINKER_NO_CPP") != "1":
        print("flythinker: loading the C++ CPU op of latent_fuse (compiled on first use: up to a minute)...",
              file=sys.stderr, flush=True)
    per_device = {dev: backend_report(dev) for dev in ("cpu", "cuda")}
    return {op: {dev: _LABELS.get(rep[op], rep[op]) for dev, rep in per_device.items()} for op in per_device["cpu"]}


def collect() -> dict[str, Any]:
    """Everything `flythinker info` prints, as a dict."""
    import torch

    from flythinker import __version__
    from flythinker.hub import KNOWN_MODELS, cache_dir

    devices = ["cpu"]
    gpus = []
    if torch.cuda.is_available():
        devices.append("cuda")
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cache = cache_dir()
    cached = sorted(p.name for p in (cache / "models").iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if (cache / "models").is_dir() else []
    return {
        "versions": {
            "flythinker": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "triton": _version("triton"), "transformers": _version("transformers"), "peft": _version("peft"),
        },
        "backends": backends(),
        "cuda_available": torch.cuda.is_available(),
        "devices": devices,
        "gpus": gpus,
        "cpu": {"machine": platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "cache_dir": str(cache),
        "cached_models": cached,
        "known_models": list(KNOWN_MODELS),
        "parallel_auto": parallel_auto(),
    }


def parallel_auto() -> dict[str, Any]:
    """What `parallel="auto"` picks on this machine and why (flythinker.parallel_auto): the rule, and per pair shape
    measured here so far what a new process would do (`entry_status`: reuse the saved decision, with the age and
    load average of its measurement, or measure again, and why)."""
    from flythinker.parallel_auto import LOAD_FRACTION, MARGIN, OWN_LOAD, cached_decisions, entry_status, max_age_days
    from flythinker.workers import available_cores

    cores = available_cores()
    if cores < 2:
        rule = f"{cores} core: always sequential (off)"
    else:
        rule = (f"CUDA: streams. CPU ({cores} cores): measured per pair shape on first use (one-token step, threads "
                f"vs sequential); threads only if below {MARGIN:g}x sequential, else off. A saved measurement is "
                f"reused while it is under {max_age_days():g} days old, was taken at a 1-min load of at most "
                f"{OWN_LOAD:g} + {LOAD_FRACTION:g} x cores, and under this torch/transformers/flythinker/Python "
                f"and CPU; otherwise it is measured again")
    measured = {k: entry_status(d) for k, d in cached_decisions().items() if isinstance(d, dict)}
    return {"rule": rule, "measured": measured}
