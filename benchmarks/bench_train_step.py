"""One FlyThinker training step (forward+backward, no optimizer), loss_impl "fused" vs "naive".

    .venv/bin/python benchmarks/bench_train_step.py                 # SmolLM2-sized pair, 30 layers each
    .venv/bin/python benchmarks/bench_train_step.py --layers 6      # fewer layers on a slow/shared machine

Pair: two random-init Llama models of SmolLM2-135M's shape (V=49152, H=576, 9 heads / 3 KV heads, MLP 1536,
tied embeddings, `--layers` layers each), sdpa attention, fusion lambda 0.5, T=1024, B=2, the first 64 tokens
of each row masked as prompt. Cases: {gradient checkpointing on both HF models, off} x {naive, fused}, each in
its own subprocess (clean peak).
Activation memory = peak minus parameters and gradients: every trainable parameter gets a zero-filled .grad
*before* the step (autograd accumulates into it in place), the process's peak RSS (VmHWM) is reset, and the
step's peak RSS growth is reported; what remains is activations, saved tensors and transients (logits, the fused
op's chunk slab and fp32 [V, H] head-gradient accumulator, ...). On CUDA, torch.cuda.max_memory_allocated.
glibc's adaptive mmap threshold would serve the many 2-13 MB layer tensors from the heap, where freed blocks
fragment and inflate RSS; the workers therefore run with MALLOC_MMAP_THRESHOLD_=65536 (`--mmap-threshold`, 0 =
glibc default) so that RSS tracks live tensors (this adds page faults to both paths alike).
Time: the step's process CPU time with `--threads 1` on CPU (this 2-core machine is shared: wall time mostly
measures the neighbours; wall time is recorded too). Results: benchmarks/results/train_step.{json,png}.
"""

from __future__ import annotations

import os
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
QUICK = {"args": ["--layers", "2", "--T", "256", "--no-plain", "--out", "{results}/train_step"],
         "seconds": 60}

TARGET_MEM, TARGET_TIME = 0.5, 1.15


def worker(cfg: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from flythinker import FlyThinkerForCausalLM
    from flythinker.training.toy import tiny_config

    device = torch.device(cfg["device"])
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    dtype = getattr(torch, cfg["dtype"])

    def lm(seed: int):
        c = tiny_config("llama", hidden_size=576, num_hidden_layers=cfg["layers"], vocab_size=cfg["V"],
                        num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, rope_theta=100000.0)
        c._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(c, dtype=dtype)

    model = FlyThinkerForCausalLM.from_pair(lm(0), lm(1), fusion_lambda=0.5, loss_impl=cfg["impl"],
                                            parallel="off").to(device).train()
    if cfg["ckpt"]:
        for m in (model.generator, model.reasoner):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(0)
    B, T = cfg["B"], cfg["T"]
    ids = torch.randint(3, cfg["V"], (B, T), generator=g).to(device)
    labels = ids.clone()
    labels[:, :64] = -100
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # gradients exist before the step: the peak growth is activations + transients only
        p.grad = torch.zeros_like(p)
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    grad_mb = sum(p.grad.numel() * p.grad.element_size() for p in params) / 2**20

    def step():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out

    out, m = measured_step(step, device)
    return {"activation_mb": m["peak_growth_mb"], "param_mb": param_mb, "grad_mb": grad_mb, "wall_s": m["wall_s"],
            "cpu_s": m["cpu_s"], "loss": float(out.loss), "logits_returned": out.logits is not None}


def run_case(cfg: dict, mmap_threshold: int = 0) -> dict:
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    return run_worker(__file__, cfg, env=env)


def main() -> None:
    ap = worker_parser(__doc__.split("\n")[0], default_out=RESULTS / "train_step")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--V", type=int, default=49152)
    ap.add_argument("--mmap-threshold", type=int, default=65536)
    ap.add_argument("--no-plain", action="store_true", help="skip the runs without gradient checkpointing")
    args = ap.parse_args()
    if serve_worker(args, worker):
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device == "cuda" else "float32"
    timer = "cpu_s" if device == "cpu" else "wall_s"
    base = {"device": device, "dtype": dtype, "layers": args.layers, "T": args.T, "B": args.B, "V": args.V,
            "threads": args.threads}
    report = {"what": "one training step (fwd+bwd, no optimizer) of a FlyThinker pair of SmolLM2-shaped Llamas",
              "activation_memory": "peak growth with parameters and gradients already allocated (CPU: VmHWM)",
              "time": timer, "config": base, "malloc_mmap_threshold": args.mmap_threshold,
              "loadavg_start": os.getloadavg(),
              "targets": {"ckpt_mem_ratio<=": TARGET_MEM, "ckpt_time_ratio<=": TARGET_TIME}, "cases": []}
    for ckpt in (True,) if args.no_plain else (True, False):
        res = {impl: run_case({**base, "ckpt": ckpt, "impl": impl}, args.mmap_threshold)
               for impl in ("naive", "fused")}
        case = {"gradient_checkpointing": ckpt, **res,
                "mem_ratio": res["fused"]["activation_mb"] / res["naive"]["activation_mb"],
                "time_ratio": res["fused"][timer] / res["naive"][timer],
                "wall_time_ratio": res["fused"]["wall_s"] / res["naive"]["wall_s"], "loadavg": os.getloadavg()}
        report["cases"].append(case)
        print(f"ckpt={ckpt!s:5}: activations naive {res['naive']['activation_mb']:8.1f} MiB, fused "
              f"{res['fused']['activation_mb']:8.1f} MiB ({case['mem_ratio']:.3f}x, target <= {TARGET_MEM}) | "
              f"{timer} naive {res['naive'][timer]:7.1f} s, fused {res['fused'][timer]:7.1f} s "
              f"({case['time_ratio']:.3f}x, target <= {TARGET_TIME}; wall {case['wall_time_ratio']:.3f}x) | "
              f"loss {res['naive']['loss']:.5f} vs {res['fused']['loss']:.5f} | load {case['loadavg'][0]:.1f}",
              flush=True)
    report["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    _plot(report, out.with_suffix(".png"), timer)
    print(f"wrote {out.with_suffix('.json')} and .png")


def _plot(report: dict, path: Path, timer: str) -> None:
    cases, cfg = report["cases"], report["config"]
    plot_naive_vs_fused(cases, ["ckpt on" if c["gradient_checkpointing"] else "ckpt off" for c in cases],
                        [("activation_mb", "activation memory (MiB)", "mem_ratio"),
                         (timer, f"step {timer}", "time_ratio")],
                        ("naive (logits + CE)", "fused linear CE"),
                        f"train step, pair of {cfg['layers']}-layer SmolLM2-shaped Llamas, B={cfg['B']} T={cfg['T']} "
                        f"V={cfg['V']}, {cfg['device']} {cfg['dtype']}", path)


if __name__ == "__main__":
    main()
