"""Loader of the C++ CPU op (csrc/latent_fuse.cpp) behind `flythinker.kernels.latent_fuse`.

The op is registered as `torch.ops.flythinker.latent_fuse_fwd` / `latent_fuse_bwd`. It comes from
`flythinker._C` when setup.py built it ahead of time (FLYTHINKER_BUILD_EXT=1), else it is compiled on first
use with torch.utils.cpp_extension.load (cached in torch's extension dir, ~/.cache/torch_extensions; about a
minute on two busy cores, then a few hundred ms to load). Without a working compiler `load()` returns False
and warns once; the dispatcher then uses the PyTorch twin.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

_NAME = "flythinker_latent_fuse_cpu"
_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None}


def _source() -> Path | None:
    here = Path(__file__).resolve().parent
    # repo checkout / editable install: <repo>/kernels/../csrc; installed wheel: flythinker/csrc (setup.py copies it)
    for cand in (here.parent / "csrc" / "latent_fuse.cpp", here.parent / "flythinker" / "csrc" / "latent_fuse.cpp"):
        if cand.is_file():
            return cand
    import flythinker  # this module is flythinker.kernels.latent_fuse_cpp: the package is always there

    cand = Path(flythinker.__file__).resolve().parent / "csrc" / "latent_fuse.cpp"
    return cand if cand.is_file() else None


def _registered() -> bool:
    try:
        torch.ops.flythinker.latent_fuse_fwd  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _build() -> None:
    try:  # ahead-of-time build (setup.py, FLYTHINKER_BUILD_EXT=1)
        import flythinker._C  # noqa: F401

        if _registered():
            return
    except ImportError:
        pass
    src = _source()
    if src is None:
        raise FileNotFoundError("csrc/latent_fuse.cpp not found next to the package")
    from torch.utils.cpp_extension import load

    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in ATen's headers; without it the op is serial.
    flags = ["-O3", "-march=native", "-fopenmp"]
    load(name=_NAME, sources=[str(src)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    if not _registered():  # pragma: no cover
        raise RuntimeError("the extension loaded but registered no torch.ops.flythinker.latent_fuse_fwd")


def load() -> bool:
    """Build/load the C++ op once per process; True when `torch.ops.flythinker.latent_fuse_*` is usable.

    FLYTHINKER_NO_CPP=1 disables it (tests of the fallback). A failure warns once and returns False.
    """
    if _state["tried"]:
        return bool(_state["ok"])
    with _lock:
        if _state["tried"]:
            return bool(_state["ok"])
        if os.environ.get("FLYTHINKER_NO_CPP") == "1":
            _state.update(tried=True, ok=False, error="disabled by FLYTHINKER_NO_CPP=1")
            return False
        try:
            if not _registered():
                _build()
            _register_fakes()
            _state.update(ok=True)
        except Exception as exc:  # no compiler, no headers, link error...
            _state.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            lines = str(exc).splitlines() or [""]
            why = next((ln for ln in lines if "error" in ln.lower() and "building extension" not in ln), lines[0])
            warnings.warn(
                "flythinker: could not build the C++ CPU op for latent_fuse "
                f"({type(exc).__name__}: {why.strip()[:300]}); using the slower PyTorch twin on CPU. "
                "Install a C++ compiler (g++) and ninja, or build ahead of time with "
                "FLYTHINKER_BUILD_EXT=1 pip install --no-build-isolation .",
                RuntimeWarning,
                stacklevel=3,
            )
        _state["tried"] = True
        return bool(_state["ok"])


def _register_fakes() -> None:
    """Shape-only (fake) kernels so torch.compile can trace through the custom ops."""
    if _state.get("fakes"):
        return

    def fwd_fake(ids, weight, latent, mask, prev, plat, pprev, lam, norm_mode, norm_const, eps):
        B, T = ids.shape
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        return weight.new_empty(B, T, weight.shape[1]), weight.new_empty(B, T, dtype=acc)

    def bwd_fake(g, ids, weight, latent, prev, gproj, rs, norm_mode, eps, detach, need_lat, need_prev, need_w):
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        B, T, H_r = latent.shape
        glat = latent.new_empty(B if need_lat else 0, T, H_r)
        gprev = latent.new_empty(B if (need_prev and prev is not None) else 0, H_r)
        gw = weight.new_empty(weight.shape[0] if need_w else 0, weight.shape[1], dtype=acc)
        return glat, gprev, gw

    try:
        torch.library.register_fake("flythinker::latent_fuse_fwd")(fwd_fake)
        torch.library.register_fake("flythinker::latent_fuse_bwd")(bwd_fake)
    except RuntimeError:  # already registered (e.g. by a second loader in this process)
        pass
    _state["fakes"] = True


def fwd(ids, weight, latent, mask, prev, plat, pprev, lam, norm_mode, norm_const, eps):
    """Thin wrapper over torch.ops.flythinker.latent_fuse_fwd -> (out [B, T, H_g], row_scale [B, T])."""
    return torch.ops.flythinker.latent_fuse_fwd(ids, weight, latent, mask, prev, plat, pprev, float(lam),
                                                int(norm_mode), float(norm_const), float(eps))


def bwd(g, ids, weight, latent, prev, gproj, rs, norm_mode, eps, detach_norm, need_latent, need_prev, need_weight):
    """-> (grad_latent, grad_prev, grad_weight in the acc dtype); the ones not asked for have 0 rows."""
    return torch.ops.flythinker.latent_fuse_bwd(g, ids, weight, latent, prev, gproj, rs, int(norm_mode),
                                                float(eps), bool(detach_norm), bool(need_latent),
                                                bool(need_prev), bool(need_weight))
