"""GRPO with an empathy-judge reward served over HTTP: the judge-reward path end to end, a 135M judge (CPU).

    .venv/bin/python -m benchmarks.grpo_judge_server                                  # the recorded run
    .venv/bin/python -m benchmarks.grpo_judge_server --rules authors                  # PERM's own rules
    .venv/bin/python -m benchmarks.grpo_judge_server --steps 1 --group 2 --max-completion 8 --n-heldout 1 \\
        --out /tmp/grpo_judge_server                                                   # smoke

What runs: ``python -m flythinker.empathy.server --model smollm2-135m-instruct`` as a subprocess on a free port of
127.0.0.1 (an OpenAI-compatible server, one generate at a time; the benchmark waits for ``GET /health`` and shuts it
down at the end, also on an error); the judge reward built by the same builder ``flythinker rl --reward perm
--judge-base-url http://127.0.0.1:PORT/v1 --rules strict`` uses (:class:`flythinker.empathy.OpenAIJudgeBackend`,
generate mode, plain-response PERM rubric); a few GRPO steps of :class:`flythinker.rl.trainer.FlyThinkerGRPOTrainer`
on the shipped pair ``smollm2-135m-persona-empathy`` with only its fusion projection trained
(``train_only(pair, ["fusion"])``), split context, rows of ``flythinker.persona.make_persona_empathy()``'s train
split. Two departures from the CLI's judge, both recorded in the JSON: the HTTP timeout per request (the CLI's
client waits 60 s, and on a CPU server requests queue behind one another) and, when ``--judge-max-tokens`` is
given, the judge's output cap (the rules' own: 512 tokens under ``strict``, 1024 under ``authors``).

Recorded per step: each completion's judge reward (before and after the rules' substitutes), its failures and what
was substituted (``strict``: the group's mean, so no advantage; ``authors``/PERM: the batch mean per dimension;
a whole batch unparsed on one dimension stops PERM's rule, which the JSON records instead of stopping), the
judge's counters (score calls, parse failures, fallbacks), the server's ``GET /stats`` (requests served), the
judge's wall time and seconds per request, the group reward spread (a group whose rewards are all equal gives GRPO
nothing), the trait reward and the word count of the same completions (does the judge track either?), a few
(completion, raw judge output, parsed score) samples, and the policy's mean completion length. Before and after
training: greedy completions of a few held-out users, with the judge's reward and the trait hits. Wall times and
os.getloadavg() at start and end. Results: benchmarks/results/grpo_judge_server.{json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks._common import free_port, stop_process, wait_for_health

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "GRPO steps against a CPU judge server (~15-45 min on 2 CPU cores)"}

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
PAIR = "smollm2-135m-persona-empathy"
RAW_CHARS = 500  # judge outputs kept per sample (characters)


# ---- the server ----------------------------------------------------------------------------------------------------
def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def start_server(model: str, port: int, threads: int, log_path: Path, timeout_s: float) -> subprocess.Popen:
    """``python -m flythinker.empathy.server`` on 127.0.0.1:``port``; returns once ``GET /health`` answers."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "flythinker.empathy.server", "--model", model, "--host",
                             "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    wait_for_health(proc, port, log_path, timeout_s, what="judge server")
    return proc


# ---- the judge reward `flythinker rl` builds, with what it does recorded -----------------------------------------
def cli_judge_reward(args, base_url: str):
    """The reward `flythinker rl --reward R --judge-model M --judge-base-url URL --rules X` trains on (the
    library's :func:`flythinker.rl.judge_reward`, which the CLI calls), and the equivalent command line."""
    from flythinker.rl import judge_reward

    argv = ["--reward", args.reward, "--judge-model", args.judge_model, "--judge-base-url", base_url,
            "--rules", args.rules]
    reward = judge_reward(args.reward, args.judge_model, base_url=base_url, rules=args.rules)
    deviations = {}
    judge = reward.judge
    judge.backend.client = judge.backend.client.with_options(timeout=args.judge_timeout)
    deviations["http_timeout_s"] = {"cli": 60.0, "here": args.judge_timeout}
    if args.judge_max_tokens:
        deviations["judge_max_new_tokens"] = {"cli": judge.settings.max_new_tokens, "here": args.judge_max_tokens}
        judge.settings = dataclasses.replace(judge.settings, max_new_tokens=args.judge_max_tokens)
    return reward, "flythinker rl " + " ".join(argv), deviations


def substitution(res, given) -> str:
    """What the rules put in place of a failed judgement for one completion."""
    if res is None:
        return "rules stopped (no reward)"
    if res.reward is None:
        return "group mean (strict)" if given is not None else "none: the whole group failed (TRL adds 0)"
    if res.fallbacks:
        return "fallback for " + ",".join(res.fallbacks)
    return "none"


class RecordingJudgeReward:
    """A TRL reward function: the CLI's judge reward, unchanged, with each call's inputs, judge results, counters
    and server stats kept in ``calls`` (TRL calls it once per generation batch: once per step here)."""

    def __init__(self, reward, base_url: str, n_samples: int):
        from flythinker.rl import TraitReward

        self.reward, self.__name__ = reward, reward.__name__
        self.stats_url = base_url.removesuffix("/v1") + "/stats"
        self.n_samples, self.trait = n_samples, TraitReward()
        self.calls: list[dict] = []
        self.trainer = None
        self._last = None
        judge, inner = reward.judge, reward.judge.score

        def score(responses, contexts):  # the judge's own results, kept for the record
            t = time.perf_counter()
            res = inner(responses, contexts)
            self._last = (res, time.perf_counter() - t)
            return res

        judge.score = score

    def __call__(self, completions, prompts=None, **kw):
        from flythinker.empathy.rules import JudgeParseError
        from flythinker.rl import completion_text

        judge = self.reward.judge
        s0, c0, self._last = get_json(self.stats_url), dict(judge.stats), None
        t = time.perf_counter()
        rules_error = None
        try:
            given = self.reward(completions=completions, prompts=prompts, **kw)
        except JudgeParseError as exc:  # PERM's batch-mean rule with nothing to average: the CLI stops here
            given, rules_error = [None] * len(completions), str(exc)
        seconds = time.perf_counter() - t
        s1 = get_json(self.stats_url)
        results = self._last[0] if self._last else [None] * len(completions)
        texts = [completion_text(c) for c in completions]
        traits = self.trait(completions, traits=kw.get("traits"))
        counters = {k: judge.stats.get(k, 0) - c0.get(k, 0) for k in set(judge.stats) | set(c0)}
        served = s1["served"] - s0["served"]
        group = self.trainer.args.num_generations if self.trainer else len(completions)
        groups = [[g for g in given[i:i + group] if g is not None] for i in range(0, len(given), group)]
        spreads = [float(torch.tensor(g).std()) if len(g) > 1 else 0.0 for g in groups]
        self.calls.append({
            "step": self.trainer.state.global_step + 1 if self.trainer else len(self.calls) + 1,
            "n_completions": len(completions), "judge_s": seconds, "requests_served": served,
            "s_per_request": seconds / served if served else None, "server_stats": s1,
            "judge_counters": counters, "rules_error": rules_error,
            "judge_reward": [None if r is None else r.reward for r in results],
            "reward_given": given,
            "substituted": [substitution(r, g) for r, g in zip(results, given)],
            "failures": [{} if r is None else {k: v[:160] for k, v in r.failures.items()} for r in results],
            "scores": [{} if r is None else r.scores for r in results],
            "trait_reward": traits, "words": [len(x.split()) for x in texts],
            "group_std": spreads, "groups_without_spread": sum(s < 1e-9 for s in spreads),
            "samples": [{"completion": x, "scores": r.scores if r else {}, "reward": r.reward if r else None,
                         "raw": {k: [s[:RAW_CHARS] for s in v] for k, v in (r.raw if r else {}).items()}}
                        for x, r in list(zip(texts, results))[: self.n_samples]],
        })
        print(f"judge call {len(self.calls)}: {seconds:.0f} s, {served} requests, rewards {given}, "
              f"parse failures {counters.get('parse_failures', 0)}/{counters.get('score_calls', 0)}", flush=True)
        return given


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t)

    return StepTimer()


# ---- held-out before / after ---------------------------------------------------------------------------------------
def heldout(pair, tok, rows, judge, max_new_tokens: int) -> list[dict]:
    """Greedy completions of ``rows``, each with the judge's reward and scores and the trait hits."""
    from flythinker.empathy.records import contexts_from_columns
    from flythinker.rl import generate_responses, strategy_report

    if not rows:
        return []
    texts = generate_responses(pair, tok, rows, max_new_tokens=max_new_tokens, batch_size=8)
    cols = {k: [r[k] for r in rows] for k in ("query", "persona", "memories", "situation", "criteria", "record_id")}
    try:
        results = judge.score(texts, contexts_from_columns(len(rows), cols))
    except Exception as exc:  # noqa: BLE001 (PERM's batch rule with nothing parsed: recorded, not fatal)
        results = [None] * len(rows)
        print(f"held-out judging failed: {exc}", flush=True)
    hits = strategy_report(texts, rows)["per_record"]
    return [{"record_id": r["record_id"], "traits": r["traits"], "completion": x, "trait_accuracy": h,
             "judge_reward": res.reward if res else None, "scores": res.scores if res else {},
             "failures": res.failures if res else {}} for r, x, h, res in zip(rows, texts, hits, results)]


# ---- summary and plot ----------------------------------------------------------------------------------------------
def _spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 3 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
        return None
    return float(spearmanr([x for x, _ in pairs], [y for _, y in pairs]).statistic)


def summarise(calls: list[dict]) -> dict:
    judged = [r for c in calls for r in c["judge_reward"]]
    ok = [r for r in judged if r is not None]
    counters: dict[str, float] = {}
    for c in calls:
        for k, v in c["judge_counters"].items():
            counters[k] = counters.get(k, 0) + v
    sc = counters.get("score_calls", 0)
    t = torch.tensor(ok) if ok else torch.tensor([])
    return {
        "completions": len(judged), "with_judge_reward": len(ok),
        "judge_reward": {"mean": float(t.mean()) if ok else None, "std": float(t.std()) if len(ok) > 1 else None,
                         "min": min(ok, default=None), "max": max(ok, default=None),
                         "distinct_values": len(set(ok))},
        "score_calls": sc, "parse_failures": counters.get("parse_failures", 0),
        "parse_failure_rate": counters.get("parse_failures", 0) / sc if sc else None,
        "fallbacks": counters.get("fallbacks", 0), "items_without_reward": counters.get("items_without_reward", 0),
        "rules_errors": sum(c["rules_error"] is not None for c in calls),
        "groups_without_spread": sum(c["groups_without_spread"] for c in calls),
        "groups": sum(len(c["group_std"]) for c in calls),
        "spearman_judge_vs_trait": _spearman([r for c in calls for r in c["judge_reward"]],
                                             [x for c in calls for x in c["trait_reward"]]),
        "spearman_judge_vs_words": _spearman([r for c in calls for r in c["judge_reward"]],
                                             [float(x) for c in calls for x in c["words"]]),
        "judge_s_total": sum(c["judge_s"] for c in calls),
        "requests_served": sum(c["requests_served"] for c in calls),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for c in result["steps"]:
        xs = [c["step"]] * len(c["judge_reward"])
        a.scatter(xs, [r if r is not None else float("nan") for r in c["judge_reward"]], c="C0", s=14,
                  label="judge reward" if c["step"] == 1 else None)
        failed = [g for r, g in zip(c["judge_reward"], c["reward_given"]) if r is None and g is not None]
        a.scatter([c["step"]] * len(failed), failed, c="C3", marker="x", s=20,
                  label="group mean in place of a failure" if c["step"] == 1 else None)
        lost = sum(g is None for g in c["reward_given"])
        a.scatter([c["step"]] * lost, [0.0] * lost, c="gray", marker="v", s=20,
                  label="no reward at all (TRL adds 0)" if c["step"] == 1 else None)
    a.set_xticks([c["step"] for c in result["steps"]])
    a.set_xlabel("GRPO step")
    a.set_ylabel("reward per completion")
    s = result["summary"]
    pf = s["parse_failure_rate"]
    a.set_title(f"{result['setup']['reward']} judge, {result['setup']['rules']} rules: parse failures "
                f"{'n/a' if pf is None else f'{pf:.0%}'}")
    a.legend(fontsize=8)
    ho = result["heldout"]
    if not ho["before"]:
        b.set_axis_off()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return
    x = range(len(ho["before"]))
    for off, key in ((-0.2, "before"), (0.2, "after")):
        b.bar([i + off for i in x], [h["judge_reward"] if h["judge_reward"] is not None else 0.0
                                     for h in ho[key]], width=0.4, label=key)
    for off, key in ((-0.2, "before"), (0.2, "after")):
        for i, h in enumerate(ho[key]):
            if h["judge_reward"] is None:
                b.text(i + off, 0.0, "none", ha="center", va="bottom", fontsize=7, rotation=90)
    b.set_xticks(list(x), [h["record_id"][-8:] for h in ho["before"]], rotation=30, fontsize=7)
    b.set_ylabel("judge reward (0 = none)")
    b.set_title("held-out users, greedy, before / after")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--group", type=int, default=4, help="num_generations (group size)")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-completion", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-reasoner-tokens", type=int, default=160)
    p.add_argument("--reward", choices=("perm", "peregrm"), default="perm")
    p.add_argument("--rules", choices=("authors", "strict"), default="strict")
    p.add_argument("--judge-model", default="smollm2-135m-instruct", help="the model the server loads")
    p.add_argument("--judge-timeout", type=float, default=900.0,
                   help="seconds per judge request (the CLI's client: 60; a CPU server queues requests)")
    p.add_argument("--judge-max-tokens", type=int, default=0,
                   help="cap the judge's output (0: the rules' own setting, as the CLI)")
    p.add_argument("--server-threads", type=int, default=2, help="the server's OMP_NUM_THREADS")
    p.add_argument("--server-start-timeout", type=float, default=300.0)
    p.add_argument("--n-heldout", type=int, default=4, help="held-out users compared before / after")
    p.add_argument("--n-samples", type=int, default=3, help="(completion, judge output) samples kept per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "grpo_judge_server"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from datasets import Dataset

    from flythinker import FlyThinkerForCausalLM
    from flythinker.hub import atomic_write_json, load_tokenizer
    from flythinker.persona import make_persona_empathy
    from flythinker.rl import grpo_rows
    from flythinker.rl.trainer import FlyThinkerGRPOTrainer, GRPOConfig, train_only

    t0, load_start = time.time(), os.getloadavg()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` / kill: still shut the server down
    port = free_port()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.gettempdir()) / f"grpo_judge_server.{os.getpid()}.log"
    print(f"starting the judge server on 127.0.0.1:{port} (log {log_path})", flush=True)
    server = start_server(args.judge_model, port, args.server_threads, log_path, args.server_start_timeout)
    t_server = time.time() - t0
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        reward, cli_equivalent, deviations = cli_judge_reward(args, base_url)
        recorder = RecordingJudgeReward(reward, base_url, args.n_samples)

        pair, tok = FlyThinkerForCausalLM.from_pretrained(PAIR), load_tokenizer(PAIR)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        n_trainable = train_only(pair, ["fusion"])
        data = make_persona_empathy()
        train_rows = grpo_rows(data["train"], tok, mode="split", max_reasoner_tokens=args.max_reasoner_tokens)
        first: dict[str, dict] = {}  # one query per held-out user
        for rec, row in zip(data["test"], grpo_rows(data["test"], tok, mode="split",
                                                     max_reasoner_tokens=args.max_reasoner_tokens)):
            first.setdefault(rec.user_id, row)
        test_rows = list(first.values())[: args.n_heldout]

        t = time.time()
        before = heldout(pair, tok, test_rows, reward.judge, args.max_completion)
        t_before = time.time() - t
        judge_stats_before_training = dict(reward.judge.stats)

        cfg = GRPOConfig(output_dir=str(out.with_suffix(".trainer")),
                         per_device_train_batch_size=args.group * args.prompts_per_step,
                         num_generations=args.group, max_completion_length=args.max_completion,
                         max_steps=args.steps, learning_rate=args.lr, beta=0.0, logging_steps=1, report_to=[],
                         save_strategy="no", use_cpu=True, bf16=False, temperature=1.0, seed=0,
                         gradient_checkpointing=False, disable_tqdm=True)
        timer = _step_timer()
        trainer = FlyThinkerGRPOTrainer(model=pair, reward_funcs=[recorder], args=cfg,
                                        train_dataset=Dataset.from_list(train_rows), processing_class=tok,
                                        callbacks=[timer])
        recorder.trainer = trainer
        t = time.time()
        trainer.train()
        t_train = time.time() - t
        logs = {h["step"]: h for h in trainer.state.log_history if "reward" in h}
        for c, secs in zip(recorder.calls, timer.seconds):
            h = logs.get(c["step"], {})
            c["step_s"] = secs
            c["policy_mean_completion_tokens"] = h.get("completions/mean_length")
            c["loss"] = h.get("loss")
            c["trl_reward_mean"] = h.get("reward")

        t = time.time()
        after = heldout(trainer.model, tok, test_rows, reward.judge, args.max_completion)
        t_after = time.time() - t
        server_stats = get_json(base_url.removesuffix("/v1") + "/stats")
    finally:
        stop_process(server)

    result = {
        "setup": vars(args) | {"pair": f"the shipped pair {PAIR}, only its fusion projection trained "
                                       f"({n_trainable} parameters)", "context": "split",
                               "judge": f"{args.judge_model} behind python -m flythinker.empathy.server "
                                        "(127.0.0.1, one generate at a time)",
                               "reward_built_as": cli_equivalent, "deviations_from_cli": deviations,
                               "judge_settings": dataclasses.asdict(reward.judge.settings),
                               "judge_mode": reward.judge.mode,
                               "trl": __import__("trl").__version__},
        "steps_done": trainer.state.global_step,
        "summary": summarise(recorder.calls),
        "steps": recorder.calls,
        "heldout": {"before": before, "after": after,
                    "judge_counters_before_training": judge_stats_before_training},
        "server_stats_end": server_stats,
        "judge_report_end": reward.judge.report(),
        "wall_s": {"total": time.time() - t0, "server_start": t_server, "train": t_train,
                   "heldout_before": t_before, "heldout_after": t_after,
                   "per_step": timer.seconds},
        "loadavg": {"start": load_start, "end": os.getloadavg()},
    }
    atomic_write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    s = result["summary"]
    print(f"judge rewards {s['judge_reward']}, parse failures {s['parse_failures']}/{s['score_calls']}, "
          f"groups without spread {s['groups_without_spread']}/{s['groups']}; train {t_train:.0f} s, "
          f"total {result['wall_s']['total']:.0f} s -> {out.with_suffix('.json')}", flush=True)
    return result


if __name__ == "__main__":
    main()
