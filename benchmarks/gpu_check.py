"""GPU check in one script: every Triton kernel against its twin, bandwidth, sampling and the pair's decode.

    python3 benchmarks/gpu_check.py --out gpu_check.json      # on a CUDA machine: < 8 min on one H100
    python  benchmarks/gpu_check.py --dry-run --out dry.json   # on CPU: tiny shapes, Triton interpreter, no timings

Sections (each one's failure is recorded in the JSON and the next one runs; the JSON is rewritten after each):

- `env`: device, versions, the device's nominal peak memory bandwidth (a table of known cards) and the bandwidth a
  device-to-device copy reaches (`copy_gbps`, bytes read + written / time).
- `kernels`: every Triton kernel against its plain-PyTorch twin at several shapes and dtypes (fp32, bf16, fp16):
  latent_fuse forward and gradients (pad / linear projection, vocab-mean / per-token norm, padding mask, previous
  latent), linear_cross_entropy loss and gradients (one to three V tiles, softcap), sample with shared uniforms
  (the fraction of identical tokens; greedy must match exactly). Errors are max |a - b| / max |b|.
- `bandwidth`: latent_fuse (forward; forward + latent gradient) and the cross-entropy kernel of linear_cross_entropy
  (two passes over a [C, V] logits slab, dlogits written in place) in GB/s and as fractions of the nominal peak and
  of the measured copy; the whole fused loss against its twin and Hugging Face's loss on full logits, with its
  TFLOP/s against a plain matmul of the same shapes.
- `sampling`: the Triton sampler against Hugging Face's logits-warper chain (what `generate(do_sample=True)` runs),
  the sort-based sampler and the twin: ms per call and rows/s, B in {1, 8, 64, 256}, V in {49152, 151936}.
- `decode`: the shipped pair (`smollm2-135m-persona-empathy`: SmolLM2-135M-Instruct's architecture with the
  shipped deltas; random base weights when the offline base model is not on the machine: per-token time does not
  depend on the weights' values), batch 1, bf16, greedy with eos off: per-token decode time of the generator alone,
  the pair as two copies run sequentially (`parallel="off"`) and on CUDA streams (`parallel="streams"`), and the
  shared-base pair (one batched step), with sdpa and, when flash-attn is installed, `flash_attention_2`. Per-token
  time = (time of 8 + n tokens - time of 8 tokens) / n, median of rounds: the prefill cancels out.

`--dry-run` runs every section on CPU at tiny shapes (Triton under TRITON_INTERPRET=1, the decode on a tiny random
pair with threads for streams) so the script cannot rot; its timings mean nothing and it says so.
Every timing is a ratio to a baseline measured in the same run (`*_over_*`); a time budget (`--budget-s`) skips
what would not fit and records that it did.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

# `flythinker bench` contract (flythinker/cli/bench.py): the quick mode's arguments and its time on 2 idle CPU cores
QUICK = {"args": ["--dry-run", "--out", "{results}/gpu_check_dry_run.json"], "seconds": 45}
FULL_REQUIRES = "cuda"

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "smollm2-135m-persona-empathy"
SECTIONS = ("env", "kernels", "bandwidth", "sampling", "decode")
# nominal peak memory bandwidth (GB/s) by a substring of torch.cuda.get_device_name(), most specific first
NOMINAL_PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
                     ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0), ("A10G", 600.0))
SMOLLM2_CONFIG = dict(hidden_size=576, num_hidden_layers=30, vocab_size=49152, num_attention_heads=9,
                      num_key_value_heads=3, intermediate_size=1536, head_dim=64, tie_word_embeddings=True,
                      max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}  # max |a - b| / max |b| of kernel vs twin


# ---- the run: sections, budget, JSON ---------------------------------------------------------------------------------
class Check:
    """Results of one run, written after each section; `budget_left()` says whether more cases fit."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.out = Path(args.out)
        self.deadline = time.perf_counter() + args.budget_s
        self.start = time.perf_counter()
        self.report: dict[str, Any] = {"dry_run": self.dry, "budget_s": args.budget_s, "sections": {},
                                       "timings": "no meaning (dry run: tiny shapes, CPU, Triton interpreter)"
                                       if self.dry else "medians of timed calls, same run",
                                       "loadavg_start": list(os.getloadavg())}

    def budget_left(self) -> bool:
        return time.perf_counter() < self.deadline

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        """Run a section: its dict is stored even when it raises (the error is recorded, the run goes on)."""
        res: dict[str, Any] = {}
        self.report["sections"][name] = res
        t0 = time.perf_counter()
        try:
            yield res
            res["status"] = "ok"
        except Exception as exc:  # one section's failure must not lose the others on a short GPU lease
            res["status"] = f"error: {type(exc).__name__}: {exc}"[:500]
            res["traceback"] = traceback.format_exc()[-3000:]
            print(f"[{name}] FAILED: {res['status']}", flush=True)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] {res['status']} in {res['seconds']} s", flush=True)
        self.write()

    def write(self) -> None:
        from flythinker.hub import atomic_write_json

        self.report["wall_s"] = round(time.perf_counter() - self.start, 2)
        self.report["loadavg_end"] = list(os.getloadavg())
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out, self.report, indent=1)


def timer(device) -> Callable[[Callable[[], Any]], float]:
    """ms per call: triton.testing.do_bench on CUDA; on CPU (dry run) one timed call after one warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=10, rep=40))

    def once(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return once


def rel_err(a, b) -> float:
    """max |a - b| / max |b| in fp32 (0 when both are zero)."""
    a, b = a.detach().float(), b.detach().float()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def dtypes(check: Check) -> list:
    import torch

    return [torch.float32, torch.bfloat16] if check.dry else [torch.float32, torch.bfloat16, torch.float16]


# ---- env -------------------------------------------------------------------------------------------------------------
def nominal_peak_gbps(name: str) -> float | None:
    return next((v for k, v in NOMINAL_PEAK_GBPS if k in name), None)


def section_env(check: Check, res: dict) -> None:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    res.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               flash_attn=importlib.util.find_spec("flash_attn") is not None, cpu_count=os.cpu_count())
    for dist in ("triton", "transformers", "peft", "flash-attn"):
        with contextlib.suppress(PackageNotFoundError):
            res[dist] = version(dist)
    if check.device.type != "cuda":
        res["device"] = "cpu (dry run)"
        return
    props = torch.cuda.get_device_properties(check.device)
    res.update(device=torch.cuda.get_device_name(check.device), capability=list(torch.cuda.get_device_capability()),
               sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
               nominal_peak_gbps=nominal_peak_gbps(torch.cuda.get_device_name(check.device)))
    x = torch.empty(2**29, dtype=torch.uint8, device=check.device)  # 512 MiB: far beyond L2
    ms = timer(check.device)(x.clone)
    res["copy_gbps"] = 2 * x.numel() / ms / 1e6
    check.report["peak"] = {"nominal_gbps": res["nominal_peak_gbps"], "copy_gbps": res["copy_gbps"]}


# ---- kernels vs twins ------------------------------------------------------------------------------------------------
def _fuse_inputs(shape: tuple, dtype, device, projection: bool, grad_w: bool) -> dict:
    import torch

    B, T, H_g, H_r, V = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = {"ids": torch.randint(0, V, (B, T), generator=g), "W": torch.randn(V, H_g, generator=g),
         "L": torch.randn(B, T, H_r, generator=g), "mask": (torch.rand(B, T, generator=g) > 0.2).float(),
         "prev": torch.randn(B, H_r, generator=g), "grad": torch.randn(B, T, H_g, generator=g),
         "P": torch.randn(H_g, H_r, generator=g) * H_r**-0.5 if projection else None}
    x = {k: None if v is None else v.to(device, dtype if v.is_floating_point() and k != "mask" else v.dtype)
         for k, v in x.items()}
    x["W"].requires_grad_(grad_w)
    return x


def _fuse_once(fn, x: dict, norm: str) -> tuple:
    lat = x["L"].detach().requires_grad_()
    w = x["W"].detach().requires_grad_(x["W"].requires_grad)
    proj = None if x["P"] is None else x["P"].detach().requires_grad_()
    out = fn(x["ids"], w, lat, x["mask"], lam=0.7, norm_target=norm, projection=proj, prev_latent=x["prev"])
    out.backward(x["grad"])
    return out, lat.grad, w.grad, None if proj is None else proj.grad


def check_latent_fuse(check: Check) -> list[dict]:
    from flythinker.kernels import latent_fuse, latent_fuse_naive

    shapes = [(2, 5, 16, 12, 50)] if check.dry else [(2, 7, 64, 48, 1000), (4, 256, 576, 576, 49152),
                                                     (2, 512, 2048, 1536, 32000)]
    rows = []
    for shape in shapes:
        for dtype in dtypes(check):
            for projection, norm in ((False, "vocab_mean"), (True, "token")):
                if not check.budget_left():
                    rows.append({"shape": shape, "skipped": "time budget"})
                    return rows
                x = _fuse_inputs(shape, dtype, check.device, projection, grad_w=True)
                tri = _fuse_once(lambda *a, **k: latent_fuse(*a, backend="triton", **k), x, norm)
                ref = _fuse_once(latent_fuse_naive, x, norm)
                errs = {n: rel_err(a, b) for n, a, b in zip(("out", "d_latent", "d_weight", "d_proj"), tri, ref)
                        if a is not None and b is not None}
                rows.append({"shape_BTHgHrV": list(shape), "dtype": str(dtype).removeprefix("torch."),
                             "projection": "linear" if projection else "pad", "norm_target": norm, **errs,
                             "ok": max(errs.values()) <= TOL[str(dtype).removeprefix("torch.")]})
    return rows


def check_linear_cross_entropy(check: Check) -> list[dict]:
    import torch
    from flythinker.kernels import linear_cross_entropy, linear_cross_entropy_naive

    shapes = [(9, 16, 100, None), (8, 16, 300, 30.0)] if check.dry else [
        (37, 64, 1000, None), (512, 576, 49152, None), (256, 896, 151936, None), (128, 256, 32001, 30.0)]
    rows = []
    for N, H, V, softcap in shapes:
        for dtype in dtypes(check)[:2]:  # fp32 and bf16: the training dtypes
            if not check.budget_left():
                rows.append({"shape": [N, H, V], "skipped": "time budget"})
                return rows
            g = torch.Generator().manual_seed(N + V)
            h0 = torch.randn(N, H, generator=g).to(check.device, dtype)
            w0 = (torch.randn(V, H, generator=g) * H**-0.5).to(check.device, dtype)
            labels = torch.randint(0, V, (N,), generator=g).to(check.device)
            labels[::5] = -100
            outs = []
            for fn in (partial(linear_cross_entropy, backend="triton"), linear_cross_entropy_naive):
                h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
                loss = fn(h, w, labels, softcap=softcap)
                loss.backward()
                outs.append((loss, h.grad, w.grad))
            errs = {n: rel_err(a, b) for n, a, b in zip(("loss", "d_hidden", "d_weight"), *outs)}
            name = str(dtype).removeprefix("torch.")
            rows.append({"N_H_V": [N, H, V], "softcap": softcap, "dtype": name, **errs,
                         "ok": max(errs.values()) <= max(TOL[name], 1e-3 if V > 100000 else 0)})
    return rows


def check_sample(check: Check) -> list[dict]:
    import torch
    from flythinker.kernels import sample, sample_naive

    shapes = [(3, 300)] if check.dry else [(3, 1000), (8, 49152), (64, 151936)]
    settings = {"all": dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05), "top_p": dict(top_p=0.9),
                "top_k": dict(top_k=20), "greedy": dict(temperature=0.0)}
    rows = []
    for B, V in shapes:
        for dtype in dtypes(check)[:2]:
            g = torch.Generator().manual_seed(B * V)
            logits = (3 * torch.randn(B, V, generator=g)).to(check.device, dtype)
            uniforms = torch.rand(B, 16 if check.dry else 64, generator=g).to(check.device)
            for name, s in settings.items():
                tri = sample(logits, uniforms=uniforms, backend="triton", **s)
                ref = sample_naive(logits, uniforms=uniforms, **s)
                match = (tri == ref).float().mean().item()
                rows.append({"B": B, "V": V, "dtype": str(dtype).removeprefix("torch."), "setting": name,
                             "draws": tri.numel(), "same_token_fraction": match,
                             "ok": match == 1.0 if name == "greedy" else match >= 0.99})
    return rows


def section_kernels(check: Check, res: dict) -> None:
    for name, fn in (("latent_fuse", check_latent_fuse), ("linear_cross_entropy", check_linear_cross_entropy),
                     ("sample", check_sample)):
        try:
            res[name] = fn(check)
        except Exception as exc:  # one kernel's failure must not hide the others
            res[name] = [{"error": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()[-2000:]}]
        bad = [r for r in res[name] if not r.get("ok", "skipped" in r)]
        print(f"  {name}: {len(res[name]) - len(bad)}/{len(res[name])} cases ok", flush=True)
    res["all_ok"] = all(r.get("ok", "skipped" in r) for k in ("latent_fuse", "linear_cross_entropy", "sample")
                        for r in res[k])


# ---- bandwidth -------------------------------------------------------------------------------------------------------
def _fractions(gbps: float, check: Check) -> dict:
    peak = check.report.get("peak") or {}
    out = {"gbps": gbps}
    if peak.get("nominal_gbps"):
        out["fraction_of_nominal_peak"] = gbps / peak["nominal_gbps"]
    if peak.get("copy_gbps"):
        out["fraction_of_copy"] = gbps / peak["copy_gbps"]
    return out


def bandwidth_latent_fuse(check: Check) -> dict:
    import torch
    import torch.nn.functional as F
    from flythinker.kernels import latent_fuse, latent_fuse_naive

    B, T, H_g, H_r, V = (2, 8, 16, 12, 50) if check.dry else (8, 2048, 2048, 1536, 32000)
    dtype = torch.bfloat16
    x = _fuse_inputs((B, T, H_g, H_r, V), dtype, check.device, projection=False, grad_w=False)
    n, es = B * T, 2
    fwd_bytes = n * (2 * H_g + H_r) * es + n * (8 + 4)  # gathered rows + latents read, output written; ids, mask
    bwd_bytes = n * 2 * H_r * es  # the gradient's first H_r columns read, the latent's gradient written
    c = 1.0

    def fuse(fn, **kw):
        return lambda lat: fn(x["ids"], x["W"], lat, x["mask"], lam=0.5, norm_target=c, **kw)

    impls = {"triton": fuse(latent_fuse, backend="triton", check_inputs=False), "twin": fuse(latent_fuse_naive)}
    t = timer(check.device)
    ms = {f"fwd/{k}": t(lambda f=f: f(x["L"])) for k, f in impls.items()}
    ms["fwd/embedding"] = t(lambda: F.embedding(x["ids"], x["W"]))

    def fwdbwd(f):
        lat = x["L"].detach().requires_grad_()
        f(lat).backward(x["grad"])

    ms.update({f"fwdbwd/{k}": t(lambda f=f: fwdbwd(f)) for k, f in impls.items()})
    res = {"shape_BTHgHrV": [B, T, H_g, H_r, V], "dtype": "bfloat16", "ms": ms,
           "fwd": _fractions(fwd_bytes / ms["fwd/triton"] / 1e6, check),
           "fwdbwd": _fractions((fwd_bytes + bwd_bytes) / ms["fwdbwd/triton"] / 1e6, check),
           "twin_over_triton_fwd": ms["fwd/twin"] / ms["fwd/triton"],
           "twin_over_triton_fwdbwd": ms["fwdbwd/twin"] / ms["fwdbwd/triton"],
           "triton_over_embedding_fwd": ms["fwd/triton"] / ms["fwd/embedding"]}
    return res


def bandwidth_cross_entropy(check: Check) -> dict:
    import torch
    import torch.nn.functional as F
    from flythinker.kernels import linear_cross_entropy, linear_cross_entropy_naive
    from flythinker.kernels.linear_cross_entropy import _ce_chunk_triton
    from transformers.loss.loss_utils import fixed_cross_entropy

    C, N, H, V = (4, 8, 16, 300) if check.dry else (4096, 8192, 576, 49152)
    dtype = torch.bfloat16
    dev = check.device
    g = torch.Generator().manual_seed(0)
    slab = torch.randn(C, V, generator=g).to(dev, dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(dev)
    loss_rows = torch.empty(C, device=dev)
    scale = torch.ones(1, device=dev)
    t = timer(check.device)
    ms_kernel = t(lambda: _ce_chunk_triton(slab, labels[:C], loss_rows, scale, -100, None, True))
    kernel_bytes = 3 * C * V * 2  # pass 1 reads the row, pass 2 reads it again and writes dlogits in place
    h = torch.randn(N, H, generator=g).to(dev, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * H**-0.5).to(dev, dtype).requires_grad_()

    def step(fn):
        h.grad = w.grad = None
        fn().backward()

    losses = {"triton": lambda: linear_cross_entropy(h, w, labels, backend="triton", check_inputs=False),
              "twin": lambda: linear_cross_entropy_naive(h, w, labels),
              "hf": lambda: fixed_cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100)}
    ms = {k: t(lambda f=f: step(f)) for k, f in losses.items()}
    a, b = torch.randn(N, H, device=dev, dtype=dtype), torch.randn(H, V, device=dev, dtype=dtype)
    ms_matmul = t(lambda: a @ b)
    flops = 6 * N * H * V  # forward logits + the two gradient matmuls
    return {"ce_kernel": {"slab_CV": [C, V], "dtype": "bfloat16", "ms": ms_kernel,
                          **_fractions(kernel_bytes / ms_kernel / 1e6, check)},
            "fwdbwd": {"N_H_V": [N, H, V], "dtype": "bfloat16", "ms": ms,
                       "twin_over_triton": ms["twin"] / ms["triton"], "hf_over_triton": ms["hf"] / ms["triton"],
                       "triton_tflops": flops / ms["triton"] / 1e9, "matmul_tflops": 2 * N * H * V / ms_matmul / 1e9,
                       "triton_fraction_of_matmul_rate": (flops / ms["triton"]) / (2 * N * H * V / ms_matmul)}}


def section_bandwidth(check: Check, res: dict) -> None:
    res["latent_fuse"] = bandwidth_latent_fuse(check)
    res["linear_cross_entropy"] = bandwidth_cross_entropy(check)


# ---- sampling throughput ---------------------------------------------------------------------------------------------
def section_sampling(check: Check, res: dict) -> None:
    import torch
    from flythinker.kernels import sample, sample_naive

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_sampling import SETTINGS, hf_chain, sort_sampler

    grid = [(2, 300)] if check.dry else [(B, V) for V in (49152, 151936) for B in (1, 8, 64, 256)]
    t = timer(check.device)
    rows = []
    for B, V in grid:
        if not check.budget_left():
            rows.append({"B": B, "V": V, "skipped": "time budget"})
            break
        x = 3 * torch.randn(B, V, device=check.device)
        g = torch.Generator(device=check.device).manual_seed(0)
        for name, s in SETTINGS.items():
            ms = {"triton": t(partial(sample, x, generator=g, backend="triton", check_inputs=False, **s)),
                  "hf": t(partial(hf_chain(s), x, g)), "sort": t(partial(sort_sampler, x, s, g)),
                  "twin": t(partial(sample_naive, x, generator=g, **s))}
            rows.append({"B": B, "V": V, "setting": name, **{f"{k}_ms": v for k, v in ms.items()},
                         "triton_rows_per_s": B / ms["triton"] * 1e3,
                         **{f"{k}_over_triton": ms[k] / ms["triton"] for k in ("hf", "sort", "twin")}})
    res["rows"] = rows


# ---- decode ----------------------------------------------------------------------------------------------------------
def _base_factory(check: Check, attn: str):
    """(a function making the pair's base model, "real" | "random" weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from flythinker.hub import ModelNotFoundError, load_pretrained, resolve
    from flythinker.pretrained import pair_info
    from flythinker.training.toy import tiny_config

    if check.dry:
        cfg = tiny_config("llama")
        return (lambda: AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)), "random (tiny)"
    try:
        resolve(pair_info(SHIPPED)["base"])
        return (lambda: load_pretrained(pair_info(SHIPPED)["base"], dtype=torch.bfloat16, attn_implementation=attn,
                                        with_tokenizer=False)[0]), "real"
    except ModelNotFoundError:
        cfg = tiny_config("llama", **SMOLLM2_CONFIG)

        def make():
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)

        return make, "random (the offline base model is not on this machine)"


def build_pair(make_base, shared: bool, with_deltas: bool):
    """The shipped pair's layout around bases from `make_base`, as `flythinker.pretrained.loading.load_shipped`
    builds it (with the shipped deltas, or fresh zero adapters and no trained tensors when `with_deltas` is off)."""
    from flythinker import FlyThinkerForCausalLM
    from flythinker.pretrained.loading import copy_named, merge_factors, read_deltas, set_adapters

    info, named, factors = read_deltas(SHIPPED, None)
    scaling = float(info["lora"]["scaling"])
    if shared:
        r = next(iter(factors.values()))["A"].shape[0] if factors else info["lora"]["rank"]
        targets = sorted({m.rsplit(".", 1)[-1] for m in factors}) or info["lora"]["targets"]
        model = FlyThinkerForCausalLM.from_shared_base(make_base(), r=r, lora_alpha=scaling * r,
                                                       target_modules=targets, **info["fusion"])
        if with_deltas:
            set_adapters(model.model, factors, scaling, SHIPPED)
    else:
        model = FlyThinkerForCausalLM.from_pair(make_base(), make_base(), **info["fusion"])
        if with_deltas:
            merge_factors(model.model, factors, scaling, SHIPPED)
    if with_deltas:
        copy_named(model.model, named, SHIPPED)  # keyed like the fused pair's (checkpoint) names
    return model.eval()


def _generate_s(model, prompt: dict, new_tokens: int, device, gen_kwargs: dict) -> float:
    import torch

    torch.cuda.synchronize() if device.type == "cuda" else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False, **gen_kwargs)
    torch.cuda.synchronize() if device.type == "cuda" else None
    if out.shape[1] - prompt["input_ids"].shape[1] != new_tokens:
        raise RuntimeError(f"expected {new_tokens} new tokens with eos off, got {out.shape[1]}")
    return time.perf_counter() - t0


def per_token_ms(model, prompt: dict, check: Check, rounds: int, **gen_kwargs: Any) -> dict:
    """Median per-token decode time: (t(8 + n) - t(8)) / n over `rounds` interleaved pairs of calls."""
    short, n = (2, 3) if check.dry else (8, 64)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id = None, 0  # every call makes all its tokens
    _generate_s(model, prompt, short, check.device, gen_kwargs)  # warm-up: allocations, worker threads, kernels
    diffs = []
    for _ in range(rounds):
        a = _generate_s(model, prompt, short, check.device, gen_kwargs)
        b = _generate_s(model, prompt, short + n, check.device, gen_kwargs)
        diffs.append((b - a) / n * 1e3)
    return {"per_token_ms": statistics.median(diffs), "rounds": rounds, "path": generate_path(model, prompt, check)}


class _Last(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()


def generate_path(model, prompt: dict, check: Check) -> str:
    """Which decode loop a pair's `generate` takes (the DEBUG line of flythinker.decode), for one short call."""
    log = logging.getLogger("flythinker.decode")
    handler, level = _Last(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        _generate_s(model, prompt, 2, check.device, {})
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return (handler.message or "transformers generate").removeprefix("generate: ")


def _prompts(check: Check, vocab: int) -> tuple[dict, dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    gen_len, rsn_len = (6, 9) if check.dry else (64, 160)
    ids = torch.randint(3, vocab, (1, gen_len), generator=g).to(check.device)
    rsn = torch.randint(3, vocab, (1, rsn_len), generator=g).to(check.device)
    alone = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return alone, {**alone, "reasoner_input_ids": rsn, "reasoner_attention_mask": torch.ones_like(rsn)}


def decode_variants(check: Check, attn: str) -> dict:
    """Per-token decode of the generator alone and the pair's layouts, one attention implementation."""
    import torch

    make, weights = _base_factory(check, attn)
    dtype = torch.float32 if check.dry else torch.bfloat16
    rounds = 1 if check.dry else 3
    base = make().to(check.device, dtype).eval()
    alone, split = _prompts(check, base.config.vocab_size)
    rows = {"generator alone": per_token_ms(base, alone, check, rounds),  # what a user's plain HF model runs
            # the same with a static cache, closer to the pair's lean static-cache loop
            "generator alone, static cache": per_token_ms(base, alone, check, rounds, cache_implementation="static")}
    del base
    two = build_pair(make, shared=False, with_deltas=not check.dry).to(check.device, dtype)
    for mode in ("off", "threads" if check.dry else "streams"):
        two.config.parallel = mode
        rows[f"pair, two copies, parallel={mode}"] = per_token_ms(two, split, check, rounds)
    del two
    shared = build_pair(make, shared=True, with_deltas=not check.dry).to(check.device, dtype)
    rows["pair, shared base (batched step)"] = per_token_ms(shared, split, check, rounds)
    ref, ref_static = rows["generator alone"]["per_token_ms"], rows["generator alone, static cache"]["per_token_ms"]
    for r in rows.values():
        r["over_generator_alone"] = r["per_token_ms"] / ref
        r["over_generator_alone_static"] = r["per_token_ms"] / ref_static
    return {"weights": weights, "dtype": str(dtype).removeprefix("torch."), "variants": rows}


def section_decode(check: Check, res: dict) -> None:
    attns = ["sdpa"] + (["flash_attention_2"] if not check.dry and importlib.util.find_spec("flash_attn") else [])
    res["prompt"] = ("batch 1, generator prompt {} tokens, reasoner prompt {} (random ids), greedy, eos off"
                     .format(*((6, 9) if check.dry else (64, 160))))
    for attn in attns:
        if not check.budget_left():
            res[attn] = {"skipped": "time budget"}
            continue
        res[attn] = decode_variants(check, attn)
    if "flash_attention_2" not in attns:
        res["flash_attention_2"] = {"skipped": "flash-attn is not installed (the `cuda` extra)" if not check.dry
                                    else "dry run"}


# ---- main ------------------------------------------------------------------------------------------------------------
RUNNERS = {"env": section_env, "kernels": section_kernels, "bandwidth": section_bandwidth,
           "sampling": section_sampling, "decode": section_decode}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"),
                   help="JSON written after every section (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: checks that the "
                   "script runs (what CI does); its timings mean nothing")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds after which remaining cases are skipped (recorded) (default: %(default)s)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if not args.budget_s > 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 before triton is imported: run it as a script")
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported (by flythinker.kernels)
        os.environ["FLYTHINKER_NO_CPP"] = "1"  # the C++ CPU op is no part of a GPU run: neither build nor wait for it
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or with --dry-run on CPU", file=sys.stderr)
        return 2
    check = Check(args)
    for name in [s for s in SECTIONS if s in args.sections.split(",")]:
        with check.section(name) as res:
            RUNNERS[name](check, res)
    check.write()
    failed = [n for n, s in check.report["sections"].items() if s["status"] != "ok"]
    bad = check.report["sections"].get("kernels", {}).get("all_ok") is False
    print(f"wrote {check.out} in {check.report['wall_s']:.0f} s; sections failed: {failed or 'none'}; kernels "
          f"{'MISMATCH' if bad else 'ok'}")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
