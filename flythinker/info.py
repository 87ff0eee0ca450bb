"""What `flythinker info` and the benchmark report print: versions, the backend each fused op uses per device,
devices, cache folder (`collect()`, a dict; printing lives in `flythinker.cli.info`).

Backend resolution per op (`latent_fuse`, `linear_cross_entropy`, `sample`): if the op's module in
`flythinker.kernels` exposes `backend(device) -> str`, that is the answer (the dispatcher's own word).
Otherwise it is inferred the way the dispatchers choose (DESIGN.md 3): CUDA tensors -> Triton when triton
imports and the module has a Triton kernel; CPU tensors -> C++ when the op's compiled extension loads
(`<op>_cpp.load()`), else the plain-PyTorch twin.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
from typing import Any

OPS = {  # op name -> candidate modules in flythinker.kernels (first that imports wins)
    "latent_fuse": ("latent_fuse",),
    "linear_cross_entropy": ("linear_cross_entropy",),
    "sample": ("sampling", "sample"),
}


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _op_module(op: str):
    for name in OPS[op]:
        try:
            return importlib.import_module(f"flythinker.kernels.{name}"), name
        except ImportError:
            continue
    return None, None


def _has_triton_kernel(module) -> bool:
    src = getattr(module, "__file__", None)
    if not src:
        return False
    try:
        with open(src) as fh:
            text = fh.read()
    except OSError:
        return False
    return "@triton.jit" in text


def _cpp_loads(name: str) -> bool:
    try:
        cpp = importlib.import_module(f"flythinker.kernels.{name}_cpp")
    except ImportError:
        return False
    load = getattr(cpp, "load", None)
    registered = getattr(cpp, "_registered", None)
    if callable(load) and callable(registered) and not registered() and os.environ.get("FLYTHINKER_NO_CPP") != "1":
        print(f"flythinker: loading the C++ CPU op of {name} (compiled on first use: up to a minute)...",
              file=sys.stderr, flush=True)
    try:
        return bool(load()) if callable(load) else False
    except Exception:  # a failed build means the fallback is used; `info` reports, it does not fail
        return False


def op_backend(op: str, device: str) -> str:
    """`Triton`, `C++`, `PyTorch` or `missing` for `op` on tensors of `device` ("cpu" or "cuda")."""
    module, name = _op_module(op)
    if module is None:
        return "missing"
    probe = getattr(module, "backend", None)
    if callable(probe):
        try:
            return str(probe(device))
        except Exception as exc:  # report what the probe said rather than guessing
            return f"unknown ({type(exc).__name__})"
    if device.startswith("cuda"):
        return "Triton" if _triton_available() and _has_triton_kernel(module) else "PyTorch"
    return "C++" if _cpp_loads(name) else "PyTorch"


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
    backends = {op: {dev: op_backend(op, dev) for dev in ("cpu", "cuda")} for op in OPS}
    return {
        "versions": {
            "flythinker": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "triton": _version("triton"), "transformers": _version("transformers"), "peft": _version("peft"),
        },
        "backends": backends,
        "cuda_available": torch.cuda.is_available(),
        "devices": devices,
        "gpus": gpus,
        "cpu": {"machine": platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "cache_dir": str(cache),
        "cached_models": cached,
        "known_models": list(KNOWN_MODELS),
    }
