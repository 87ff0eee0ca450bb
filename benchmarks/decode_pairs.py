"""Decode benchmark of shared-base and truncated-reasoner pairs (`python -m benchmarks.decode --pairs`, or this module).

The real offline SmolLM2-135M-Instruct (fp32, CPU) in every variant; every row is a ratio to the generator alone
measured in the same run, variants interleaved (ABAB...) over `--reps` rounds, medians, os.getloadavg() recorded
around every run. Timing comes from a streamer: TTFT = time to the first new token, per token = median gap between
later tokens. Whole-call = wall time of the `generate()` call.

    shared     shared-base pair (rank-8 adapters on both halves, `from_shared_base`) vs the generator alone with its
               adapter merged (HF generate), batch 1 and 4; the two-copy pair with the same (peft) adapters;
               parameter bytes; greedy tokens shared == two-copy; the floor of any batched shared step: the
               merged generator alone at 2B rows in the lean loop ("gen_merged_lean_2B", `floor_2B`: its per
               token over the generator alone at B); aten ops per token (`ops_per_token`: the shared step, its
               adapters' share = it minus the same base as an r = 0 pair, the generator alone at B and 2B rows)
    twocopy    two-copy same-size pair (no adapters) parallel / sequential vs the generator alone: whole generate()
               call and TTFT, 48 new tokens, batch 1 and 4
    truncated  reasoner = the generator's first k layers (k = 4, 8, 15) and the full 30-layer pair, sequential and
               parallel, per token vs the generator alone, batch 1
    split      >= 512 tokens of history + a short query: split context (generator reads the query, reasoner reads
               history + query; k = 8 and full size) vs the generator alone reading history + query: TTFT and per
               token, batch 1 and 4
    trainmem   peak RSS of one LoRA training step (batch 4 x 128 tokens), shared base vs two copies (one fresh
               process each)

Targets: shared per token <= 1.10x, shared params <= 0.55x two-copy, truncated k=8 parallel <= 1.05x,
split k=8 TTFT <= 0.5x, two-copy parallel whole call <= 1.15x.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, peak_bytes, reset_peak, write_json  # noqa: E402
from flythinker.decode import generate_path  # noqa: E402

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "minutes per section on the real SmolLM2; decode and shipped_pair_decode cover decode "
                 "in the quick set"}

TARGETS = {"shared_over_gen_token": 1.10, "shared_params_over_twocopy": 0.55, "trunc8_parallel_over_gen_token": 1.05,
           "split8_over_gen_ttft": 0.5, "twocopy_parallel_over_gen_call": 1.15}
NEW = 48


class Stamps:
    """Streamer recording the time of every new token (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.t0, self.stamps, self.seen = time.perf_counter(), [], False

    def put(self, value: torch.Tensor) -> None:
        if self.seen:
            self.stamps.append(time.perf_counter())
        self.seen = True

    def end(self) -> None:
        pass


def timed(fn, ids: torch.Tensor, **kw) -> dict:
    """One generate call: TTFT, median per-token gap, whole-call time (ms), the loads, the new tokens."""
    st = Stamps()
    load0 = os.getloadavg()[0]
    st.t0 = t0 = time.perf_counter()
    with torch.inference_mode():
        out = fn(ids, max_new_tokens=NEW, do_sample=False, streamer=st, **kw)
    call = time.perf_counter() - t0
    gaps = [(b - a) * 1e3 for a, b in zip(st.stamps[:-1], st.stamps[1:])]
    assert out.shape[1] == ids.shape[1] + NEW, out.shape
    return {"ttft_ms": (st.stamps[0] - st.t0) * 1e3, "token_ms": statistics.median(gaps), "call_ms": call * 1e3,
            "load": [load0, os.getloadavg()[0]], "tokens": out[:, ids.shape[1]:]}


def interleave(variants: dict, inputs: dict, reps: int, tag: str) -> dict:
    """Run every variant `reps` times, interleaved; medians per variant (+ its loads) and tokens of round 0."""
    runs: dict[str, list] = {n: [] for n in variants}
    with torch.inference_mode():  # warm-up (first-call allocations, worker thread start), not counted
        for name, fn in variants.items():
            kw = dict(inputs[name])
            fn(kw.pop("ids"), max_new_tokens=4, do_sample=False, **kw)
    for r in range(reps):
        for name, fn in variants.items():
            res = timed(fn, **inputs[name])
            runs[name].append(res)
            print(f"  [{tag} r{r}] {name:22s} ttft {res['ttft_ms']:7.1f}  token {res['token_ms']:6.1f}  "
                  f"call {res['call_ms']:7.0f} ms  load {res['load'][0]:.1f}", flush=True)
    out = {}
    for name, rs in runs.items():
        out[name] = {k: statistics.median(x[k] for x in rs) for k in ("ttft_ms", "token_ms", "call_ms")}
        out[name]["load"] = [x["load"] for x in rs]
        out[name]["tokens"] = rs[0]["tokens"]
    return out


def ratios(row: dict, base: str) -> dict:
    return {n: {k: row[n][k] / row[base][k] for k in ("ttft_ms", "token_ms", "call_ms")} for n in row if n != base}


def prompt(tok, batch: int, length: int) -> torch.Tensor:
    text = ("You are a helpful assistant. The user writes long personal messages about their week, their plans, "
            "their worries and their hopes; answer with care and concrete suggestions. ") * 60
    ids = tok(text, return_tensors="pt").input_ids[0, :length]
    assert ids.numel() == length, "prompt text too short"
    return torch.stack([torch.roll(ids, shifts=7 * i) for i in range(batch)])


def load():
    from flythinker.hub import load_pretrained

    gen, tok = load_pretrained("smollm2-135m-instruct")
    gen.generation_config.eos_token_id = None  # every run makes all its tokens
    gen.generation_config.pad_token_id = 2
    return gen.eval(), tok


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 2
    return model.eval()


def merged_generator(pair) -> torch.nn.Module:
    """An independent copy of the base with the shared pair's generator adapter folded into its weights."""
    from flythinker.shared_base import SharedLoRALinear

    g = copy.deepcopy(pair.generator)
    for name, m in list(g.named_modules()):
        if isinstance(m, SharedLoRALinear):
            lin = m.base
            with torch.no_grad():
                lin.weight.add_(m.lora_B @ m.lora_A * m.scaling)
            parent, _, leaf = name.rpartition(".")
            setattr(g.get_submodule(parent), leaf, lin)
    return _no_eos(g)


def lean_generate(model):
    """The generator alone in the same lean loop as the pair's fast path (static cache, fixed-shape mask, the
    decoder + LM head per token, argmax): the like-for-like baseline of `flythinker.decode`'s per-token cost."""
    from transformers import StaticCache

    def fn(ids, attention_mask, max_new_tokens, do_sample, streamer=None):
        streamer = streamer or Stamps()
        B, P = ids.shape
        n = max_new_tokens
        cache = StaticCache(config=model.config, max_cache_len=P + n)
        mask = torch.zeros(B, P + n, dtype=torch.long)
        mask[:, :P] = attention_mask
        streamer.put(ids)
        dec = model.get_decoder()
        hidden = dec(input_ids=ids, attention_mask=mask[:, :P], cache=cache, use_cache=True).last_hidden_state
        tok = model.lm_head(hidden[:, -1]).argmax(-1)
        pos = mask[:, :P].sum(1, keepdim=True) - 1
        toks = []
        for s in range(n):
            toks.append(tok)
            streamer.put(tok)
            if s + 1 == n:
                break
            pos = pos + 1
            mask[:, P + s] = 1
            hidden = dec(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                         use_cache=True).last_hidden_state
            tok = model.lm_head(hidden[:, -1]).argmax(-1)
        return torch.cat([ids, torch.stack(toks, 1)], 1)

    return fn


def with_lean(variants: dict, inputs: dict, model, base: str) -> None:
    """Add the lean-loop generator-alone baseline ("<base>_lean") right after `base`, reading base's inputs."""
    items = list(variants.items())
    i = [k for k, _ in items].index(base) + 1
    items.insert(i, (f"{base}_lean", lean_generate(model)))
    variants.clear()
    variants.update(items)
    inputs[f"{base}_lean"] = inputs[base]


# ---------------------------------------------------------------------------------------------- sections
def section_shared(reps: int) -> dict:
    from flythinker import FlyThinkerForCausalLM
    from flythinker.shared_base import SharedBaseSpec, adapters, parameter_bytes, to_peft

    base, tok = load()
    clean = copy.deepcopy(base)
    plain = FlyThinkerForCausalLM.from_shared_base(copy.deepcopy(base), r=0, fusion_lambda=0.5).eval()  # op counts
    pair = _no_eos(FlyThinkerForCausalLM.from_shared_base(base, r=8, lora_alpha=16, fusion_lambda=0.5))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters (B != 0), so that each half differs from the base
        for half in (pair.generator, pair.reasoner):
            for a in adapters(half).values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.01)
    spec = SharedBaseSpec(r=8, lora_alpha=16)
    gen_m = merged_generator(pair)
    two = _no_eos(FlyThinkerForCausalLM.from_pair(to_peft(pair.generator, copy.deepcopy(clean), spec).base_model.model,
                                                  to_peft(pair.reasoner, clean, spec).base_model.model,
                                                  fusion_lambda=0.5))
    res = {"params_bytes": {"shared": parameter_bytes(pair), "twocopy": parameter_bytes(two),
                            "generator_alone": parameter_bytes(gen_m)}}
    res["params_bytes"]["shared_over_twocopy"] = res["params_bytes"]["shared"] / res["params_bytes"]["twocopy"]
    res["ops_per_token"] = {f"B{B}": shared_ops(pair, plain, gen_m, prompt(tok, 2 * B, 128), B) for B in (1, 4)}
    del plain
    for B in (1, 4):
        ids = prompt(tok, B, 128)
        mask = torch.ones_like(ids)
        variants = {"gen_merged": gen_m.generate, "shared": pair.generate, "twocopy_peft": two.generate}
        inputs = {n: {"ids": ids, "attention_mask": mask} for n in variants}
        with_lean(variants, inputs, gen_m, "gen_merged")
        variants["gen_merged_lean_2B"] = lean_generate(gen_m)  # the floor of a batched step of 2B rows
        ids2 = prompt(tok, 2 * B, 128)
        inputs["gen_merged_lean_2B"] = {"ids": ids2, "attention_mask": torch.ones_like(ids2)}
        row = interleave(variants, inputs, reps, f"shared B={B}")
        row["paths"] = {n: generate_path(m, ids, attention_mask=mask)
                        for n, m in (("shared", pair), ("twocopy_peft", two))}
        row["same_tokens_shared_twocopy"] = bool(torch.equal(row["shared"]["tokens"], row["twocopy_peft"]["tokens"]))
        timed_rows = {k: v for k, v in row.items() if isinstance(v, dict) and "token_ms" in v}
        row["ratios"] = ratios(timed_rows, "gen_merged")
        row["ratios_to_lean"] = ratios(timed_rows, "gen_merged_lean")
        floor = row["gen_merged_lean_2B"]["token_ms"]
        row["floor_2B"] = {"token_ms": floor, "over_gen_lean_B": floor / row["gen_merged_lean"]["token_ms"],
                           "over_gen_B": floor / row["gen_merged"]["token_ms"],
                           "shared_over_floor": row["shared"]["token_ms"] / floor}
        print(f"  [shared B={B}] generator alone at 2B={2 * B} rows (lean loop): {floor:.1f} ms/token = "
              f"{row['floor_2B']['over_gen_lean_B']:.2f}x the generator alone at B (lean loop); shared step "
              f"{row['floor_2B']['shared_over_floor']:.2f}x that floor", flush=True)
        res[f"B{B}"] = row
    return res


def shared_ops(pair, plain, gen, ids2: torch.Tensor, B: int) -> dict:
    """Aten ops of one decode step (benchmarks.opcount) at batch B: the shared pair's batched step, the same base
    as an r = 0 pair (so the adapters' share is the difference), the merged generator alone at B and 2B rows."""
    from benchmarks.opcount import lm_step_ops, pair_step_ops, total
    from flythinker.shared_base import adapters

    ids = ids2[:B]
    out = {"shared_step": total(pair_step_ops(pair, ids)), "shared_step_r0": total(pair_step_ops(plain, ids)),
           "generator_alone_B": total(lm_step_ops(gen, ids)), "generator_alone_2B": total(lm_step_ops(gen, ids2))}
    n_lin = len(adapters(pair.generator))
    out["adapters"] = out["shared_step"] - out["shared_step_r0"]
    out["adapters_per_linear"] = out["adapters"] / max(n_lin, 1)
    out["shared_over_generator_2B"] = out["shared_step"] / out["generator_alone_2B"]
    print(f"  [shared B={B}] aten ops per token: shared step {out['shared_step']} (adapters {out['adapters']}, "
          f"{out['adapters_per_linear']:.2f} per adapted linear x {n_lin}), generator alone "
          f"{out['generator_alone_B']} at B, {out['generator_alone_2B']} at 2B rows", flush=True)
    return out


def section_twocopy(reps: int, batches: tuple[int, ...] = (1, 4)) -> dict:
    from flythinker import FlyThinkerForCausalLM

    gen, tok = load()
    pair = _no_eos(FlyThinkerForCausalLM.from_pair(gen, copy.deepcopy(gen), fusion_lambda=0.5))
    # the same pair as a shared base (a model paired with itself: r = 0, one copy of the weights)
    shared = _no_eos(FlyThinkerForCausalLM.from_shared_base(copy.deepcopy(gen), r=0, fusion_lambda=0.5))
    res = {}
    for B in batches:
        ids = prompt(tok, B, 256)
        mask = torch.ones_like(ids)

        def run(mode, fast="auto"):
            def fn(i, **kw):
                return pair.generate(i, fast_path=fast, parallel=mode, **kw)
            return fn

        variants = {"gen": gen.generate, "pair_parallel": run("auto"), "pair_sequential": run("off"),
                    "pair_parallel_hf_loop": run("auto", False), "pair_shared_base": shared.generate}
        inputs = {n: {"ids": ids, "attention_mask": mask} for n in variants}
        with_lean(variants, inputs, gen, "gen")
        row = interleave(variants, inputs, reps, f"twocopy B={B}")
        row["ratios"] = ratios({k: v for k, v in row.items() if isinstance(v, dict)}, "gen")
        row["ratios_to_lean"] = ratios({k: v for k, v in row.items() if isinstance(v, dict) and k != "ratios"},
                                       "gen_lean")
        row["same_tokens"] = {n: bool(torch.equal(row[n]["tokens"], row["pair_sequential"]["tokens"]))
                              for n in ("pair_parallel", "pair_parallel_hf_loop", "pair_shared_base")}
        row["same_tokens"]["gen_lean_vs_gen"] = bool(torch.equal(row["gen"]["tokens"], row["gen_lean"]["tokens"]))
        res[f"B{B}"] = row
    return res


def section_truncated(reps: int) -> dict:
    from flythinker import FlyThinkerForCausalLM
    from flythinker.truncate import truncated_reasoner

    gen, tok = load()
    pairs = {k: _no_eos(FlyThinkerForCausalLM.from_pair(gen, truncated_reasoner(gen, k) if k < 30 else
                                                        copy.deepcopy(gen), fusion_lambda=0.5))
             for k in (4, 8, 15, 30)}
    ids = prompt(tok, 1, 256)

    def run(p, mode):
        def fn(i, **kw):
            return p.generate(i, parallel=mode, **kw)
        return fn

    variants = {"gen": gen.generate}
    for k, p in pairs.items():
        variants[f"k{k}_parallel"] = run(p, "auto")
        variants[f"k{k}_sequential"] = run(p, "off")
    inputs = {n: {"ids": ids, "attention_mask": torch.ones_like(ids)} for n in variants}
    with_lean(variants, inputs, gen, "gen")
    row = interleave(variants, inputs, reps, "truncated B=1")
    row["ratios"] = ratios({k: v for k, v in row.items() if isinstance(v, dict)}, "gen")
    row["ratios_to_lean"] = ratios({k: v for k, v in row.items() if isinstance(v, dict) and k != "ratios"},
                                   "gen_lean")
    return {"B1": row}


def section_split(reps: int, history: int = 512, query: int = 24) -> dict:
    from flythinker import FlyThinkerForCausalLM
    from flythinker.truncate import truncated_reasoner

    gen, tok = load()
    p8 = _no_eos(FlyThinkerForCausalLM.from_pair(gen, truncated_reasoner(gen, 8), fusion_lambda=0.5))
    pfull = _no_eos(FlyThinkerForCausalLM.from_pair(gen, copy.deepcopy(gen), fusion_lambda=0.5))
    pshared = _no_eos(FlyThinkerForCausalLM.from_shared_base(copy.deepcopy(gen), r=0, fusion_lambda=0.5))
    res = {"history_tokens": history, "query_tokens": query}
    for B in (1, 4):
        full = prompt(tok, B, history + query)  # history + query
        q = full[:, history:]
        ones = torch.ones_like
        split_in = {"ids": q, "attention_mask": ones(q), "reasoner_input_ids": full,
                    "reasoner_attention_mask": ones(full)}
        variants = {"gen_full_history": gen.generate, "split_k8": p8.generate, "split_full": pfull.generate,
                    "split_full_shared_base": pshared.generate, "gen_query_only": gen.generate}
        inputs = {"gen_full_history": {"ids": full, "attention_mask": ones(full)}, "split_k8": split_in,
                  "split_full": split_in, "split_full_shared_base": split_in,
                  "gen_query_only": {"ids": q, "attention_mask": ones(q)}}
        with_lean(variants, inputs, gen, "gen_full_history")
        row = interleave(variants, inputs, reps, f"split B={B}")
        row["ratios"] = ratios({k: v for k, v in row.items() if isinstance(v, dict)}, "gen_full_history")
        row["ratios_to_lean"] = ratios({k: v for k, v in row.items() if isinstance(v, dict) and k != "ratios"},
                                       "gen_full_history_lean")
        res[f"B{B}"] = row
    return res


def trainmem_worker(kind: str) -> dict:
    """Peak RSS of one LoRA training step (both halves adapted, batch 4 x 128), in this fresh process."""
    from flythinker import FlyThinkerForCausalLM
    from flythinker.shared_base import parameter_bytes
    from flythinker.training.trainable import apply_lora

    base, tok = load()
    base.train()
    if kind == "shared":
        pair = FlyThinkerForCausalLM.from_shared_base(base, r=8, lora_alpha=16, fusion_lambda=0.5).train()
    else:
        for p in base.parameters():
            p.requires_grad_(False)
        pair = FlyThinkerForCausalLM.from_pair(base, copy.deepcopy(base), fusion_lambda=0.5).train()
        apply_lora(pair, ("generator", "reasoner"), r=8, alpha=16,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    params = [p for p in pair.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = prompt(tok, 4, 128)
    from benchmarks._common import rss_bytes

    for p in pair.parameters():  # fault every weight page in (a loaded checkpoint may be mmapped)
        p.data.add_(0)
    before = rss_bytes()
    ok = reset_peak()
    t0 = time.perf_counter()
    loss = pair(ids, labels=ids).loss
    loss.backward()
    opt.step()
    peak = peak_bytes(ok)
    return {"peak_rss_bytes": peak, "rss_before_step_bytes": before, "step_peak_over_before_bytes": peak - before,
            "param_bytes": parameter_bytes(pair), "peak_reset": ok, "step_s": time.perf_counter() - t0,
            "trainable": sum(p.numel() for p in params), "loss": float(loss), "load": os.getloadavg()[0]}


def section_trainmem() -> dict:
    out = {}
    for kind in ("twocopy", "shared"):
        r = subprocess.run([sys.executable, "-m", "benchmarks.decode_pairs", "--trainmem-worker", kind],
                           capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out[kind] = res
        print(f"  [trainmem] {kind}: peak {res['peak_rss_bytes'] / 2**20:.0f} MiB, step {res['step_s']:.1f} s",
              flush=True)
    out["shared_over_twocopy"] = out["shared"]["peak_rss_bytes"] / out["twocopy"]["peak_rss_bytes"]
    out["shared_over_twocopy_step_only"] = (out["shared"]["step_peak_over_before_bytes"]
                                            / out["twocopy"]["step_peak_over_before_bytes"])
    return out


SECTIONS = {"shared": section_shared, "twocopy": section_twocopy, "truncated": section_truncated,
            "split": section_split}


def _strip(obj):
    if isinstance(obj, torch.Tensor):
        return None
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    return obj


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []  # (label, ratio, metric)
    for sec, key, base_metric in (("shared", "B1", "token_ms"), ("shared", "B4", "token_ms"),
                                  ("twocopy", "B1", "call_ms"), ("twocopy", "B4", "call_ms"),
                                  ("truncated", "B1", "token_ms"), ("split", "B1", "ttft_ms"),
                                  ("split", "B4", "ttft_ms")):
        row = results["sections"].get(sec, {}).get(key)
        if row:
            for name, r in row["ratios"].items():
                bars.append((f"{sec} {key}\n{name}", r[base_metric], base_metric))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(bars)), 4.5))
    ax.bar(range(len(bars)), [b[1] for b in bars], color=["C0" if b[2] == "token_ms" else "C1" if b[2] == "call_ms"
                                                          else "C2" for b in bars])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=75, fontsize=6)
    ax.set_ylabel("ratio to the generator alone (blue: per token, orange: whole call, green: TTFT)")
    ax.set_title(f"SmolLM2-135M, CPU, {NEW} new tokens, load {results['loadavg_start'][0]:.1f}"
                 f"->{results['loadavg_end'][0]:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", default=[*SECTIONS, "trainmem"], choices=[*SECTIONS, "trainmem"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="twocopy section: batch sizes")
    p.add_argument("--out", type=Path, default=RESULTS / "decode_pairs.json")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of every variant (default 1: two OpenMP threads per model collapse when "
                        "other jobs oversubscribe the 2 cores; the parallel pair runs its halves on 1 + 1)")
    p.add_argument("--trainmem-worker", choices=("shared", "twocopy"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.trainmem_worker:
        print(json.dumps(trainmem_worker(args.trainmem_worker)))
        return {}
    results = json.loads(args.out.read_text()) if args.out.exists() else {"sections": {}}
    results.update({"new_tokens": NEW, "reps": args.reps, "torch": torch.__version__, "threads": args.threads,
                    "cores": os.cpu_count(), "targets": TARGETS, "loadavg_start": os.getloadavg()})
    for name in args.sections:
        t0 = time.perf_counter()
        print(f"== {name} (load {os.getloadavg()})", flush=True)
        if name == "trainmem":
            res = section_trainmem()
        elif name == "twocopy":
            res = section_twocopy(args.reps, tuple(args.batches))
        else:
            res = SECTIONS[name](args.reps)
        res["wall_s"] = time.perf_counter() - t0
        res["loadavg_after"] = os.getloadavg()
        results["sections"].setdefault(name, {}).update(_strip(res))  # a rerun of some batches keeps the others
        results["loadavg_end"] = os.getloadavg()
        write_json(args.out, results)  # after every section: a killed run keeps what it measured
        plot(results, args.out.with_suffix(".png"))
        print(json.dumps(_strip({k: v.get("ratios", v) if isinstance(v, dict) else v for k, v in res.items()}),
                         indent=1), flush=True)
    return results


if __name__ == "__main__":
    main()
