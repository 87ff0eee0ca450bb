"""Which implementation a fused op runs: one vocabulary, one registry, one override convention for every op.

Backends: "triton" (the Triton kernel: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cpp" (a compiled
C++ CPU op), "torch" (plain PyTorch ops), and "auto" (the first one of the op's preference order that can run on
the tensors' device; the interpreter is never picked by "auto", it is a debugging mode). The plain-PyTorch twins
used as test oracles are separate functions (`*_naive`), not backends.

Each op module registers its backends here (`register`) and resolves a request with `choose(op, backend, device)`:
`backend=None` reads `FLYTHINKER_<OP>_BACKEND` (e.g. FLYTHINKER_LATENT_FUSE_BACKEND=torch) and else means "auto".
A backend that cannot run on the device is refused with the reason, never silently replaced.
`backend_report(device)` says what each op would use (printed by `flythinker info`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

try:  # triton is a Linux-only dependency; every op has a path without it
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - non-Linux installs
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "cpp", "torch")
_RENAMED = {"cpu": "torch", "naive": None}  # earlier spellings -> the name now (None: the twin function)

# (op, backend) -> why_not(device): None when the backend can run on tensors of `device`, else the error to raise
# (ValueError: wrong device for it; RuntimeError: not available in this install)
WhyNot = Callable[[torch.device], Exception | None]
_REGISTRY: dict[tuple[str, str], WhyNot] = {}
_AUTO: dict[str, tuple[str, ...]] = {}  # op -> backends in the order "auto" tries them


def triton_usable(device: torch.device | str) -> bool:
    """Whether a Triton kernel can launch on tensors of `device`: CUDA, or CPU under TRITON_INTERPRET=1."""
    device = torch.device(device)
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _triton_why_not(device: torch.device) -> Exception | None:
    if not HAS_TRITON:
        return RuntimeError("needs the triton package (Linux)")
    if not triton_usable(device):
        return ValueError(f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before triton is "
                          f"imported), got {device} tensors")
    return None


def _torch_why_not(device: torch.device) -> Exception | None:
    return None


def register(op: str, auto_order: tuple[str, ...], checks: dict[str, WhyNot] | None = None) -> None:
    """Declare `op`'s backends: `auto_order` (subset of BACKENDS, preference order) and, for backends other than
    "triton" and "torch" (whose checks are shared), `checks[backend](device) -> the error to raise, or None`."""
    shared = {"triton": _triton_why_not, "torch": _torch_why_not}
    for name in auto_order:
        if name not in BACKENDS[1:]:
            raise ValueError(f"{op}: unknown backend {name!r} in the registry")
        _REGISTRY[(op, name)] = (checks or {}).get(name) or shared[name]
    _AUTO[op] = tuple(auto_order)


def env_var(op: str) -> str:
    """The environment variable that overrides `op`'s default backend."""
    return f"FLYTHINKER_{op.upper()}_BACKEND"


def _normalise(op: str, backend: str | None) -> str:
    requested = backend if backend is not None else (os.environ.get(env_var(op)) or "auto")
    if requested in _RENAMED:
        now = _RENAMED[requested]
        hint = f"use backend={now!r}" if now else f"call {op}_naive (the twin is a function, not a backend)"
        raise ValueError(f"{op}: backend {requested!r} is no longer a backend name: {hint}")
    if requested not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {requested!r}; expected one of {BACKENDS}")
    return requested


def choose(op: str, backend: str | None, device: torch.device | str) -> str:
    """The backend `op` runs for tensors on `device`: "triton", "cpp" or "torch" (see the module docstring)."""
    device = torch.device(device)
    requested = _normalise(op, backend)
    if requested == "auto":
        for name in _AUTO[op]:
            # "auto" never picks the interpreter: Triton only for CUDA tensors
            if _REGISTRY[(op, name)](device) is None and (name != "triton" or device.type == "cuda"):
                return name
        raise RuntimeError(f"{op}: no backend can run on {device}")  # unreachable while "torch" is registered
    check = _REGISTRY.get((op, requested))
    if check is None:
        raise ValueError(f"{op}: backend {requested!r} is not implemented; available: {_AUTO[op]}")
    error = check(device)
    if error is not None:
        raise type(error)(f"{op}: backend={requested!r} {error}")
    return requested


def backend_report(device: torch.device | str) -> dict[str, str]:
    """What each registered op would run on tensors of `device` with the default `backend=None` (honouring the
    FLYTHINKER_<OP>_BACKEND overrides): op -> backend, or "error: ..." for an unusable override."""
    # Every op has registered itself: importing this module ran flythinker/kernels/__init__.py first, which
    # imports all of them (an import of the ops from here would make a circle: they import this module).
    out = {}
    for op in _AUTO:
        try:
            out[op] = choose(op, None, device)
        except (ValueError, RuntimeError) as exc:
            out[op] = f"error: {exc}"
    return out


__all__ = ["BACKENDS", "HAS_TRITON", "backend_report", "choose", "env_var", "register", "triton_usable"]
