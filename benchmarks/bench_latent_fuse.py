"""latent_fuse benchmark: C++ CPU op vs eager twin vs torch.compile'd twin, and bandwidth vs torch.clone.

    .venv/bin/python benchmarks/bench_latent_fuse.py          # writes benchmarks/results/latent_fuse.{json,png}
    .venv/bin/python benchmarks/bench_latent_fuse.py --quick  # 3 rounds, no torch.compile (--rounds N, --out F)
    .venv/bin/python -m pytest benchmarks/suites/test_latent_fuse.py --benchmark-only  # the pytest-benchmark suite

Sizes: B*T = 8192 rows, H_g = 2048, H_r = 1536, fp32, "pad" projection, cached vocab-mean target (a float, as
the model passes it at inference). Forward+backward: gradient to the latent only (frozen embedding, the LoRA
case) and, separately, to the embedding too. Timings on a shared machine drift, so every figure is a ratio to a
baseline measured in the same run, interleaved round-robin (median of rounds), with os.getloadavg() recorded.
Bandwidth: bytes the op must move (gathered rows + latents read, output written; backward: grad rows read,
latent grads written) / time, against torch.clone of a tensor moving the same number of bytes.
Targets: C++ >= 2x the eager twin, >= 60% of clone bandwidth. The GPU section (CUDA only) times the
Triton kernels with triton.testing.do_bench.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from flythinker.kernels import latent_fuse_cpp
from flythinker.kernels.latent_fuse import latent_fuse
from flythinker.kernels.latent_fuse_naive import latent_fuse_naive, vocab_mean_norm

ROWS, H_G, H_R, VOCAB, BATCH = 8192, 2048, 1536, 16384, 8
RESULTS = Path(__file__).resolve().parent / "results"

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "its pytest-benchmark suite (pytest_latent_fuse) is the quick form"}


def make_inputs(device="cpu", dtype=torch.float32, grad_weight=False, rows=ROWS, h_g=H_G, h_r=H_R, vocab=VOCAB):
    g = torch.Generator().manual_seed(0)
    B, T = BATCH, rows // BATCH
    W = torch.randn(vocab, h_g, generator=g).to(device, dtype).requires_grad_(grad_weight)
    L = torch.randn(B, T, h_r, generator=g).to(device, dtype)
    ids = torch.randint(0, vocab, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, device=device)
    mask[: B // 2, :16] = 0  # some left padding
    c = float(vocab_mean_norm(W))
    grad = torch.randn(B, T, h_g, generator=g).to(device, dtype)
    return dict(ids=ids, W=W, L=L, mask=mask, c=c, grad=grad)


def fwd_bytes(x) -> int:
    n, es = x["ids"].numel(), x["W"].element_size()
    return n * (2 * H_G + H_R) * es + n * (x["ids"].element_size() + 4)  # E rows + h read, out written, ids+mask


def bwd_bytes(x, grad_weight: bool) -> int:
    n, es = x["ids"].numel(), x["W"].element_size()
    b = n * 2 * H_R * es  # g[:, :H_r] read, d latent written ("pad", detached norm)
    if grad_weight:
        b += n * 2 * H_G * 4 + n * H_G * es  # scatter-add: read-modify-write of fp32 rows, g read
    return b


def make_fns(x, compiled: bool = True):
    """name -> (forward fn, forward+backward fn). The dispatcher (with its input checks) for the C++ op."""

    def cpp(lat):
        return latent_fuse(x["ids"], x["W"], lat, x["mask"], lam=0.5, norm_target=x["c"], backend="cpp")

    def twin(lat):
        return latent_fuse_naive(x["ids"], x["W"], lat, x["mask"], lam=0.5, norm_target=x["c"])

    fns = {"cpp": cpp, "twin": twin}
    if compiled:
        ctw = torch.compile(latent_fuse_naive, dynamic=False)
        fns["compiled_twin"] = lambda lat: ctw(x["ids"], x["W"], lat, x["mask"], lam=0.5, norm_target=x["c"])

    def fb(f):
        def run():
            lat = x["L"].detach().requires_grad_()
            f(lat).backward(x["grad"])
            x["W"].grad = None
        return run

    return {k: ((lambda f=f: f(x["L"])), fb(f)) for k, f in fns.items()}


def interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds per call, the candidates timed round-robin so load drift hits them alike."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_cpu(rounds: int = 7, compiled: bool = True) -> dict:
    if not latent_fuse_cpp.load():
        raise SystemExit("the C++ op could not be built: nothing to benchmark")
    out = {"load_before": os.getloadavg(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "sizes": dict(rows=ROWS, H_g=H_G, H_r=H_R, V=VOCAB, dtype="float32")}
    for grad_weight in (False, True):
        x = make_inputs(grad_weight=grad_weight)
        fns = make_fns(x, compiled=compiled)
        fb_bytes = fwd_bytes(x) + bwd_bytes(x, grad_weight)
        clone_fwd = torch.empty(fwd_bytes(x) // 8)  # clone reads + writes: same bytes moved as the op
        clone_fb = torch.empty(fb_bytes // 8)
        cands = {"clone_fwd": clone_fwd.clone, "clone_fwdbwd": clone_fb.clone}
        if not grad_weight:
            cands.update({f"fwd/{k}": v[0] for k, v in fns.items()})
        cands.update({f"fwdbwd/{k}": v[1] for k, v in fns.items()})
        t = interleaved(cands, rounds)
        key = "weight_grad" if grad_weight else "latent_grad"
        res = {"ms": {k: v * 1e3 for k, v in t.items()}}
        for phase, nbytes, clone in (("fwd", fwd_bytes(x), "clone_fwd"), ("fwdbwd", fb_bytes, "clone_fwdbwd")):
            if f"{phase}/cpp" not in t:
                continue
            gbs = nbytes / t[f"{phase}/cpp"] / 1e9
            clone_gbs = nbytes / t[clone] / 1e9
            res[phase] = {
                "cpp_speedup_vs_twin": t[f"{phase}/twin"] / t[f"{phase}/cpp"],
                "cpp_gbps": gbs, "clone_gbps": clone_gbs, "cpp_fraction_of_clone_bw": gbs / clone_gbs,
                "bytes": nbytes,
            }
            if f"{phase}/compiled_twin" in t:
                res[phase]["cpp_speedup_vs_compiled_twin"] = t[f"{phase}/compiled_twin"] / t[f"{phase}/cpp"]
                res[phase]["compiled_twin_speedup_vs_twin"] = t[f"{phase}/twin"] / t[f"{phase}/compiled_twin"]
        out[key] = res
    out["load_after"] = os.getloadavg()
    return out


def run_gpu() -> dict | None:
    if not torch.cuda.is_available():
        return None
    import triton

    x = make_inputs(device="cuda", grad_weight=False)
    fns = make_fns(x, compiled=False)

    def tri(lat):
        return latent_fuse(x["ids"], x["W"], lat, x["mask"], lam=0.5, norm_target=x["c"], backend="triton",
                           check_inputs=False)

    def tri_fb():
        lat = x["L"].detach().requires_grad_()
        tri(lat).backward(x["grad"])

    clone_src = torch.empty(fwd_bytes(x) // 8, device="cuda")
    ms = {"fwd/triton": triton.testing.do_bench(lambda: tri(x["L"])), "fwdbwd/triton": triton.testing.do_bench(tri_fb),
          "fwd/twin": triton.testing.do_bench(fns["twin"][0]), "fwdbwd/twin": triton.testing.do_bench(fns["twin"][1]),
          "clone_fwd": triton.testing.do_bench(clone_src.clone)}
    gbs = fwd_bytes(x) / ms["fwd/triton"] / 1e6
    return {"device": torch.cuda.get_device_name(), "ms": ms, "triton_fwd_gbps": gbs,
            "triton_fwd_fraction_of_clone_bw": ms["clone_fwd"] / ms["fwd/triton"],
            "triton_speedup_vs_twin": {p: ms[f"{p}/twin"] / ms[f"{p}/triton"] for p in ("fwd", "fwdbwd")}}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("latent_grad", "weight_grad")):
        ms = res[key]["ms"]
        names = [k for k in ms if not k.startswith("clone")]
        ax.barh(names, [ms[k] for k in names], color=["C0" if "cpp" in k else "C1" for k in names])
        for k in ("clone_fwd", "clone_fwdbwd"):
            if k in ms:
                ax.axvline(ms[k], ls="--", color="grey")
        ax.set_xlabel("ms (median, interleaved; dashed: clone of the same bytes)")
        ax.set_title(f"CPU {ROWS}x{H_G}/{H_R} fp32, grad to {key.split('_')[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from benchmarks._common import write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per candidate (median kept)")
    p.add_argument("--quick", action="store_true", help="3 rounds, no torch.compile'd twin (`flythinker bench`)")
    p.add_argument("--out", type=Path, default=RESULTS / "latent_fuse.json")
    args = p.parse_args(argv)
    res = {"cpu": run_cpu(3 if args.quick else args.rounds, compiled=not args.quick)}
    res["gpu"] = run_gpu()
    write_json(args.out, res, indent=1)
    plot(res["cpu"], args.out.with_suffix(".png"))
    for key in ("latent_grad", "weight_grad"):
        for phase in ("fwd", "fwdbwd"):
            if phase in res["cpu"][key]:
                r = res["cpu"][key][phase]
                print(f"{key:11s} {phase:6s}: C++ {r['cpp_speedup_vs_twin']:.2f}x eager twin, "
                      f"{r.get('cpp_speedup_vs_compiled_twin', float('nan')):.2f}x compiled twin, "
                      f"{r['cpp_gbps']:.2f} GB/s = {100 * r['cpp_fraction_of_clone_bw']:.0f}% of clone "
                      f"({r['clone_gbps']:.2f} GB/s)")
    print("load average before/after:", res["cpu"]["load_before"], res["cpu"]["load_after"])
    if res["gpu"]:
        print("GPU:", json.dumps(res["gpu"]))


if __name__ == "__main__":
    main()
