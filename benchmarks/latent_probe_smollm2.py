"""Linear probes on the reasoner's latents: does frozen SmolLM2 encode a persona-empathy user's trait where the
generator reads it?

    .venv/bin/python -m benchmarks.latent_probe_smollm2 [--train-users 480 --test-users 200]

In split context the generator's last prompt position, the one that predicts the first response token (which sets
the strategy: "I am truly sorry ..." vs "Here is a practical plan ."), receives the reasoner's latent from the
reasoner's *second-to-last* prompt position (docs/design.md, the one-position lag): the `assistant` of
`<|im_start|>assistant\\n`. This script fits an L2 logistic-regression probe per trait on the reasoner's final
hidden state (what `fuse` receives) at that position; for comparison, at the last prompt position (`\\n`), averaged
over the prompt, and for reasoners truncated to their first k layers (a cheaper reasoner). It fits on one record of
each of `--train-users` training users and scores on one record of each of `--test-users` held-out users (95%
bootstrap CI over users). A probe at chance where the generator reads says that the reasoner, frozen, does not carry
the trait there: no fusion can pass on what is not in its input. Beside each probe, the nearest-centroid rule
`sign(d . (z - midpoint))`, d the difference of the class means, on standardised latents and on whitened ones: the
rule the first gradient steps of a zero-initialised projection find (their gradient is a sum of outer products
with the latents). A probe far above its standardised centroid says the trait lies along a low-variance direction
that plain gradient steps pick up slowly. Results: benchmarks/results/latent_probe_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "a quality benchmark (probes on hundreds of users' latents)"}

RESULTS = Path(__file__).resolve().parent / "results"
TRAITS = ("strategy", "length", "register")


@torch.no_grad()
def latents(model, tok, records, max_tokens: int, layers: list[int]) -> dict[str, torch.Tensor]:
    """Per record, the reasoner's final hidden state at the fused boundary slot (Q-2), at the last prompt
    position (Q-1), its mean over the prompt, and at Q-2 the latent of the reasoner truncated to its first k layers
    (`flythinker.truncate.truncated_reasoner`: layer k's output through the final norm) for k in `layers`: each
    `[N, H]`."""
    from flythinker.persona import build_views

    out: dict[str, list[torch.Tensor]] = {"fused_boundary": [], "last_prompt": [], "prompt_mean": []}
    out.update({f"first{k}_layers_boundary": [] for k in layers})
    for r in records:
        ids = build_views(r, tok, mode="split", max_reasoner_tokens=max_tokens, warn=False).reasoner_prompt_ids
        hs = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states  # [emb, 1..30]
        last = hs[-1][0]  # [Q, H]: the final (normed) hidden state, what the fusion receives
        out["fused_boundary"].append(last[-2])
        out["last_prompt"].append(last[-1])
        out["prompt_mean"].append(last.mean(0))
        for k in layers:
            out[f"first{k}_layers_boundary"].append(model.model.norm(hs[k][0, -2]))
    return {k: torch.stack(v).float() for k, v in out.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, inv_std, weights) of a standardised L2 logistic regression: x `[N, H]`, y `[N]` in {0, 1}."""
    mean, inv = x.mean(0), 1.0 / x.std(0).clamp_min(1e-6)
    z = torch.cat([(x - mean) * inv, torch.ones(len(x), 1)], 1)
    w = torch.zeros(z.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mean, inv, w.detach()


def centroid_accuracy(x_tr, y_tr, x_te, y_te) -> float:
    """Held-out accuracy of the nearest-centroid rule `sign(d . (x - midpoint))`, d = mean(x|1) - mean(x|0): the
    direction the first gradient steps of a zero-initialised linear map find."""
    m1, m0 = x_tr[y_tr == 1].mean(0), x_tr[y_tr == 0].mean(0)
    pred = ((x_te - (m1 + m0) / 2) @ (m1 - m0) > 0).float()
    return float((pred == y_te).float().mean())


def accuracy_ci(hits: list[float], seed: int = 0, n: int = 2000) -> dict:
    rng = random.Random(seed)
    boots = sorted(sum(rng.choices(hits, k=len(hits))) / len(hits) for _ in range(n))
    return {"mean": sum(hits) / len(hits), "ci95": [boots[int(0.025 * n)], boots[int(0.975 * n)]]}


def probe_sets(args) -> tuple[list, dict[str, list]]:
    """(training records, {test-set name: records}): one record per user. Version 1: the synthetic train / test
    users. Version 2: train on the training phrasing families, test on the held-out families (``test``), on unseen
    users of the training families (``validation``) and on the hand-written users (``handwritten``: one trait
    each, so only that trait is scored)."""
    from flythinker.persona import load_dataset, load_handwritten_users, make_persona_empathy
    from flythinker.training.recipe import select_per_user as select

    if args.dataset_version == 1:
        data = make_persona_empathy()
        return select(data["train"], 1, args.train_users), {"test": select(data["test"], 1, args.test_users)}
    v = args.dataset_version
    return (select(load_dataset("persona-empathy", "train", version=v), 1, args.train_users),
            {"test": select(load_dataset("persona-empathy", "test", version=v), 1, args.test_users),
             "validation": select(load_dataset("persona-empathy", "validation", version=v), 1, args.test_users),
             "handwritten": load_handwritten_users()})


def score_probes(xs_train: dict, train: list, xs_test: dict, test: list, args) -> dict:
    """Per latent site and trait: the L2 logistic probe's held-out accuracy (95% CI over users) and the
    nearest-centroid rule's on standardised and whitened latents. Test records without a trait are skipped for it."""
    from flythinker.persona.empathy_dataset import TRAITS as VALUES
    from flythinker.training.whitened_projection import whitening_matrix

    out: dict = {}
    for where in xs_train:
        out[where] = {}
        for trait in TRAITS:
            keep = [i for i, r in enumerate(test) if trait in r.persona.traits]
            if not keep:
                continue
            one = VALUES[trait][1]  # label 1: the trait's second value ("steps", "detailed", "casual")
            y_tr = torch.tensor([float(r.persona.traits[trait] == one) for r in train])
            y_te = [float(test[i].persona.traits[trait] == one) for i in keep]
            x_te = xs_test[where][keep]
            mean, inv, w = fit_probe(xs_train[where], y_tr, args.l2)
            z = torch.cat([(x_te - mean) * inv, torch.ones(len(keep), 1)], 1)
            pred = ((z @ w) > 0).float().tolist()
            out[where][trait] = accuracy_ci([float(a == b) for a, b in zip(pred, y_te)])
            # the first gradient steps' rule, on standardised latents and on whitened ones
            yt = torch.tensor(y_te)
            z_tr, z_te = (xs_train[where] - mean) * inv, (x_te - mean) * inv
            m = whitening_matrix(z_tr, args.shrink)  # its scale does not change the centroid rule
            out[where][trait].update(centroid_standardized=centroid_accuracy(z_tr, y_tr, z_te, yt),
                                     centroid_whitened=centroid_accuracy(z_tr @ m, y_tr, z_te @ m, yt))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-users", type=int, default=480)
    p.add_argument("--test-users", type=int, default=200)
    p.add_argument("--max-reasoner-tokens", type=int, default=160)
    p.add_argument("--layers", default="2,4,6,8,15", help="truncated reasoners to probe (first k layers)")
    p.add_argument("--l2", type=float, default=1e-2)
    p.add_argument("--shrink", type=float, default=0.1, help="whitening: ridge as a fraction of the mean eigenvalue")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dataset-version", type=int, default=1,
                   help="persona-empathy version: 2 tests on held-out phrasing families and the hand-written users")
    p.add_argument("--out", default=None, help="default: results/latent_probe_smollm2[_v2].json")
    args = p.parse_args(argv)
    if args.out is None:
        suffix = "" if args.dataset_version == 1 else f"_v{args.dataset_version}"
        args.out = str(RESULTS / f"latent_probe_smollm2{suffix}.json")
    torch.set_num_threads(args.threads)
    from flythinker.hub import atomic_write_json, load_pretrained

    t0, load0 = time.time(), os.getloadavg()
    model, tok = load_pretrained("smollm2-135m-instruct")
    model.eval()
    layers = [int(k) for k in args.layers.split(",") if k]
    train, tests = probe_sets(args)
    xs_train = latents(model, tok, train, args.max_reasoner_tokens, layers)
    result = {"args": vars(args), "loadavg_start": load0, "train_records": len(train), "test_records": {}}
    for name, test in tests.items():
        result["test_records"][name] = len(test)
        key = "probes" if name == "test" else f"probes_{name}"
        result[key] = score_probes(xs_train, train, latents(model, tok, test, args.max_reasoner_tokens, layers),
                                   test, args)
        print(f"-- {key}", flush=True)
        for where, traits in result[key].items():
            print(where, json.dumps({t: [round(v[k], 3) for k in ("mean", "centroid_standardized",
                                                                     "centroid_whitened")]
                                     for t, v in traits.items()}), flush=True)
    result["wall_s"] = time.time() - t0
    result["loadavg_end"] = os.getloadavg()
    atomic_write_json(Path(args.out), result)
    print(f"done in {result['wall_s']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
