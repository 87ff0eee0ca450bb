"""Our dense retriever (frozen SmolLM2-135M-Instruct + a trained projection head) against BM25 on AlpsBench Task 3.

    .venv/bin/python -m benchmarks.alpsbench_task3_dense --data /work/data/alpsbench/annotation

Held-out sessions: those ``session_split`` calls ``test`` (all of them, 419 of 2,272); the head trains on the
``train`` sessions' Task 3 pairs (one in ten of them kept for validation), and the variants with Task 4 also on
those sessions' Task 4 queries. Pools at 100/300/500/700/1000 distractors are :func:`candidate_pool`'s with the
BM25 benchmark's bank (all sessions' verified memories) and seed, and every ranker -- BM25 (the baseline recipe),
the untrained cosine of frozen features, each trained head, and the validation-chosen head with a BM25 hybrid
-- is scored on the same pools, so ours - BM25 is a paired difference (bootstrap 95% CI over sessions). The head
and the hybrid's weight are chosen on validation pools, never on the held-out sessions. The frozen model embeds
every text once (timed), and the features are kept in a safetensors cache under the flythinker cache folder, so
a rerun skips that phase. ``--max-sessions N`` (smoke runs) evaluates N held-out sessions and trains on N.
Results: benchmarks/results/alpsbench_task3_dense.{json,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks._common import write_json

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "a retrieval-quality benchmark on a local AlpsBench copy (--data) that embeds ~9k texts"}

RESULTS = Path(__file__).resolve().parent / "results"
VAL_LEVEL = 1000  # validation pools (choosing the head and the hybrid weight) at the hardest level


def variants(layers: tuple[int, ...], task4: bool = True) -> dict[str, tuple]:
    """name -> (FeatureSpec, with_task4): all layers with mean and last-token pooling on Task 3 pairs, and with
    ``task4`` the same plus Task 4 pairs, and mean pooling only with Task 4 pairs."""
    from flythinker.memory.dense_retriever import FeatureSpec

    both, mean = FeatureSpec(layers), FeatureSpec(layers, ("mean",))
    if not task4:
        return {"dense_t3": (both, False), "dense_t3_mean": (mean, False)}
    return {"dense_t3": (both, False), "dense_t3t4": (both, True), "dense_t3t4_mean": (mean, True)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(int(n) for n in report["levels"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in report["rankers"]:
        acc = [report["levels"][str(n)][name]["accuracy"] for n in levels]
        ax.plot(levels, [a["mean"] for a in acc], "-o", label=name, lw=2.5 if name == report["ours"] else 1.2)
        ax.fill_between(levels, [a["ci95"][0] for a in acc], [a["ci95"][1] for a in acc], alpha=0.15)
    ax.set_xlabel("distractor memories")
    ax.set_ylabel("strict retrieval accuracy")
    ax.set_title(f"AlpsBench Task 3, held-out sessions (n={report['n_test']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the annotation packets folder")
    ap.add_argument("--max-sessions", type=int, default=0, help="smoke runs: at most N test and N train sessions")
    ap.add_argument("--levels", default="100,300,500,700,1000", help="distractor levels (comma-separated)")
    ap.add_argument("--seed", type=int, default=0, help="pool seed (the BM25 benchmark's is 0)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="frozen model: short name or local folder")
    ap.add_argument("--layers", default="", help="hidden-state indices, comma-separated (default: thirds)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="where the frozen model runs (cpu, cuda)")
    ap.add_argument("--no-task4", action="store_true", help="train on Task 3 pairs only (embeds ~2k fewer queries)")
    ap.add_argument("--cache", default="auto", help="feature cache file, 'auto' (cache folder) or 'none'")
    ap.add_argument("--save", default="", help="save the chosen dual encoder (safetensors) to this folder")
    ap.add_argument("--out", default=str(RESULTS / "alpsbench_task3_dense.json"))
    return ap.parse_args()


@contextlib.contextmanager
def phase(timings: dict, name: str) -> Iterator[None]:
    """Record the block's wall and CPU seconds (this process) as ``timings[name]``."""
    wall, cpu = time.time(), time.process_time()
    yield
    timings[name] = {"wall_s": time.time() - wall, "cpu_s": time.process_time() - cpu}


def _encoder(args):
    from flythinker.hub import cache_dir, load_pretrained
    from flythinker.memory.dense_retriever import EncoderSpec, FrozenEncoder

    model, tok = load_pretrained(args.model)
    model.to(args.device)
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    enc = FrozenEncoder(model, tok, EncoderSpec(model=args.model, layers=layers), batch_size=args.batch_size)
    cache = None if args.cache == "none" else Path(args.cache) if args.cache != "auto" else \
        cache_dir() / "alpsbench_dense" / f"{enc.spec.key()}.safetensors"
    loaded = enc.load_cache(cache) if cache is not None and cache.is_file() else 0
    return enc, cache, loaded


def _data(args) -> tuple:
    """(packets, splits, test pools by level, validation pools at VAL_LEVEL)."""
    from flythinker.alpsbench import iter_packets, memory_bank
    from flythinker.alpsbench.data import session_split
    from flythinker.alpsbench.dense import pools_by_level, split_sessions

    packets = list(iter_packets(args.data))
    splits = split_sessions(packets, args.max_sessions or None, args.seed)
    pools = pools_by_level(splits.test, memory_bank(packets), [int(x) for x in args.levels.split(",")], args.seed)
    train_bank = memory_bank([p for p in packets if session_split(p.session_id) == "train"])
    val_pools = pools_by_level(splits.val, train_bank, [VAL_LEVEL], args.seed)[VAL_LEVEL]
    return packets, splits, pools, val_pools


def _embed(enc, splits, pools, val_pools, args, cache, loaded) -> dict:
    """Every text the run needs through the frozen model once (the cache is rewritten when anything was new)."""
    from flythinker.alpsbench import memory_bank
    from flythinker.alpsbench.dense import embed_texts, training_pairs

    pairs = training_pairs(splits.train + splits.val, with_task4=not args.no_task4)
    memories = [p.memory for p in pairs] + [str(m.get("value") or "") for _, m in memory_bank(splits.train)]
    memories += [str(c.get("value") or "") for pl in [*pools.values(), val_pools] for pool in pl for c in pool]
    emb = embed_texts(enc, [p.query for p in pairs] + [p.task3.query for p in splits.test], memories)
    if cache is not None and emb["texts_encoded"]:
        enc.save_cache(cache)
    emb.update(cache=str(cache), cache_loaded=loaded,
               tokens_per_s=emb["tokens_encoded"] / emb["model_seconds"] if emb["model_seconds"] else None)
    return emb


def _train(enc, splits, val_pools, args) -> tuple[dict, dict, str]:
    from flythinker.alpsbench.dense import fit_head, frozen_baseline, tune_bm25_weight
    from flythinker.memory.dense_training import TrainConfig

    duals, info = {}, {}
    specs = variants(enc.layers, not args.no_task4)
    for name, (spec, with_t4) in specs.items():
        duals[name], hist = fit_head(enc, spec, splits, with_task4=with_t4, config=TrainConfig(epochs=args.epochs))
        val_acc = tune_bm25_weight(duals[name], splits.val, val_pools, (0.0,))[1]["0.0"]
        info[name] = {"features": {"layers": list(spec.layers), "pooling": list(spec.pooling)}, "task4": with_t4,
                      **hist, "val_pool_accuracy": val_acc}
        print(f"{name}: validation accuracy at {VAL_LEVEL} {val_acc:.3f}, best epoch {hist['best_epoch']}, "
              f"{hist['seconds']:.0f} s", flush=True)
    ours = max(info, key=lambda n: info[n]["val_pool_accuracy"])
    weight, grid = tune_bm25_weight(duals[ours], splits.val, val_pools)
    duals["frozen"] = frozen_baseline(enc, specs[ours][0], splits)
    duals["hybrid"] = duals[ours].with_bm25_weight(weight)
    info["hybrid"] = {"head": ours, "bm25_weight": weight, "val_pool_accuracy_by_weight": grid}
    return duals, info, ours


def _print(report: dict) -> None:
    ours = report["ours"]
    for n, row in report["levels"].items():
        d = report["paired_vs_bm25"][n]
        print(f"d{n:<5s} " + "  ".join(f"{k} {v['accuracy']['mean']:.3f}" for k, v in row.items())
              + f"  | {ours}-bm25 {d[ours]['mean']:+.3f} [{d[ours]['ci95'][0]:+.3f}, {d[ours]['ci95'][1]:+.3f}]"
              + f"  hybrid-bm25 {d['hybrid']['mean']:+.3f}")


def main() -> None:
    import torch

    from flythinker.alpsbench.dense import compare_rankers, dense_ranker, summarize
    from flythinker.alpsbench.evaluate import bm25_ranker

    args = _args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, load0, timings = time.time(), os.getloadavg(), {}
    with phase(timings, "data"):
        packets, splits, pools, val_pools = _data(args)
    print(f"{len(splits.train)} train / {len(splits.val)} validation / {len(splits.test)} test sessions", flush=True)
    with phase(timings, "model_load"):
        enc, cache, loaded = _encoder(args)
    with phase(timings, "embedding"):
        emb = _embed(enc, splits, pools, val_pools, args, cache, loaded)
    print(f"embedding: {emb}", flush=True)
    with phase(timings, "training"):
        duals, train_info, ours = _train(enc, splits, val_pools, args)
    with phase(timings, "scoring"):
        rankers = {"bm25": bm25_ranker, **{name: dense_ranker(d) for name, d in duals.items()}}
        summary = summarize(compare_rankers(splits.test, pools, rankers))
    if args.save:
        duals[ours].save(args.save)
    report = {
        "what": "frozen SmolLM2-135M-Instruct features + a contrastively trained linear head (dense), vs BM25 "
                "(bm25s robertson, the BM25 benchmark's recipe) on identical Task 3 pools of held-out sessions",
        "ours": ours, "rankers": list(rankers), "n_test": len(splits.test), "n_train": len(splits.train),
        "n_val": len(splits.val), "bank_sessions": len(packets), "seed": args.seed, "max_sessions": args.max_sessions,
        "model": args.model, "device": args.device, "task4": not args.no_task4,
        "encoder": {"layers": list(enc.layers), "spec_key": enc.spec.key(), "query_template": enc.spec.query_template,
                    "memory_template": enc.spec.memory_template},
        **summary, "training": train_info, "embedding": emb, "timings": timings, "threads": torch.get_num_threads(),
        "wall_s": time.time() - t0, "loadavg_start": load0, "loadavg_end": os.getloadavg(), "data": str(args.data),
    }
    out = Path(args.out)
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    _print(report)
    print(f"{report['wall_s']:.0f} s ({timings}) -> {out}")


if __name__ == "__main__":
    main()
