"""Reasoner prompt reuse in GRPO at SmolLM2 scale: the same steps with ``reuse_reasoner_prompts`` off and on (CPU).

    .venv/bin/python -m benchmarks.grpo_prompt_reuse                                   # the recorded run
    .venv/bin/python -m benchmarks.grpo_prompt_reuse --steps 1 --group 2 --max-completion 8 \\
        --out /tmp/grpo_prompt_reuse                                                    # smoke

Pair: the shipped pair ``smollm2-135m-persona-empathy`` (30-layer SmolLM2-135M reasoner and generator) with only its
fusion projection trained (``flythinker.rl.trainer.train_only(pair, ["fusion"])``: the reasoner is frozen, so reuse
is valid). Split-context rows of ``flythinker.persona.make_persona_empathy()``'s train split
(``flythinker.rl.grpo_rows``), reward :class:`flythinker.rl.TraitReward`, ``beta = 0``. Both runs are made in one
process, each on a freshly loaded pair, with the same seed and settings (by default: 3 steps, 2 prompts x group 6,
48 completion tokens); the run with reuse on goes first, so a first-run cost (warm caches, allocator) counts against
reuse, not for it.

Measured per run and step: wall time, the reasoner positions the policy's reasoner processed (a forward pre-hook
on its decoder, as benchmarks/grpo_strategy.py counts them), the loss, the mean reward and completion length; per
run the trainer's ``prompt_reuse.stats``. Reported: off/on ratios of seconds and positions per step (all steps,
and without step 1), and whether step 1 matched: the max abs difference of its loss, its rewards, and the share of
its sampled completions that are identical (the same seed samples the same completions only while the logits agree
bit for bit; the log-probs are exact on the tests' tiny pair, not promised bit-equal at this size). GRPO's loss at
step 1 is ~0 by construction (on-policy, beta 0: a group's advantages sum to zero), so the step's gradient norm and
the trained projection after the last step (max abs difference between the runs) are the telling checks. Wall times and
os.getloadavg() at start and end. Results: benchmarks/results/grpo_prompt_reuse.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "two GRPO runs of a 135M pair (~10 min on 2 CPU cores)"}

RESULTS = Path(__file__).resolve().parent / "results"
PAIR = "smollm2-135m-persona-empathy"


class RecordingTraitReward:
    """:class:`flythinker.rl.TraitReward`, keeping each call's completions and rewards (one call per step)."""

    __name__ = "trait"

    def __init__(self):
        from flythinker.rl import TraitReward

        self.inner, self.calls = TraitReward(), []

    def __call__(self, completions, **kw):
        from flythinker.rl import completion_text

        rewards = self.inner(completions, **kw)
        self.calls.append({"completions": [completion_text(c) for c in completions], "rewards": rewards})
        return rewards


def _step_meter(seen: dict):
    """A TrainerCallback keeping each step's wall time and reasoner positions (from ``seen``, a hook's counter)."""
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.positions: list[int] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t, self.p = time.perf_counter(), seen["positions"]

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t)
            self.positions.append(seen["positions"] - self.p)

    return StepMeter()


def run(args, rows, reuse: bool) -> dict:
    """One GRPO run on a freshly loaded shipped pair; what it measured."""
    from datasets import Dataset

    from flythinker import FlyThinkerForCausalLM
    from flythinker.hub import load_tokenizer
    from flythinker.rl.trainer import FlyThinkerGRPOTrainer, GRPOConfig, train_only

    torch.manual_seed(args.seed)
    pair, tok = FlyThinkerForCausalLM.from_pretrained(PAIR), load_tokenizer(PAIR)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    n_trainable = train_only(pair, ["fusion"])
    cfg = GRPOConfig(output_dir=str(Path(args.out).with_suffix(".trainer")),
                     per_device_train_batch_size=args.group * args.prompts_per_step, num_generations=args.group,
                     max_completion_length=args.max_completion, max_steps=args.steps, learning_rate=args.lr,
                     beta=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                     temperature=1.0, seed=args.seed, gradient_checkpointing=False, disable_tqdm=True)
    seen = {"positions": 0}
    meter = _step_meter(seen)
    reward = RecordingTraitReward()
    trainer = FlyThinkerGRPOTrainer(model=pair, reward_funcs=[reward], args=cfg, train_dataset=Dataset.from_list(rows),
                                    processing_class=tok, callbacks=[meter], reuse_reasoner_prompts=reuse)
    hook = pair.reasoner.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("positions", seen["positions"] + kw["input_ids"].numel()),
        with_kwargs=True)
    t = time.time()
    try:
        trainer.train()
    finally:
        hook.remove()
    t_train = time.time() - t
    logs = {h["step"]: h for h in trainer.state.log_history if "reward" in h}
    steps = [{"step": i + 1, "seconds": s, "reasoner_positions": p, "loss": logs.get(i + 1, {}).get("loss"),
              "grad_norm": logs.get(i + 1, {}).get("grad_norm"), "reward": logs.get(i + 1, {}).get("reward"),
              "completion_tokens": logs.get(i + 1, {}).get("completions/mean_length")}
             for i, (s, p) in enumerate(zip(meter.seconds, meter.positions))]
    print(f"reuse {'on' if reuse else 'off'}: {trainer.reasoner_reuse_reason}; "
          + ", ".join(f"step {s['step']} {s['seconds']:.1f} s {s['reasoner_positions']} positions" for s in steps),
          flush=True)
    return {"reuse": trainer.reasoner_reuse, "why": trainer.reasoner_reuse_reason, "n_trainable": n_trainable,
            "stats": vars(trainer.prompt_reuse.stats) if trainer.prompt_reuse is not None else None,
            "train_s": t_train, "steps": steps, "step1_sampled": reward.calls[0] if reward.calls else None,
            "_projection": pair.latent_proj.weight.detach().clone()}  # the trained projection (not written out)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def compare(off: dict, on: dict) -> dict:
    def ratio(key: str, skip_first: bool) -> float | None:
        a = _mean([s[key] for s in off["steps"][int(skip_first):]])
        b = _mean([s[key] for s in on["steps"][int(skip_first):]])
        return a / b if a is not None and b else None

    out = {"seconds_per_step_off_over_on": ratio("seconds", False),
           "seconds_per_step_off_over_on_without_step1": ratio("seconds", True),
           "positions_per_step_off_over_on": ratio("reasoner_positions", False)}
    s_off, s_on = off["steps"][0] if off["steps"] else {}, on["steps"][0] if on["steps"] else {}
    loss_off, loss_on = s_off.get("loss"), s_on.get("loss")
    out["step1_loss"] = {"off": loss_off, "on": loss_on,
                         "max_abs_diff": abs(loss_off - loss_on) if None not in (loss_off, loss_on) else None}
    g_off, g_on = s_off.get("grad_norm"), s_on.get("grad_norm")
    out["step1_grad_norm"] = {"off": g_off, "on": g_on,
                              "abs_diff": abs(g_off - g_on) if None not in (g_off, g_on) else None}
    out["trained_projection_max_abs_diff"] = float((off["_projection"] - on["_projection"]).abs().max())
    a, b = off["step1_sampled"], on["step1_sampled"]
    if a and b:
        same = [x == y for x, y in zip(a["completions"], b["completions"])]
        out["step1_same_completions"] = f"{sum(same)}/{len(same)}"
        out["step1_rewards_max_abs_diff"] = max(abs(x - y) for x, y in zip(a["rewards"], b["rewards"]))
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    runs = result["runs"]
    n = max(len(runs["off"]["steps"]), len(runs["on"]["steps"]))
    for ax, key, lab in ((a, "seconds", "seconds per step"), (b, "reasoner_positions", "reasoner positions per step")):
        for off, name in ((-0.2, "off"), (0.2, "on")):
            steps = runs[name]["steps"]
            ax.bar([s["step"] + off for s in steps], [s[key] for s in steps], width=0.4, label=f"reuse {name}")
        ax.set_xticks(list(range(1, n + 1)))
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(lab)
        ax.legend(fontsize=8)
    c = result["comparison"]
    sec = c["seconds_per_step_off_over_on"]
    pos = c["positions_per_step_off_over_on"]
    a.set_title(f"off/on: {sec:.2f}x" if sec else "seconds per step")
    b.set_title(f"off/on: {pos:.2f}x" if pos else "reasoner positions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--group", type=int, default=6, help="num_generations (group size)")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-completion", type=int, default=48)
    p.add_argument("--max-reasoner-tokens", type=int, default=160, help="the shipped pair's recipe")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=("on,off", "off,on"), default="on,off", help="which run goes first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "grpo_prompt_reuse"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from flythinker.hub import atomic_write_json, load_tokenizer
    from flythinker.persona import make_persona_empathy
    from flythinker.rl import grpo_rows

    t0, load_start = time.time(), os.getloadavg()
    rows = grpo_rows(make_persona_empathy()["train"], load_tokenizer(PAIR), mode="split",
                     max_reasoner_tokens=args.max_reasoner_tokens)
    runs = {}
    for name in args.order.split(","):
        runs[name] = run(args, rows, reuse=name == "on")
    result = {
        "setup": vars(args) | {"pair": f"the shipped pair {PAIR}, only its fusion projection trained "
                                       f"({runs['on']['n_trainable']} parameters)", "context": "split",
                               "reward": "TraitReward", "beta": 0.0, "threads": torch.get_num_threads(),
                               "mean_reasoner_prompt_tokens": _mean([len(r["reasoner_prompt_ids"]) for r in rows]),
                               "trl": __import__("trl").__version__},
        "runs": {k: {n: v for n, v in r.items() if n != "_projection"} for k, r in runs.items()},
        "comparison": compare(runs["off"], runs["on"]),
        "wall_s": {"total": time.time() - t0, "off": runs["off"]["train_s"], "on": runs["on"]["train_s"]},
        "loadavg": {"start": load_start, "end": os.getloadavg()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    print(f"{result['comparison']}; total {result['wall_s']['total']:.0f} s -> {out.with_suffix('.json')}",
          flush=True)
    return result


if __name__ == "__main__":
    main()
