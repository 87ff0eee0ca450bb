"""Every Triton kernel of flythinker.kernels compiles for a real GPU target (CUDA sm_90: PTX, then a cubin through
the ptxas that the triton wheel ships), with no GPU present.

The interpreter (TRITON_INTERPRET=1, how every other test runs the kernels) accepts code that a GPU compile rejects,
so a kernel that only works there could land unnoticed. No hand-written signatures: the public ops (latent_fuse
forward and backward, linear_cross_entropy, sample) are driven under the interpreter in their Triton variants
while every launch is recorded (argument types, constexpr values, num_warps); each distinct specialisation is then
compiled in a fresh process with the interpreter off. Every @triton.jit function in the kernel modules must be
either launched by those drivers or called from a launched kernel, so a new kernel without a driver here fails.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flythinker.kernels import latent_fuse, linear_cross_entropy, sample

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

KERNEL_MODULES = ("flythinker.kernels.latent_fuse", "flythinker.kernels.linear_cross_entropy",
                  "flythinker.kernels.sampling")
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}


def _arg_type(v) -> str:
    """Triton signature type of one runtime (non-constexpr) argument."""
    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(v).__name__}")


def _const_value(v):
    """A constexpr value in JSON form (triton dtypes as {"tl": name})."""
    if isinstance(v, triton.language.dtype):
        return {"tl": v.name}
    return v


class _Recorder:
    """Wraps InterpretedFunction.run: records (module, name, signature, constexprs, num_warps) of each launch."""

    def __init__(self):
        self.launches: dict[str, dict] = {}

    def __call__(self, orig):
        rec = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            fn = fn_self.fn
            params = list(inspect.signature(fn).parameters.values())
            bound = dict(zip([p.name for p in params], args))
            bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
            sig, consts = {}, {}
            for p in params:
                is_const = "constexpr" in str(p.annotation)
                if is_const:
                    consts[p.name] = _const_value(bound[p.name])
                    sig[p.name] = "constexpr"
                else:
                    sig[p.name] = _arg_type(bound[p.name])
            entry = {"module": fn.__module__, "name": fn.__name__, "signature": sig, "constexprs": consts,
                     "num_warps": kwargs.get("num_warps", 4)}
            rec.launches.setdefault(json.dumps(entry, sort_keys=True), entry)
            return orig(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        return run


def _drive_latent_fuse() -> None:
    """Forward + backward of every variant the kernels specialise on (mask, prev, linear, norm modes, detach,
    dtypes). Tiny shapes: the interpreter runs one program per row."""
    g = torch.Generator().manual_seed(0)
    B, T, V, H_g, H_r = 2, 3, 11, 8, 6
    for dtype in (torch.float32, torch.bfloat16):
        for linear, norm, detach, masked in ((False, "vocab_mean", True, True), (True, "token", False, False),
                                             (False, 3.0, True, False), (False, "token", False, True)):
            w = torch.randn(V, H_g, generator=g).to(dtype).requires_grad_()
            lat = torch.randn(B, T, H_r, generator=g).to(dtype).requires_grad_()
            prev = torch.randn(B, H_r, generator=g).to(dtype).requires_grad_()
            proj = torch.randn(H_g, H_r, generator=g).to(dtype).requires_grad_() if linear else None
            ids = torch.randint(0, V, (B, T), generator=g)
            mask = torch.ones(B, T, dtype=torch.long) if masked else None
            out = latent_fuse(ids, w, lat, mask, lam=0.5, norm_target=norm, projection=proj,
                              prev_latent=prev if not masked else None, detach_norm=detach, backend="triton")
            out.float().sum().backward()


def _drive_linear_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    for dtype, softcap in ((torch.float32, None), (torch.bfloat16, 30.0)):
        h = torch.randn(5, 8, generator=g).to(dtype).requires_grad_()
        w = torch.randn(13, 8, generator=g).to(dtype).requires_grad_()
        labels = torch.tensor([1, -100, 3, 12, 0])
        linear_cross_entropy(h, w, labels, softcap=softcap, impl="triton").backward()
        with torch.no_grad():  # the forward-only specialisation (COMPUTE_GRAD=False)
            linear_cross_entropy(h, w, labels, softcap=softcap, impl="triton")


def _drive_sample() -> None:
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 40, generator=g).to(dtype)
        sample(x, temperature=0.7, top_k=5, top_p=0.9, min_p=0.01, backend="triton")
        sample(x, temperature=1.0, backend="triton")  # no filters: HAS_* all False


def record_launches() -> list[dict]:
    """Run the drivers under the interpreter; the distinct launches."""
    rec = _Recorder()
    orig = InterpretedFunction.run
    InterpretedFunction.run = rec(orig)
    try:
        _drive_latent_fuse()
        _drive_linear_cross_entropy()
        _drive_sample()
    finally:
        InterpretedFunction.run = orig
    return list(rec.launches.values())


def jit_functions() -> dict[str, str]:
    """Every @triton.jit function of the kernel modules: "module:name" -> its source."""
    import importlib

    out = {}
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in vars(mod).items():
            if isinstance(obj, InterpretedFunction) and obj.fn.__module__ == mod_name:
                out[f"{mod_name}:{name}"] = inspect.getsource(obj.fn)
    return out


_COMPILE = r"""
import importlib, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
launches = json.load(open(sys.argv[1]))
for e in launches:
    fn = getattr(importlib.import_module(e["module"]), e["name"])
    consts = {k: tl.dtype(v["tl"]) if isinstance(v, dict) else v for k, v in e["constexprs"].items()}
    k = triton.compile(ASTSource(fn, e["signature"], constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": e["num_warps"]})
    assert ".target sm_90" in k.asm["ptx"], e["name"]
    assert len(k.asm["cubin"]) > 0, e["name"]
    print("compiled", e["name"], json.dumps(e["constexprs"], sort_keys=True))
print("ok", len(launches))
"""


def test_launch_recorder_covers_every_kernel():
    """Every jit function is launched by a driver above, or called from a launched kernel (a helper)."""
    launches = record_launches()
    launched = {f"{e['module']}:{e['name']}" for e in launches}
    sources = jit_functions()
    assert launched <= set(sources)
    helper_calls = "\n".join(sources[k] for k in launched)
    missing = [k for k in sources if k not in launched and f"{k.split(':')[1]}(" not in helper_calls]
    assert not missing, f"Triton kernels not driven by tests/test_triton_compile.py: {missing}"
    names = {e["name"] for e in launches}
    assert {"_latent_fuse_fwd_kernel", "_latent_fuse_bwd_kernel", "_ce_fwd_bwd_kernel", "_sample_kernel"} <= names


def test_every_kernel_compiles_for_sm90(tmp_path: Path):
    """Compile each recorded specialisation to PTX and a cubin for sm_90 with the interpreter off. ptxas is the
    one bundled in the triton wheel (what `make install` puts there), never a system CUDA toolkit's."""
    import triton.backends.nvidia as nv

    bundled = Path(nv.__file__).parent / "bin" / "ptxas"
    assert bundled.is_file() and os.access(bundled, os.X_OK), f"the triton wheel ships no ptxas at {bundled}"
    launches = record_launches()
    spec = tmp_path / "launches.json"
    spec.write_text(json.dumps(launches))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_PTXAS")}
    env.update({"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"),
                "PATH": "/usr/bin:/bin"})  # no CUDA toolkit on PATH: the bundled ptxas must be the one used
    r = subprocess.run([sys.executable, "-c", _COMPILE, str(spec)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == f"ok {len(launches)}", r.stdout[-2000:]
