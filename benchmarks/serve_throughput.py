"""Serving throughput: 32 concurrent requests to a FlyThinker pair served by vLLM (`flythinker serve`), against an
HF `generate` batch loop over the same pair and against vLLM serving the generator alone.

Run in the vLLM virtualenv (`make bench-serve`); the HF side runs in the main virtualenv (transformers >= 5.24)
as subprocesses of this same file (`--side build|hf`). All requests arrive at t = 0; every request decodes
exactly --new-tokens tokens (greedy, EOS masked: min_tokens = max_tokens on both sides), so all three systems do
the same work. Per system: output tokens/s over the wall time from the first request to the last token, and
time to first token (TTFT) per request. The pair is SmolLM2-135M-Instruct as both generator and reasoner
(offline model, fp32, lambda 0.5; random-init pairs would decode the same work). Results: JSON + PNG under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks._common import free_port, wait_for_health

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "runs in the vLLM virtualenv (`make bench-serve`)"}
FULL_REQUIRES = "vllm"

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HF_PYTHON = os.environ.get("FLYTHINKER_HF_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
USER_MESSAGES = [
    "I failed my exam today and I feel terrible.", "Can you help me plan my week? I have three deadlines.",
    "My friend stopped answering my messages.", "How do I start running when I hate running?",
    "I got the job offer but I am scared to move cities.", "I can't sleep before presentations.",
    "What should I cook tonight with rice, eggs and spinach?", "My manager criticised my report in front of everyone.",
]


# ----------------------------------------------------------------------------------------- HF side (main venv)
def side_build(work: Path, model: str, lam: float, k: int = 0) -> None:
    """work/pair (flythinker checkpoint + tokenizer), work/generator (generator alone + tokenizer), prompts.json;
    with `k`, work/pair_k<k>: the generator with a reasoner of its first k layers (flythinker.truncate)."""
    import torch

    from flythinker import FlyThinkerForCausalLM
    from flythinker.hub import load_pretrained
    from flythinker.truncate import truncated_reasoner

    gen, tok = load_pretrained(model)
    rsn, _ = load_pretrained(model)
    pair = FlyThinkerForCausalLM.from_pair(gen.float(), rsn.float(), fusion_lambda=lam)
    subs = [("pair", pair), ("generator", gen)]
    if k:
        subs.append((f"pair_k{k}", FlyThinkerForCausalLM.from_pair(gen, truncated_reasoner(rsn, k), fusion_lambda=lam)))
    for sub, m in subs:
        if (work / sub / "config.json").exists():
            continue
        m.save_pretrained(work / sub)
        tok.save_pretrained(work / sub)
    prompts = []
    for i in range(32):  # 32 chat prompts of different lengths (1-3 user turns)
        turns = [USER_MESSAGES[(i + k) % len(USER_MESSAGES)] for k in range(1 + i % 3)]
        msgs = [{"role": "user", "content": " ".join(turns)}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompts.append(list(ids["input_ids"]))
    (work / "prompts.json").write_text(json.dumps(prompts))
    del torch


def side_hf(work: Path, new_tokens: int, batch: int, out: Path) -> None:
    """HF generate over the pair in batches of `batch` (left-padded, greedy); TTFT from a logits-processor hook."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from flythinker import FlyThinkerForCausalLM

    prompts = json.loads((work / "prompts.json").read_text())
    model = FlyThinkerForCausalLM.from_pretrained(work / "pair", dtype=torch.float32).eval()

    class FirstToken(LogitsProcessor):
        def __init__(self):
            self.t = None

        def __call__(self, input_ids, scores):
            if self.t is None:
                self.t = time.perf_counter()
            return scores

    t0 = time.perf_counter()
    ttft, tokens, end = [], [], []
    for s in range(0, len(prompts), batch):
        rows = prompts[s:s + batch]
        L = max(map(len, rows))
        ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
        hook = FirstToken()
        with torch.no_grad():
            res = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([hook]))
        done = time.perf_counter() - t0
        ttft += [hook.t - t0] * len(rows)
        end += [done] * len(rows)
        tokens += res[:, L:].tolist()
    wall = time.perf_counter() - t0
    out.write_text(json.dumps({"ttft_s": ttft, "end_s": end, "wall_s": wall, "tokens": tokens,
                               "torch_threads": torch.get_num_threads()}))


# ----------------------------------------------------------------------------------------- vLLM side
def start_server(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_for_health(proc, port, log, 900, poll_s=1)
    return proc


def load(port: int, prompts: list[list[int]], new_tokens: int) -> dict:
    """All requests at once, streamed /v1/completions on token ids; per-request TTFT and finish time."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=3600)
    n = len(prompts)
    ttft, end, tokens = [None] * n, [None] * n, [None] * n
    barrier = threading.Barrier(n + 1)
    t0_box: list[float] = []

    def one(i: int) -> None:
        barrier.wait()
        stream = client.completions.create(model="m", prompt=prompts[i], max_tokens=new_tokens, temperature=0.0,
                                           stream=True, extra_body={"min_tokens": new_tokens,
                                                                    "return_token_ids": True})
        ids = []
        for chunk in stream:
            if ttft[i] is None and chunk.choices and chunk.choices[0].text is not None:
                ttft[i] = time.perf_counter() - t0_box[0]
            if chunk.choices and getattr(chunk.choices[0], "token_ids", None):
                ids += list(chunk.choices[0].token_ids)
        end[i] = time.perf_counter() - t0_box[0]
        tokens[i] = ids

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    t0_box.append(time.perf_counter())
    barrier.wait()
    for t in threads:
        t.join()
    return {"ttft_s": ttft, "end_s": end, "wall_s": max(end), "tokens": tokens}


def summarise(res: dict, new_tokens: int) -> dict:
    n_tok = sum(len(t) for t in res["tokens"])
    ttft = sorted(res["ttft_s"])
    return {"output_tokens": n_tok, "expected_tokens": new_tokens * len(res["tokens"]), "wall_s": res["wall_s"],
            "tokens_per_s": n_tok / res["wall_s"], "ttft_mean_s": statistics.mean(ttft),
            "ttft_p50_s": ttft[len(ttft) // 2], "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
            "ttft_max_s": ttft[-1]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["systems"])
    s = result["systems"]
    labels = [n.replace(" (", "\n(").replace(" alone", "\nalone") for n in names]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = ["#4c72b0", "#c44e52", "#dd8452", "#55a868"][:len(names)]
    ax[0].bar(labels, [s[k]["tokens_per_s"] for k in names], color=colors)
    for i, k in enumerate(names):
        ax[0].text(i, s[k]["tokens_per_s"], f"{s[k]['tokens_per_s']:.1f}", ha="center", va="bottom", fontsize=8)
    ax[0].set_ylabel("output tokens / s")
    ax[0].set_title(f"{result['requests']} concurrent requests x {result['new_tokens']} tokens")
    ax[1].boxplot([result["raw"][k]["ttft_s"] for k in names], tick_labels=labels)
    ax[1].set_ylabel("time to first token (s)")
    ax[1].set_title("TTFT per request")
    for a in ax:
        a.tick_params(axis="x", labelsize=8)
    loads = [result["machine"]["load_before"][0]] + [v[0] for v in result["machine"]["load_after_phase"].values()]
    fig.suptitle(f"{result['model']} pair (fp32, lambda {result['fusion_lambda']}), CPU "
                 f"({result['machine']['cores']} cores, load average {min(loads):.0f}-{max(loads):.0f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _write_png(result: dict, png: Path) -> None:
    tmp = png.with_suffix(".tmp.png")
    plot(result, tmp)
    os.replace(tmp, png)


def hf_side(*args: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    subprocess.run([HF_PYTHON, __file__, *args], check=True, env=env, cwd=ROOT)


def run_vllm(work: Path, sub: str, pair: bool, prompts, args) -> dict:
    port = free_port()
    common = ["--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--served-model-name", "m"]
    if pair:  # `flythinker serve` (the command users run); its own flags + the rest through --vllm-args
        cmd = [sys.executable, "-m", "flythinker.cli", "serve", str(work / sub), "--kv-cache-gib", "2", *common,
               "--vllm-args", "--max-num-seqs 32"]
    else:  # the same vLLM server on the plain generator checkpoint (`vllm serve`, same settings)
        cmd = [sys.executable, "-m", "flythinker.serving.launch", "serve", str(work / sub), "--host", "127.0.0.1",
               "--enforce-eager", "--kv-cache-memory-bytes", str(2 << 30), "--max-num-seqs", "32", *common]
    proc = start_server(cmd, port, work / f"server_{sub}.log")
    try:
        load(port, prompts[:2], 4)  # warm-up (first-request allocations), not timed
        return load(port, prompts, args.new_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def _hf_phase(a: argparse.Namespace) -> dict:
    hf_side("--side", "hf", "--work", str(a.work), "--new-tokens", str(a.new_tokens), "--hf-batch", str(a.hf_batch))
    return json.loads((a.work / "hf.json").read_text())


def _ratios(systems: dict, hf_key: str) -> dict:
    """Each served pair's tokens/s and mean TTFT over the generator alone's and the HF loop's (those measured)."""
    out = {}
    for name, row in systems.items():
        if not name.startswith("vllm pair"):
            continue
        tag = name.removeprefix("vllm ").replace(", ", " ").replace(" ", "_")
        for base, label in (("vllm generator alone", "generator_alone"), (hf_key, "hf_loop")):
            if base in systems:
                out[f"{tag}_tokens_per_s_vs_{label}"] = row["tokens_per_s"] / systems[base]["tokens_per_s"]
                out[f"{tag}_ttft_mean_vs_{label}"] = row["ttft_mean_s"] / systems[base]["ttft_mean_s"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=("build", "hf"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "flythinker_serve_bench")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--hf-batch", type=int, default=8, help="batch size of the HF generate loop")
    p.add_argument("--out", type=Path, default=RESULTS / "serve_throughput.json")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    p.add_argument("--reasoner-layers", type=int, default=0,
                   help="also serve a pair whose reasoner is the generator's first K layers (0: none)")
    p.add_argument("--systems", default="pair,generator,hf",
                   help="comma list of pair, pair-k (needs --reasoner-layers), generator, hf (default: %(default)s)")
    a = p.parse_args(argv)
    if a.plot_only:
        return _write_png(json.loads(a.out.read_text()), a.out.with_suffix(".png"))
    if a.side == "build":
        return side_build(a.work, a.model, a.lam, a.reasoner_layers)
    if a.side == "hf":
        return side_hf(a.work, a.new_tokens, a.hf_batch, a.work / "hf.json")
    wanted = a.systems.split(",")
    if "pair-k" in wanted and not a.reasoner_layers:
        p.error("--systems pair-k needs --reasoner-layers K")
    a.work.mkdir(parents=True, exist_ok=True)
    k_sub = f"pair_k{a.reasoner_layers}"
    if not (a.work / "prompts.json").exists() or (a.reasoner_layers and not (a.work / k_sub).exists()):
        hf_side("--side", "build", "--work", str(a.work), "--model", a.model, "--lam", str(a.lam),
                "--reasoner-layers", str(a.reasoner_layers))
    prompts = json.loads((a.work / "prompts.json").read_text())
    load_before = os.getloadavg()
    raw, phase_load = {}, {}
    t = time.time()
    hf_key = f"HF generate pair (batches of {a.hf_batch})"
    phases = {"pair": ("vllm pair", lambda: run_vllm(a.work, "pair", True, prompts, a)),
              "pair-k": (f"vllm pair, {a.reasoner_layers}-layer reasoner",
                         lambda: run_vllm(a.work, k_sub, True, prompts, a)),
              "generator": ("vllm generator alone", lambda: run_vllm(a.work, "generator", False, prompts, a)),
              "hf": (hf_key, lambda: _hf_phase(a))}
    for key in wanted:
        name, fn = phases[key]
        raw[name] = fn()
        phase_load[name] = os.getloadavg()
    systems = {k: summarise(v, a.new_tokens) for k, v in raw.items()}
    result = {
        "benchmark": "serve_throughput", "model": a.model, "fusion_lambda": a.lam, "requests": len(prompts),
        "new_tokens": a.new_tokens, "prompt_tokens": [len(x) for x in prompts], "systems": systems,
        "ratios": _ratios(systems, hf_key),
        "vllm_pair_equals_hf_pair_requests": (sum(x == y for x, y in zip(raw["vllm pair"]["tokens"],
                                                                         raw[hf_key]["tokens"]))
                                              if "vllm pair" in raw and hf_key in raw else None),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "load_before": load_before,
                    "load_after_phase": phase_load, "load_after": os.getloadavg(),
                    "hf_torch_threads": raw[hf_key].get("torch_threads") if hf_key in raw else None},
        "total_wall_s": time.time() - t, "raw": raw,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, a.out)
    _write_png(result, a.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("systems", "ratios", "vllm_pair_equals_hf_pair_requests")}, indent=1))


if __name__ == "__main__":
    main()
