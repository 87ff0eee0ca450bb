"""Fusion-only personalisation of the real SmolLM2-135M-Instruct pair, sized for a loaded 2-core CPU.

    .venv/bin/python -m benchmarks.personalization_fusion [--train 96 --val 24 --test 100 --k 12]

Both models stay frozen (SmolLM2 as shipped); only the fusion is trained: a zero-initialised linear projection
(`projection="zero"`: the untrained pair *is* the generator). Because nothing but the projection changes, every
forward that does not depend on it is computed once per record and reused (the split-context alignment, docs/design.md):
  - the reasoner over its long view + the reply's first k tokens (latents for the boundary and reply positions;
    its own LM head on the same pass is the generator reading the history itself, variant b, for free);
  - the generator's KV cache over its prompt minus the last position (no latent reaches those positions).
Training and scoring then run the generator only over the fused suffix (last prompt position + k reply tokens).

Measured per record (held-out users):
  probe: L2 logistic regression on the boundary latent (reasoner position Q-2) -> each hidden trait;
  likelihood preference over the reply's opening (first k+1 tokens): the reply for the user's traits against the
    same reply with `strategy` (resp. `register`) flipped; `length` only shows later in the reply and is not
    scored here. Variants: generator alone (= lambda 0 = a/e: nothing else is trained), b = generator reading
    the history, c = split-context fusion at each fusion config.
95% bootstrap CIs over users. Results: benchmarks/results/personalization_fusion.json (+ the trained projection
of the chosen config as safetensors with --save).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch

from flythinker.decode import left_pad
from flythinker.persona import TRAITS, build_views, make_persona_empathy
from flythinker.rl import bootstrap_ci

# `flythinker bench` contract (flythinker/cli/bench.py): no quick mode, and why
QUICK = {"skip": "a training benchmark on the real SmolLM2 pair (tens of minutes)"}

RESULTS = Path(__file__).resolve().parent / "results"
SCORED = ("strategy", "register")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (load {os.getloadavg()[0]:.1f})", flush=True)


def flip(traits: dict, name: str) -> dict:
    a, b = TRAITS[name]
    return {**traits, name: b if traits[name] == a else a}


def candidates(record) -> list[str]:
    """Reply for the user's traits, then the same draws with each scored trait flipped."""
    from flythinker.persona.empathy_dataset import compose_response

    seed = int.from_bytes(record.record_id.encode()[-8:], "little")
    t, topic = record.persona.traits, record.meta["topic"]
    return [compose_response(t, topic, random.Random(seed))] + [
        compose_response(flip(t, k), topic, random.Random(seed)) for k in SCORED]


def response_ids(record, text: str, tok, budget: int) -> list[int]:
    import dataclasses

    return build_views(dataclasses.replace(record, response=text), tok, mode="split", max_reasoner_tokens=budget,
                       warn=False).response_ids


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp_min(0)


@torch.no_grad()
def precompute(base, tok, records, k: int, budget: int, with_candidates: bool, batch: int = 8,
               generator=None) -> list[dict]:
    """Per batch: generator prefix cache, reasoner latents [B, C, k+1, H] and the reasoner's own NLL per candidate
    over the reply's first k+1 tokens (variant b), suffix ids [B, C, k+1] and targets [B, C, k+1]. `base` is the
    reasoner (SmolLM2 as shipped); `generator` (default: `base`) the generator whose prefix cache is kept."""
    out = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dec, head = base.get_decoder(), base.get_output_embeddings()
    g_dec = (generator if generator is not None else base).get_decoder()
    for i in range(0, len(records), batch):
        recs = records[i:i + batch]
        views = [build_views(r, tok, mode="split", max_reasoner_tokens=budget, warn=False) for r in recs]
        texts = [candidates(r) if with_candidates else [r.response] for r in recs]
        resp = [[response_ids(r, t, tok, budget)[: k + 1] for t in ts] for r, ts in zip(recs, texts)]
        C = len(texts[0])
        # generator prefix: prompt minus its last position (never fused)
        g_ids, g_mask = left_pad([v.generator_prompt_ids[:-1] for v in views], pad)
        g_out = g_dec(input_ids=g_ids, attention_mask=g_mask, position_ids=positions(g_mask), use_cache=True)
        # reasoner prefix: its whole prompt; then each candidate's first k reply tokens
        r_ids, r_mask = left_pad([v.reasoner_prompt_ids for v in views], pad)
        r_out = dec(input_ids=r_ids, attention_mask=r_mask, position_ids=positions(r_mask), use_cache=True)
        lat, nll_b = [], []
        for c in range(C):
            cache = copy.deepcopy(r_out.past_key_values)
            s_ids = torch.tensor([resp[b][c][:k] for b in range(len(recs))])
            s_mask = torch.cat([r_mask, torch.ones_like(s_ids)], 1)
            s_pos = r_mask.sum(1, keepdim=True) + torch.arange(k)[None]
            s = dec(input_ids=s_ids, attention_mask=s_mask, position_ids=s_pos, cache=cache, use_cache=True)
            h = torch.cat([r_out.last_hidden_state[:, -2:], s.last_hidden_state], 1)  # Q-2 .. Q+k-1: [B, k+2, H]
            lat.append(h[:, : k + 1])  # Q-2 .. Q+k-2: received by generator positions P-1 .. P-1+k
            logits = head(h[:, 1:]).float()  # Q-1 .. Q+k-1 predict reply tokens 0 .. k
            tgt = torch.tensor([resp[b][c] for b in range(len(recs))])
            nll_b.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none").sum(1))
        suffix = torch.tensor([[[v.generator_prompt_ids[-1]] + resp[b][c][:k] for c in range(C)]
                               for b, v in enumerate(views)])
        target = torch.tensor([[resp[b][c] for c in range(C)] for b in range(len(recs))])
        out.append(dict(records=recs, g_cache=g_out.past_key_values, g_mask=g_mask, latents=torch.stack(lat, 1),
                        nll_b=torch.stack(nll_b, 1), suffix=suffix, target=target,
                        boundary=r_out.last_hidden_state[:, -2].clone()))
        log(f"precomputed {i + len(recs)}/{len(records)} records")
    return out


def suffix_nll(pair, item: dict, c: int, lam: float | None = None) -> torch.Tensor:
    """Summed NLL [B] of candidate c's first k+1 reply tokens under the fused generator (grad flows to the fusion);
    `lam`: the fusion weight of this call (None: the pair's config)."""
    ids, lat = item["suffix"][:, c], item["latents"][:, c]  # [B, k+1], [B, k+1, H]
    B, S = ids.shape
    # slot t is fused into position t+1; prev (the boundary latent) into position 0
    slots = torch.cat([lat[:, 1:], lat.new_zeros(B, 1, lat.shape[-1])], 1)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[:, -1] = 0
    emb = pair.fuse(ids, slots, mask, lat[:, 0], lam=lam)
    g_mask = item["g_mask"]
    attn = torch.cat([g_mask, torch.ones(B, S, dtype=torch.long)], 1)
    pos = g_mask.sum(1, keepdim=True) + torch.arange(S)[None]
    out = pair.generator.get_decoder()(inputs_embeds=emb, attention_mask=attn, position_ids=pos,
                                       cache=copy.deepcopy(item["g_cache"]), use_cache=True)
    logits = pair.generator.get_output_embeddings()(out.last_hidden_state).float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), item["target"][:, c], reduction="none").sum(1)


def train_fusion(pair, items: list[dict], steps: int, lr: float, rank: int, seed: int, whitened: bool = False) -> dict:
    """Adam on the projection only (rank>0: P = A @ B with A zero-initialised, B random). `whitened`: the projection
    was reparametrised as P = P' @ M (flythinker.training.whitened_projection.whiten_projection); Adam trains P', and
    the projection is folded back to a plain P at the end."""
    torch.manual_seed(seed)
    W = pair.latent_proj.weight
    H_g, H_r = W.shape
    if whitened:
        params = [pair.latent_proj.parametrizations.weight.original.requires_grad_(True)]
    elif rank:
        A = torch.zeros(H_g, rank, requires_grad=True)
        Bm = (torch.randn(rank, H_r) / H_r ** 0.5).requires_grad_(True)
        params = [A, Bm]
    else:
        params = [W]
        W.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses, t0 = [], time.time()
    order = list(range(len(items)))
    rng = random.Random(seed)
    for step in range(steps):
        if step % len(items) == 0:
            rng.shuffle(order)
        item = items[order[step % len(items)]]
        if rank and not whitened:
            with torch.no_grad():
                W.copy_(A @ Bm)
            W.requires_grad_(True)
            W.grad = None
        nll = suffix_nll(pair, item, 0)
        loss = nll.sum() / item["target"][:, 0].numel()
        loss.backward()
        if rank and not whitened:
            g = W.grad
            A.grad, Bm.grad = g @ Bm.T, A.T @ g
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    if whitened:
        from flythinker.training.whitened_projection import fold_projection

        fold_projection(pair)
        W = pair.latent_proj.weight
    elif rank:
        with torch.no_grad():
            W.copy_(A @ Bm)
    W.requires_grad_(False)
    return {"losses": losses, "train_s": time.time() - t0, "proj_norm": float(W.norm())}


@torch.no_grad()
def preference(pair, items: list[dict], lam: float | None) -> list[dict]:
    """Per record: {trait: 1.0 if the reply for the user's traits has the lower opening NLL}; lam=None: variant b
    (the reasoner's own LM head, i.e. the generator reading the history)."""
    rows = []
    for item in items:
        C = item["suffix"].shape[1]
        nll = item["nll_b"] if lam is None else torch.stack([suffix_nll(pair, item, c, lam) for c in range(C)], 1)
        for b, r in enumerate(item["records"]):
            rows.append({"user": r.user_id, **{t: float(nll[b, 0] < nll[b, 1 + j]) for j, t in enumerate(SCORED)}})
    return rows


def bootstrap(rows: list[dict], key, other: list[dict] | None = None, n: int = 2000, seed: int = 0) -> dict:
    """Mean over users (95% bootstrap CI over users); with `other` (same records) the paired difference."""
    users: dict[str, list[float]] = {}
    for i, r in enumerate(rows):
        users.setdefault(r["user"], []).append(key(r) - (key(other[i]) if other is not None else 0.0))
    per = [sum(v) / len(v) for v in users.values()]
    mean, lo, hi = bootstrap_ci(per, n_boot=n, seed=seed)
    return {"mean": mean, "ci95": [lo, hi], "users": len(per), "records": len(rows)}


def summary(rows: list[dict], base: list[dict] | None = None) -> dict:
    s = {t: bootstrap(rows, lambda r, t=t: r[t]) for t in SCORED}
    if base is not None:
        s.update({f"{t}_minus_generator": bootstrap(rows, lambda r, t=t: r[t], base) for t in SCORED})
    return s


def probe(train_x, train_y, test_x, test_y, l2: float = 1e-2) -> float:
    """Held-out accuracy of an L2 logistic regression on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, train_y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float((((b @ w + c) > 0).float() == test_y).float().mean())


def probes(train_items, test_items) -> dict:
    xtr = torch.cat([it["boundary"] for it in train_items])
    xte = torch.cat([it["boundary"] for it in test_items])
    rtr = [r for it in train_items for r in it["records"]]
    rte = [r for it in test_items for r in it["records"]]
    out = {}
    for name, (first, _) in TRAITS.items():
        ytr = torch.tensor([float(r.persona.traits[name] == first) for r in rtr])
        yte = torch.tensor([float(r.persona.traits[name] == first) for r in rte])
        out[name] = {"accuracy": probe(xtr, ytr, xte, yte), "majority": float(max(yte.mean(), 1 - yte.mean()))}
    return out


def plot(result: dict, path: Path) -> None:
    """Bars with 95% CIs per trait (generator alone, b, each config's c) + each config's training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("generator alone\n(= λ 0 = a, e)", result["generator_alone"]),
            ("b: generator reads\nthe history", result["b_history_in_context"])]
    bars += [(f"c: flythinker split\n(fusion {cfg})", e["test"]) for cfg, e in result["configs"].items() if "test" in e]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.8 / len(bars)
    for i, (label, s) in enumerate(bars):
        xs = [j + i * w for j in range(len(SCORED))]
        means = [s[t]["mean"] for t in SCORED]
        err = [[m - s[t]["ci95"][0] for m, t in zip(means, SCORED)],
               [s[t]["ci95"][1] - m for m, t in zip(means, SCORED)]]
        ax.bar(xs, means, w, yerr=err, capsize=3, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(SCORED))], SCORED)
    ax.set_ylim(0, 1)
    n = result["generator_alone"]["strategy"]["users"]
    ax.set_ylabel(f"likelihood preference ({n} held-out users, 95% CI)")
    ax.legend(fontsize=7, loc="lower right")
    for cfg, e in result["configs"].items():
        ax2.plot(e["train"]["losses"], label=f"fusion {cfg}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("train NLL / token (reply opening)")
    ax2.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct pair, fusion-only training (both models frozen)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merged_generator(base, path: str, rank: int):
    """A copy of `base` with the LoRA adapters saved by benchmarks/personalization_smollm2.py (variant a: rank
    `rank`, alpha 2 * rank, on its seven linear maps) merged in: that variant's fine-tuned generator."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from benchmarks.personalization_smollm2 import LORA_TARGETS, load_state

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))
    load_state(model, load_file(path))  # refuses keys the model lacks
    gen = model.merge_and_unload().eval()
    for q in gen.parameters():
        q.requires_grad_(False)
    return gen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=96, help="training users")
    p.add_argument("--train-per-user", type=int, default=1)
    p.add_argument("--generator-lora", default=None,
                   help="the generator: SmolLM2 with this LoRA merged (personalization_smollm2's a.safetensors); "
                        "default SmolLM2 as shipped")
    p.add_argument("--rank", type=int, default=8, help="the rank of --generator-lora")
    p.add_argument("--val", type=int, default=0)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--k", type=int, default=12, help="reply tokens scored/trained after the boundary")
    p.add_argument("--max-reasoner-tokens", type=int, default=160)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--configs", default="0:3e-3:48,0:1e-2:48,8:1e-2:48",
                   help="rank:lr:steps[:std][:white] of each fusion config (rank 0 = full matrix; :std = standardised "
                        "latents, latent_norm='standardize'; :white = Adam steps on whitened projection inputs, "
                        "P = P' @ M with M the inverse square root of their second moment on the training boundary "
                        "latents)")
    p.add_argument("--calibrate-on", default="fused", choices=("fused", "boundary"),
                   help=":std statistics from every fused latent (the pilot's first runs) or the boundary only")
    p.add_argument("--shrink", type=float, default=0.1, help=":white: ridge, a fraction of the mean eigenvalue")
    p.add_argument("--save", default=None, help="write the first config's projection (fp16 safetensors) here")
    p.add_argument("--out", default=str(RESULTS / "personalization_fusion.json"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out and exit")
    args = p.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    from flythinker import FlyThinkerForCausalLM
    from flythinker.hub import atomic_write_json, load_pretrained
    from flythinker.latent_norm import LatentStats
    from flythinker.training.whitened_projection import projection_inputs, whiten_projection

    t_all, load0 = time.time(), os.getloadavg()
    base, tok = load_pretrained("smollm2-135m-instruct")
    for q in base.parameters():
        q.requires_grad_(False)
    data = make_persona_empathy()
    first = {s: [r for r in data[s] if r.record_id.endswith("-q0")] for s in data}
    result = {"args": vars(args), "loadavg_start": load0, "configs": {}}
    out = Path(args.out)

    def save():
        result["wall_s"] = time.time() - t_all
        result["loadavg_now"] = os.getloadavg()
        atomic_write_json(out, result)

    t = time.time()
    gen = merged_generator(base, args.generator_lora, args.rank) if args.generator_lora else base
    if args.train_per_user > 1:
        from benchmarks.personalization_smollm2 import select

        train_records = select(data["train"], args.train_per_user, args.train)
    else:
        train_records = first["train"][: args.train]
    train_items = precompute(base, tok, train_records, args.k, args.max_reasoner_tokens, False, generator=gen)
    result["precompute_train_s"] = time.time() - t
    # frozen SmolLM2 as the reasoner; the generator is the same module (no copy, nothing trained) or the merged one
    plain = FlyThinkerForCausalLM.from_pair(gen, base, fusion_lambda=args.lam, projection="zero").eval()
    # configs with ":std" fuse standardised latents (latent_norm="standardize"), calibrated on every latent the
    # training records fuse (the boundary and the k reply positions) or, --calibrate-on boundary, the boundary only
    std = FlyThinkerForCausalLM.from_pair(gen, base, fusion_lambda=args.lam, projection="zero",
                                          latent_norm="standardize").eval()
    stats = LatentStats(base.config.hidden_size)
    for it in train_items:  # latents [B, 1, k+1, H]: slot 0 is the boundary
        stats.add(it["latents"][:, 0, :1] if args.calibrate_on == "boundary" else it["latents"][:, 0])
    mean, inv_std = stats.result(1e-3)
    std.latent_mean.copy_(mean)
    std.latent_inv_std.copy_(inv_std)
    pairs = {cfg: std if "std" in cfg.split(":")[3:] else plain for cfg in args.configs.split(",")}
    trained = {}
    boundary = torch.cat([it["latents"][:, 0, 0] for it in train_items])  # [N, H_r]: the boundary latents
    for cfg, pair in pairs.items():  # train every config first: the projection is shipped before scoring
        rank, lr, steps = cfg.split(":")[:3]
        white = "white" in cfg.split(":")[3:]
        with torch.no_grad():
            pair.latent_proj.weight.zero_()
        if white:
            whiten_projection(pair, projection_inputs(pair, boundary), args.shrink)
        tr = train_fusion(pair, train_items, int(steps), float(lr), int(rank), 0, whitened=white)
        trained[cfg] = pair.latent_proj.weight.detach().clone()
        result["configs"][cfg] = {"train": tr}
        log(f"config {cfg}: loss {sum(tr['losses'][:4]) / 4:.2f}->{sum(tr['losses'][-4:]) / 4:.2f} "
            f"|P| {tr['proj_norm']:.2f} {tr['train_s']:.0f}s")
        if args.save and cfg == args.configs.split(",")[0]:
            from safetensors.torch import save_file

            Path(args.save).parent.mkdir(parents=True, exist_ok=True)
            save_file({"latent_proj.weight": trained[cfg].half().contiguous()}, args.save,
                      metadata={"config": cfg, "fusion_lambda": str(args.lam)})
        save()
    t = time.time()
    val_items = precompute(base, tok, first["validation"][: args.val], args.k, args.max_reasoner_tokens, True,
                           generator=gen) if args.val else []
    test_items = precompute(base, tok, first["test"][: args.test], args.k, args.max_reasoner_tokens, True,
                            generator=gen)
    result["precompute_eval_s"] = time.time() - t
    result["probe_boundary_latent"] = probes(train_items, test_items)
    log(f"probe {result['probe_boundary_latent']}")
    gen_rows = preference(plain, test_items, 0.0)
    result["generator_alone"] = summary(gen_rows)
    result["generator_alone_rows"] = gen_rows
    b_rows = preference(plain, test_items, None)
    result["b_history_in_context"] = summary(b_rows, gen_rows)
    log(f"generator alone {result['generator_alone']}; b {result['b_history_in_context']}")
    save()
    for cfg, w in trained.items():
        pair = pairs[cfg]
        with torch.no_grad():
            pair.latent_proj.weight.copy_(w)
        entry = result["configs"][cfg]
        if val_items:
            entry["val"] = summary(preference(pair, val_items, args.lam))
        test_rows = preference(pair, test_items, args.lam)
        entry.update({"test": summary(test_rows, gen_rows), "test_rows": test_rows,
                      "c_minus_b": summary(test_rows, b_rows)})
        log(f"config {cfg}: test {json.dumps({t: round(entry['test'][t]['mean'], 3) for t in SCORED})}")
        save()
    save()
    plot(result, out.with_suffix(".png"))
    log(f"done in {time.time() - t_all:.0f}s")


if __name__ == "__main__":
    main()
