"""Sampling benchmark: fused CPU path vs the sort-based twin vs HF's logits-processor chain (+ GPU section).

    .venv/bin/python benchmarks/bench_sampling.py            # writes benchmarks/results/sampling.{json,png}
    .venv/bin/python benchmarks/bench_sampling.py --threads 2 --rounds 9

One decode step's sampling from logits [B, V] (fp32), V in {49152 (SmolLM2), 151936 (Qwen2)}, B in {1, 8}:
- "fused": `flythinker.kernels.sample(..., backend="cpu")`: topk + bincount radix select, no full sort;
- "twin": `sample_naive`, softmax + two sorts (the oracle);
- "hf": TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper -> MinPLogitsWarper -> softmax ->
  torch.multinomial, i.e. what `generate(do_sample=True, ...)` runs.
Settings: "all" (T=0.7, top_k=50, top_p=0.9, min_p=0.05: the usual chat setting) and "top_p" (T=1, top_p=0.9
alone: no top-k to shrink the candidate set, the hard case for a sorting-free method).
Logits are 3 * N(0, 1) (peaked like LM logits: about 1e3 tokens in the 0.9 nucleus at V=151936).
The methods run interleaved round-robin and each figure is the median over rounds; ratios are taken within
the run because this box is shared (os.getloadavg() is recorded). torch runs single-threaded by default:
with 2 cores shared by several jobs a 2-thread pool stalls (bincount measured 72 ms vs 0.1 ms).
GPU section (CUDA only): the Triton kernel vs a torch.sort-based top-p/top-k sampler, triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from flythinker.kernels.sampling import sample
from flythinker.kernels.sampling_naive import sample_naive

from benchmarks._common import write_json  # noqa: E402

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "its pytest-benchmark suite (pytest_sampling) is the quick form"}

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "all": {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "min_p": 0.05},
    "top_p": {"temperature": 1.0, "top_k": None, "top_p": 0.9, "min_p": 0.0},
}


def hf_chain(s: dict):
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if s["temperature"] != 1.0:
        procs.append(TemperatureLogitsWarper(s["temperature"]))
    if s["top_k"]:
        procs.append(TopKLogitsWarper(s["top_k"]))
    if s["top_p"] < 1.0:
        procs.append(TopPLogitsWarper(s["top_p"]))
    if s["min_p"] > 0:
        procs.append(MinPLogitsWarper(s["min_p"]))

    def run(x, g):
        scores = procs(None, x.clone())  # HF copies the step's logits too
        return torch.multinomial(torch.softmax(scores, -1), 1, generator=g)[:, 0]

    return run


def sort_sampler(x, s, g):
    """The usual GPU sampler (vLLM-style before FlashInfer): sort, cumsum, mask, scatter back, multinomial."""
    x = x / s["temperature"]
    sx, idx = x.sort(-1, descending=True)
    if s["top_k"]:
        sx[:, s["top_k"]:] = float("-inf")
    p = sx.softmax(-1)
    drop = (p.cumsum(-1) - p) >= s["top_p"]
    sx = sx.masked_fill(drop, float("-inf"))
    if s["min_p"] > 0:
        sx = sx.masked_fill(p < s["min_p"] * p[:, :1], float("-inf"))
    tok = torch.multinomial(sx.softmax(-1), 1, generator=g)
    return idx.gather(1, tok)[:, 0]


def bench_cpu(rounds: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for V in (49152, 151936):
        for B in (1, 8):
            x = 3.0 * torch.randn(B, V, generator=torch.Generator().manual_seed(V + B))
            for name, s in SETTINGS.items():
                hf = hf_chain(s)
                fns = {
                    "fused": lambda x=x, s=s: sample(x, generator=g, backend="torch", **s),
                    "twin": lambda x=x, s=s: sample_naive(x, generator=g, **s),
                    "hf": lambda x=x, h=hf: h(x, g),
                }
                times = {k: [] for k in fns}
                for f in fns.values():
                    f()  # warm-up
                for _ in range(rounds):
                    for k, f in fns.items():
                        t0 = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                row = {"V": V, "B": B, "setting": name, **{f"{k}_ms": round(v, 4) for k, v in med.items()},
                       "twin_over_fused": round(med["twin"] / med["fused"], 2),
                       "hf_over_fused": round(med["hf"] / med["fused"], 2), "loadavg": os.getloadavg()[0]}
                print(f"V={V:6d} B={B} {name:5s}  fused {med['fused']:8.3f} ms  twin {med['twin']:8.3f} ms "
                      f"({row['twin_over_fused']:5.1f}x)  hf {med['hf']:8.3f} ms ({row['hf_over_fused']:5.1f}x)"
                      f"  load {row['loadavg']:.1f}")
                rows.append(row)
    return rows


def bench_gpu() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    from triton.testing import do_bench

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for V in (49152, 151936):
        for B in (1, 8, 64):
            x = 3.0 * torch.randn(B, V, device="cuda")
            for name, s in SETTINGS.items():
                t_fused = do_bench(lambda x=x, s=s: sample(x, generator=g, check_inputs=False, **s))
                t_sort = do_bench(lambda x=x, s=s: sort_sampler(x, s, g))
                rows.append({"V": V, "B": B, "setting": name, "triton_ms": t_fused, "sort_ms": t_sort,
                             "sort_over_triton": round(t_sort / t_fused, 2)})
                print(f"GPU V={V:6d} B={B:2d} {name:5s} triton {t_fused:.4f} ms  sort {t_sort:.4f} ms "
                      f"({t_sort / t_fused:.2f}x)")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"V={r['V']}\nB={r['B']} {r['setting']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.bar([i - 0.2 for i in xs], [r["twin_over_fused"] for r in rows], 0.4, label="sort-based twin / fused")
    ax.bar([i + 0.2 for i in xs], [r["hf_over_fused"] for r in rows], 0.4, label="HF warper chain / fused")
    ax.axhline(2.0, color="k", ls="--", lw=0.8, label="2x target (vs twin)")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up of the fused CPU path (x)")
    ax.set_title("Sampling one step on CPU (median over interleaved rounds, same run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "sampling", help="results path without suffix "
                    "(.json and .png are written; default: %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = bench_cpu(args.rounds)
    gpu = bench_gpu()
    out = {"cpu": cpu, "gpu": gpu or "skipped: no CUDA device", "threads": args.threads, "rounds": args.rounds,
           "torch": torch.__version__, "settings": SETTINGS, "logits": "3 * N(0, 1)"}
    write_json(args.out.with_suffix(".json"), out, indent=1)
    plot(cpu, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
