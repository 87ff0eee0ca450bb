"""Fused linear cross-entropy vs plain logits + F.cross_entropy: peak memory and time of forward+backward.

    .venv/bin/python benchmarks/bench_loss.py            # N=4096, H=576, V in {49152, 151936}
    .venv/bin/python benchmarks/bench_loss.py --chunks   # also sweep chunk sizes of the fused op (V=49152)

Every measurement runs in its own subprocess so that one case's allocations never inflate another's peak.
What is measured, per case, on one forward+backward of `loss(hidden @ W^T, labels)` with hidden [N, H] and
W [V, H] both requiring grad (fp32 on CPU, bf16 on CUDA):
- CPU: peak resident-set growth of the process during the step: the kernel's high-water mark (VmHWM) is reset
  through /proc/self/clear_refs after the inputs exist, so `peak - rss_before` counts everything the step
  allocates and touches (logits, softmax, gradients of hidden and W, scratch). glibc serves these large blocks
  with mmap and returns them on free, so RSS tracks live tensors.
- CUDA: torch.cuda.max_memory_allocated() growth over the same step.
- time: the first step is the warm-up (and the memory measurement); then `--reps` timed steps, min reported,
  both wall-clock and process CPU time. On this shared 2-core machine (load average often > 10, recorded with
  os.getloadavg()) wall time mostly measures the neighbours, so CPU runs default to `--threads 1` and the
  headline time ratio is the CPU-time ratio (single-threaded CPU time = work done, insensitive to contention).
The cases run interleaved (naive, fused, ...) and ratios fused/naive are taken within one run.
Results: benchmarks/results/loss.{json,png}.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from benchmarks._common import (  # noqa: E402
    RESULTS,
    measured_step,
    plot_naive_vs_fused,
    run_worker,
    serve_worker,
    worker_parser,
    write_json,
)

# `flythinker bench` contract (flythinker/cli/bench.py): the quick mode's arguments and its time on 2 idle CPU cores
QUICK = {"args": ["--N", "512", "--V", "49152", "--out", "{results}/loss"], "seconds": 40}

TARGET_MEM, TARGET_TIME = 0.2, 1.0


def worker(cfg: dict) -> dict:
    import torch
    from flythinker.kernels import linear_cross_entropy, linear_cross_entropy_naive

    device = torch.device(cfg["device"])
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    dtype = getattr(torch, cfg["dtype"])
    N, H, V = cfg["N"], cfg["H"], cfg["V"]
    g = torch.Generator(device="cpu").manual_seed(0)
    # in-place init: no transient bigger than the inputs before the measurement starts
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).mul_(H**-0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[::7] = -100  # some prompt tokens

    def step():
        if cfg["impl"] == "naive":  # the materialising twin (a function of its own, not a backend)
            loss = linear_cross_entropy_naive(hidden, weight, labels)
        else:
            loss = linear_cross_entropy(hidden, weight, labels, backend=cfg["impl"], chunk_size=cfg.get("chunk"))
        loss.backward()
        return loss

    loss, warm = measured_step(step, device)  # the warm-up step is the memory measurement
    times, cpu_times = [], []
    for _ in range(cfg["reps"]):
        hidden.grad = weight.grad = None
        _, t = measured_step(step, device)
        times.append(t["wall_s"])
        cpu_times.append(t["cpu_s"])
    warm_s, warm_cpu = warm["wall_s"], warm["cpu_s"]
    return {"peak_growth_mb": warm["peak_growth_mb"], "warmup_s": warm_s, "warmup_cpu_s": warm_cpu,
            "times_s": times, "cpu_times_s": cpu_times, "time_s": min(times) if times else warm_s,
            "cpu_s": min(cpu_times) if cpu_times else warm_cpu, "loss": float(loss)}


def main() -> None:
    ap = worker_parser(__doc__.split("\n")[0], default_out=RESULTS / "loss")
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--H", type=int, default=576)
    ap.add_argument("--V", type=int, nargs="+", default=[49152, 151936])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved naive/fused rounds (min time kept)")
    ap.add_argument("--chunks", action="store_true", help="also sweep chunk sizes at the first V")
    args = ap.parse_args()
    if serve_worker(args, worker):
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device == "cuda" else "float32"
    fused_impl = "triton" if device == "cuda" else "torch"
    base = {"device": device, "dtype": dtype, "N": args.N, "H": args.H, "reps": args.reps,
            "threads": args.threads}
    timer = "cpu_s" if device == "cpu" else "time_s"
    report = {"what": "forward+backward of LM-head cross-entropy, hidden [N,H], weight [V,H], both with grad",
              "memory": "CPU: peak RSS growth over the step (VmHWM reset); CUDA: max_memory_allocated growth",
              "time": f"{timer} (min over reps); wall time also recorded", "device": device, "dtype": dtype,
              "torch_threads": args.threads if device == "cpu" else None,
              "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "loadavg_start": os.getloadavg(), "targets": {"mem_ratio<=": TARGET_MEM, "time_ratio<=": TARGET_TIME},
              "cases": []}
    from flythinker.kernels.linear_cross_entropy import default_chunk_size

    for V in args.V:
        res: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name, impl in (("naive", "naive"), ("fused", fused_impl)):
                r = run_worker(__file__, {**base, "V": V, "impl": impl})
                prev = res.setdefault(name, r)
                if prev is not r:  # keep the lower times; memory is deterministic up to allocator noise
                    for k in ("time_s", "cpu_s"):
                        prev[k] = min(prev[k], r[k])
        case = {"N": args.N, "H": args.H, "V": V, "chunk": default_chunk_size(args.N, V, args.H),
                "naive": res["naive"], "fused": res["fused"],
                "mem_ratio": res["fused"]["peak_growth_mb"] / res["naive"]["peak_growth_mb"],
                "time_ratio": res["fused"][timer] / res["naive"][timer],
                "wall_time_ratio": res["fused"]["time_s"] / res["naive"]["time_s"], "loadavg": os.getloadavg()}
        report["cases"].append(case)
        print(f"V={V:6d} chunk={case['chunk']}: naive {res['naive']['peak_growth_mb']:8.1f} MiB "
              f"{res['naive'][timer]:7.2f} s | fused {res['fused']['peak_growth_mb']:8.1f} MiB "
              f"{res['fused'][timer]:7.2f} s | mem {case['mem_ratio']:.3f}x (target <= {TARGET_MEM}) "
              f"{timer} {case['time_ratio']:.3f}x (target <= {TARGET_TIME}), wall {case['wall_time_ratio']:.3f}x "
              f"| load {case['loadavg'][0]:.1f}", flush=True)
    if args.chunks:
        V = args.V[0]
        sweep = []
        for chunk in (64, 256, 512, 2048):
            r = run_worker(__file__, {**base, "V": V, "impl": fused_impl, "chunk": chunk})
            sweep.append({"chunk": chunk, **r})
            print(f"  chunk {chunk:5d}: {r['peak_growth_mb']:8.1f} MiB {r[timer]:7.2f} s", flush=True)
        report["chunk_sweep"] = {"V": V, "timer": timer, "naive": report["cases"][0]["naive"][timer],
                                 "runs": sweep}
    report["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    _plot(report, out.with_suffix(".png"), timer)
    print(f"wrote {out.with_suffix('.json')} and .png")


def _plot(report: dict, path: Path, timer: str) -> None:
    cases = report["cases"]
    plot_naive_vs_fused(cases, [f"V={c['V']}" for c in cases],
                        [("peak_growth_mb", "peak memory growth (MiB)", "mem_ratio"), (timer, timer, "time_ratio")],
                        ("logits + cross_entropy", "linear_cross_entropy"),
                        f"fwd+bwd, N={cases[0]['N']}, H={cases[0]['H']}, {report['device']} {report['dtype']}", path)


if __name__ == "__main__":
    main()
