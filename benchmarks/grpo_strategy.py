"""GRPO with the rule-based trait reward on a SmolLM2-135M-Instruct pair, split context, LoRA (CPU, ~40 min).

    .venv/bin/python -m benchmarks.grpo_strategy                  # the recorded run
    .venv/bin/python -m benchmarks.grpo_strategy --steps 2 --n-test 8   # smoke

Pair: generator SmolLM2-135M-Instruct, reasoner the first 8 of its 30 layers (+ final norm) from the same
checkpoint (the offline model; no personalised pair had landed; the full reasoner was ~4x slower per step),
``fusion_lambda`` small so the pretrained generator still writes English (docs/fusion.md: lambda 0.5 doubles its loss
before training). Split context: the reasoner reads the user's history + query, the generator the query only.
LoRA (r=8, q/v projections of both models) through TRL's ``peft_config``. Reward: :class:`flythinker.rl.TraitReward`
(fraction of the 3 hidden traits the rule-based classifier reads in the completion).

Measured: held-out (test-split users) strategy accuracy before and after, greedy decoding, same records, with
bootstrap 95% CIs and a paired bootstrap CI of the difference; the per-step mean reward (the curve); wall time;
os.getloadavg() at start and end. Note what "strategy accuracy" can rise by: a trait-blind policy scores 0.5 per
dimension at best (the traits are balanced), so a rise up to ~0.5 need not mean personalisation; the JSON records
per-dimension numbers to tell the two apart. Results: benchmarks/results/grpo_strategy.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "a GRPO training run (~40 min)"}

RESULTS = Path(__file__).resolve().parent / "results"


def truncated(model, n_layers: int):
    """The first ``n_layers`` decoder layers of ``model`` (+ its final norm): a smaller reasoner from the same
    checkpoint (the CPU budget: the full 30-layer reasoner made one GRPO step ~4x slower)."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    if n_layers >= cfg.num_hidden_layers:
        return model
    cfg.num_hidden_layers = n_layers
    small = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    missing, _ = small.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"truncated reasoner: weights missing for {missing[:3]}")
    return small.eval()


def build_pair(fusion_lambda: float, reasoner_layers: int = 30):
    from flythinker import FlyThinkerForCausalLM
    from flythinker.hub import load_pretrained

    gen, tok = load_pretrained("smollm2-135m-instruct")
    rsn, _ = load_pretrained("smollm2-135m-instruct", with_tokenizer=False)
    rsn = truncated(rsn, reasoner_layers)
    pair = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=fusion_lambda, parallel="off")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return pair, tok


def shipped_pair():
    """The shipped personalised pair and its tokenizer (offline, by name)."""
    from flythinker import FlyThinkerForCausalLM
    from flythinker.hub import load_tokenizer

    name = "smollm2-135m-persona-empathy"
    pair, tok = FlyThinkerForCausalLM.from_pretrained(name), load_tokenizer(name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return pair, tok


def evaluate(pair, tok, rows, max_new_tokens: int, batch_size: int) -> tuple[dict, list[str]]:
    from flythinker.rl import generate_responses, strategy_report

    texts = generate_responses(pair, tok, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return strategy_report(texts, rows), texts


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    curve = result["reward_curve"]
    a.plot([c["step"] for c in curve], [c["reward"] for c in curve], marker=".", label="mean reward (trait)")
    a.set_xlabel("GRPO step")
    a.set_ylabel("reward (fraction of traits matched)")
    a.set_title(f"reward per step ({result['wall_s']['train'] / 60:.0f} min train)")
    a.legend()
    dims = ["strategy", "length", "register", "strategy_accuracy"]
    x = range(len(dims))
    for off, key, lab in ((-0.2, "before", "before"), (0.2, "after", "after")):
        m = [result[key][d]["mean"] for d in dims]
        err = [[mm - result[key][d]["ci95"][0] for d, mm in zip(dims, m)],
               [result[key][d]["ci95"][1] - mm for d, mm in zip(dims, m)]]
        b.bar([i + off for i in x], m, width=0.4, yerr=err, capsize=3, label=lab)
    b.axhline(0.5, color="gray", ls="--", lw=1, label="trait-blind best (0.5)")
    b.set_xticks(list(x), dims)
    b.set_ylim(0, 1)
    b.set_title(f"held-out accuracy, n={result['n_test']} (95% bootstrap CI)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _time_budget(minutes: float):
    """A TrainerCallback that ends training once ``minutes`` of wall time have passed (0: never)."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            if minutes and time.time() - self.t0 > 60 * minutes:
                control.should_training_stop = True

    return TimeBudget()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--n-train-users", type=int, default=200)
    p.add_argument("--n-test", type=int, default=96)
    p.add_argument("--group", type=int, default=4, help="num_generations (group size)")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-completion", type=int, default=32)
    p.add_argument("--fusion-lambda", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--max-reasoner-tokens", type=int, default=192)
    p.add_argument("--reasoner-layers", type=int, default=8, help="first K layers of SmolLM2 as the reasoner")
    p.add_argument("--history-sessions", type=int, default=1, help="past sessions in each user's history")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-train-minutes", type=float, default=0.0,
                   help="stop training after this much wall time (0: run all --steps); the steps done are recorded")
    p.add_argument("--start", choices=("smollm2", "shipped"), default="smollm2",
                   help="smollm2: SmolLM2 generator + its first --reasoner-layers as reasoner, LoRA r=8 trained; "
                        "shipped: the shipped personalised pair, trained parts per --trainable")
    p.add_argument("--trainable", default="fusion,lora",
                   help="with --start shipped: fusion and/or lora (flythinker.rl.trainer.train_only)")
    p.add_argument("--reset-fusion", action="store_true",
                   help="with --start shipped: zero the shipped pair's learned projection first, so RL starts from "
                        "the pair at its generator (the shipped LoRA, no latent); the shipped pair itself is also "
                        "evaluated on the same users as the supervised reference")
    p.add_argument("--eval-max-new-tokens", type=int, default=None, help="default: --max-completion")
    p.add_argument("--reuse-reasoner-prompts", choices=("auto", "on", "off"), default="auto",
                   help="FlyThinkerGRPOTrainer's reuse_reasoner_prompts (auto: where valid, i.e. a frozen reasoner)")
    p.add_argument("--out", default=str(RESULTS / "grpo_strategy"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from datasets import Dataset
    from peft import LoraConfig

    from flythinker.hub import atomic_write_json
    from flythinker.persona import make_persona_empathy
    from flythinker.rl import TraitReward, grpo_rows, paired_bootstrap_diff
    from flythinker.rl.trainer import FlyThinkerGRPOTrainer, GRPOConfig

    t0 = time.time()
    load_start = os.getloadavg()
    if args.start == "shipped":
        from flythinker.rl.trainer import train_only

        pair, tok = shipped_pair()
        data = make_persona_empathy()  # the shipped pair's own data generator (held-out users in "test")
        peft = None
    else:
        pair, tok = build_pair(args.fusion_lambda, args.reasoner_layers)
        hs = (args.history_sessions, args.history_sessions)
        data = make_persona_empathy(n_users=args.n_train_users, queries_per_user=5, seed=0, history_sessions=hs)
        peft = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        n_trainable = None
    eval_tokens = args.eval_max_new_tokens or args.max_completion
    train_rows = grpo_rows(data["train"], tok, mode="split", max_reasoner_tokens=args.max_reasoner_tokens)
    test_rows = grpo_rows(data["test"], tok, mode="split", max_reasoner_tokens=args.max_reasoner_tokens)
    if args.start == "shipped":  # one query per held-out user: n_test distinct users
        first: dict[str, dict] = {}
        for rec, row in zip(data["test"], test_rows):
            first.setdefault(rec.user_id, row)
        test_rows = list(first.values())
    test_rows = test_rows[: args.n_test]
    eval_bs = 16
    supervised = None
    if args.start == "shipped":
        if args.reset_fusion:  # the supervised fusion, measured on the same users before it is zeroed
            t = time.time()
            supervised, _ = evaluate(pair, tok, test_rows, eval_tokens, eval_bs)
            supervised["seconds"] = time.time() - t
            print(f"shipped (supervised fusion): {supervised['strategy_accuracy']}", flush=True)
            with torch.no_grad():
                pair.latent_proj.weight.zero_()
        n_trainable = train_only(pair, args.trainable.split(","))
    t = time.time()
    before, before_texts = evaluate(pair, tok, test_rows, eval_tokens, eval_bs)
    t_eval0 = time.time() - t
    print(f"before: {before['strategy_accuracy']} ({t_eval0:.0f} s)", flush=True)

    bs = args.group * args.prompts_per_step
    cfg = GRPOConfig(output_dir=str(Path(args.out).with_suffix(".trainer")), per_device_train_batch_size=bs,
                     num_generations=args.group, max_completion_length=args.max_completion, max_steps=args.steps,
                     learning_rate=args.lr, beta=args.beta, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, bf16=False, temperature=1.0, disable_tqdm=False, seed=0,
                     gradient_checkpointing=False)
    trainer = FlyThinkerGRPOTrainer(model=pair, reward_funcs=[TraitReward()], args=cfg,
                                    train_dataset=Dataset.from_list(train_rows), processing_class=tok,
                                    peft_config=peft, callbacks=[_time_budget(args.max_train_minutes)],
                                    reuse_reasoner_prompts={"auto": None, "on": True, "off": False}[
                                        args.reuse_reasoner_prompts])
    print(f"reasoner prompt reuse: {trainer.reasoner_reuse} ({trainer.reasoner_reuse_reason})", flush=True)
    seen = {"positions": 0}  # positions the policy's reasoner processes during training (not the reference's)
    hook = pair.reasoner.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("positions", seen["positions"] + kw["input_ids"].numel()),
        with_kwargs=True)
    t = time.time()
    trainer.train()
    t_train = time.time() - t
    hook.remove()
    reuse_stats = vars(trainer.prompt_reuse.stats) if trainer.prompt_reuse is not None else None
    policy = trainer.model
    curve = [{"step": h["step"], "reward": h["reward"], "reward_std": h.get("reward_std"),
              "completion_len": h.get("completions/mean_length"),
              "clipped_ratio": h.get("completions/clipped_ratio"), "entropy": h.get("entropy")}
             for h in trainer.state.log_history if "reward" in h]
    t = time.time()
    after, after_texts = evaluate(policy, tok, test_rows, eval_tokens, eval_bs)
    t_eval1 = time.time() - t
    diff = paired_bootstrap_diff(before["per_record"], after["per_record"])
    result = {
        "setup": vars(args) | {"pair": "the shipped pair smollm2-135m-persona-empathy" + (
                               ", its projection zeroed before RL" if args.reset_fusion else "")
                               if args.start == "shipped"
                               else f"generator SmolLM2-135M-Instruct, reasoner its first {args.reasoner_layers} "
                                    "layers", "context": "split",
                               "trained": f"{args.trainable} ({n_trainable} parameters)" if n_trainable
                               else "LoRA r=8 alpha=16 q_proj,v_proj (both models)", "reward": "TraitReward (3 dims)",
                               "decoding_eval": "greedy", "trl": __import__("trl").__version__},
        "n_test": len(test_rows), "n_train_records": len(train_rows), "steps_done": trainer.state.global_step,
        "before": {k: v for k, v in before.items() if k != "per_record"},
        "after": {k: v for k, v in after.items() if k != "per_record"},
        "supervised_reference": None if supervised is None else {
            k: v for k, v in supervised.items() if k != "per_record"} | {
            "supervised_minus_after": dict(zip(("mean", "lo", "hi"), paired_bootstrap_diff(
                after["per_record"], supervised["per_record"])))},
        "diff_strategy_accuracy": {"mean": diff[0], "ci95": [diff[1], diff[2]]},
        "reward_curve": curve,
        "reasoner_reuse": {"on": trainer.reasoner_reuse, "why": trainer.reasoner_reuse_reason, "stats": reuse_stats,
                           "positions_per_step": seen["positions"] / max(trainer.state.global_step, 1)},
        "wall_s": {"total": time.time() - t0, "train": t_train, "eval_before": t_eval0, "eval_after": t_eval1},
        "loadavg": {"start": load_start, "end": os.getloadavg()},
        "samples": [{"record_id": r["record_id"], "traits": r["traits"], "before": b, "after": a}
                    for r, b, a in list(zip(test_rows, before_texts, after_texts))[:8]],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    print(f"after: {after['strategy_accuracy']}  diff {result['diff_strategy_accuracy']}  "
          f"train {t_train:.0f} s, total {result['wall_s']['total']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
