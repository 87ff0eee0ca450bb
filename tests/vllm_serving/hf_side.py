"""The Hugging Face side of the vLLM tests, run with the project's main virtualenv (.venv, transformers >= 5.24).

`FlyThinkerForCausalLM`'s HF forward/generate use transformers 5.24's `cache` API while vLLM pins
transformers < 5.20 (its own .venv-vllm), so the tests in this folder build their checkpoints and the reference
outputs here, in a subprocess, and compare vLLM against them.

    python hf_side.py make OUT --gen-family llama --rsn-family qwen2 --lam 0.5 [--projection pad]
        -> OUT/pair (flythinker checkpoint + tokenizer), OUT/generator (the generator alone + tokenizer)
    python hf_side.py generate CKPT REQUESTS.json OUT.json [--generator-only]
        REQUESTS.json: {"max_new_tokens": n, "prompts": [[ids...], ...], "reasoner_prompts": [[ids...], ...]?}
        OUT.json: {"tokens": [[new ids...], ...], "seconds": wall time of generate}
    python hf_side.py truncated OUT  -> OUT/pair (reasoner = the generator's first 2 layers), OUT/refs.json
    python hf_side.py suite OUT      -> every checkpoint of SUITE under OUT/<name>, a shared-base pair and its
                                        two-copy conversion under OUT/unshared, and OUT/refs.json (one process)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ (model_helpers)

CORPUS = ("I failed my exam today and I feel bad . Can you help me plan the next week ? "
          "She likes short practical steps , he wants comfort first . Thank you , that helps a lot . "
          "What should I do about my job , my sleep and my friends ? Tell me more about it please .")


def make(out: Path, gen_family: str, rsn_family: str, lam: float, projection: str, norm_target: str,
         seed: int, latent_norm: str = "none") -> None:
    from model_helpers import tiny_lm

    from flythinker import FlyThinkerForCausalLM
    from flythinker.persona.wordlevel import word_tokenizer

    tok = word_tokenizer([CORPUS])
    V = len(tok)
    # head_dim 32 on both (vLLM's CPU attention needs one of 32, 64, 80, ...); different KV widths per model
    gen = tiny_lm(gen_family, seed=seed, hidden_size=128, vocab_size=V, num_attention_heads=4,
                  num_key_value_heads=2)
    rsn = tiny_lm(rsn_family, seed=seed + 1, hidden_size=64, vocab_size=V, num_attention_heads=2,
                  num_key_value_heads=1)
    try:
        nt: str | float = float(norm_target)
    except ValueError:
        nt = norm_target
    pair = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=lam, projection=projection, norm_target=nt,
                                           parallel="off", latent_norm=latent_norm)
    if latent_norm == "standardize":  # non-trivial statistics (saved as latent_mean / latent_inv_std)
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            pair.latent_mean.copy_(torch.randn(pair.latent_mean.shape, generator=g) * 0.5)
            pair.latent_inv_std.copy_(torch.rand(pair.latent_inv_std.shape, generator=g) + 0.5)
    if pair.latent_proj is not None:  # a non-trivial learned map (the init is the "pad" map)
        with torch.no_grad():
            pair.latent_proj.weight.add_(torch.randn(pair.latent_proj.weight.shape,
                                                     generator=torch.Generator().manual_seed(seed)) * 0.1)
    for sub, model in (("pair", pair), ("generator", gen)):
        model.save_pretrained(out / sub)
        tok.save_pretrained(out / sub)


def make_unshared(out: Path, seed: int) -> None:
    """A trained-looking shared-base pair (one tiny Llama base, random adapters on both halves, a learned "zero"
    projection) as a user would save it: OUT/shared (the shared-base checkpoint, the HF reference), OUT/pair (its
    `to_two_copies()`, what vLLM serves) and OUT/generator (that pair's merged generator alone)."""
    from model_helpers import randomise_adapters, tiny_lm

    from flythinker import FlyThinkerForCausalLM
    from flythinker.persona.wordlevel import word_tokenizer

    tok = word_tokenizer([CORPUS])
    base = tiny_lm("llama", seed=seed, hidden_size=128, vocab_size=len(tok), num_attention_heads=4,
                   num_key_value_heads=2)
    shared = FlyThinkerForCausalLM.from_shared_base(base, r=4, lora_alpha=8, fusion_lambda=0.8, projection="zero",
                                                    parallel="off")
    randomise_adapters(shared, seed=seed + 3)
    g = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        shared.latent_proj.weight.copy_(torch.randn(shared.latent_proj.weight.shape, generator=g) * 0.2)
    two = shared.to_two_copies()
    for sub, model in (("shared", shared), ("pair", two), ("generator", two.generator)):
        model.save_pretrained(out / sub)
        tok.save_pretrained(out / sub)


def generate(ckpt: Path, requests: dict, generator_only: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from flythinker import FlyThinkerForCausalLM
    from flythinker.decode import left_pad

    model = (AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32) if generator_only
             else FlyThinkerForCausalLM.from_pretrained(ckpt, dtype=torch.float32)).eval()
    n = int(requests["max_new_tokens"])
    ids, mask = left_pad(requests["prompts"], 0)
    kw = {}
    if requests.get("reasoner_prompts"):
        kw["reasoner_input_ids"], kw["reasoner_attention_mask"] = left_pad(requests["reasoner_prompts"], 0)
    t0 = time.perf_counter()
    with torch.no_grad():
        # min_new_tokens = max_new_tokens masks EOS: the vLLM side uses min_tokens = max_tokens (same masking)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, **kw)
    seconds = time.perf_counter() - t0
    return {"tokens": out[:, ids.shape[1]:].tolist(), "seconds": seconds}


# The tests' checkpoints: name -> make() arguments. "mixed" and "zero" share the generator (same family and seed).
SUITE = {
    "mixed": dict(gen_family="llama", rsn_family="qwen2", lam=0.5, projection="pad", norm_target="vocab_mean"),
    "zero": dict(gen_family="llama", rsn_family="llama", lam=0.0, projection="pad", norm_target="vocab_mean"),
    "linear": dict(gen_family="qwen2", rsn_family="llama", lam=0.5, projection="linear", norm_target="token"),
    "standardized": dict(gen_family="llama", rsn_family="qwen2", lam=1.0, projection="linear",
                         norm_target="vocab_mean", latent_norm="standardize"),
}
MAX_NEW_TOKENS = 24


def suite_prompts(vocab: int) -> list[list[int]]:
    """Five prompts of different lengths (9..41 tokens), ids in [6, vocab) (no special tokens)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(6, vocab, (n,), generator=g).tolist() for n in (9, 41, 17, 26, 12)]


def suite(out: Path) -> None:
    """Build SUITE's checkpoints and their HF greedy references (pair and generator alone)."""
    refs: dict = {"max_new_tokens": MAX_NEW_TOKENS}
    for name, kw in SUITE.items():
        make(out / name, seed=0, **kw)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(out / "mixed" / "generator").vocab_size
    prompts = suite_prompts(vocab)
    refs["prompts"] = prompts
    req = {"max_new_tokens": MAX_NEW_TOKENS, "prompts": prompts}
    for name in SUITE:
        refs[name] = generate(out / name / "pair", req, generator_only=False)
        refs[name + "/generator"] = generate(out / name / "generator", req, generator_only=True)
    make_unshared(out / "unshared", seed=0)  # the reference: the shared-base checkpoint itself
    refs["unshared"] = generate(out / "unshared" / "shared", req, generator_only=False)
    refs["unshared/pair"] = generate(out / "unshared" / "pair", req, generator_only=False)
    refs["unshared/generator"] = generate(out / "unshared" / "generator", req, generator_only=True)
    # split context on the "mixed" pair: short generator views, reasoner views mostly longer (one shorter)
    g = torch.Generator().manual_seed(99)
    gen_views = [torch.randint(6, vocab, (n,), generator=g).tolist() for n in (8, 15, 5, 11)]
    rsn_views = [torch.randint(6, vocab, (n,), generator=g).tolist() for n in (30, 12, 45, 20)]
    refs["split"] = {"generator_prompts": gen_views, "reasoner_prompts": rsn_views,
                     **generate(out / "mixed" / "pair", {"max_new_tokens": MAX_NEW_TOKENS, "prompts": gen_views,
                                                         "reasoner_prompts": rsn_views}, generator_only=False)}
    refs["split/shared"] = generate(out / "mixed" / "pair", {"max_new_tokens": MAX_NEW_TOKENS, "prompts": gen_views},
                                    generator_only=False)
    (out / "refs.json").write_text(json.dumps(refs))


def truncated_suite(out: Path, k: int = 2) -> None:
    """OUT/pair: a tiny Llama generator (4 layers) with a reasoner of its first `k` layers (flythinker.truncate;
    random adapters-free weights, lambda 0.5, a learned "linear" map); OUT/refs.json: HF greedy references for
    prompts that share long prefixes (three on one 70-token prefix, two on another) and split-context requests
    whose reasoner views share a 70-token history."""
    from model_helpers import tiny_lm

    from flythinker import FlyThinkerForCausalLM
    from flythinker.persona.wordlevel import word_tokenizer
    from flythinker.truncate import truncated_reasoner

    tok = word_tokenizer([CORPUS])
    V = len(tok)
    gen = tiny_lm("llama", seed=5, hidden_size=128, vocab_size=V, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=4)
    pair = FlyThinkerForCausalLM.from_pair(gen, truncated_reasoner(gen, k), fusion_lambda=0.5, projection="linear",
                                           parallel="off")
    with torch.no_grad():
        pair.latent_proj.weight.add_(torch.randn(pair.latent_proj.weight.shape,
                                                 generator=torch.Generator().manual_seed(8)) * 0.1)
    pair.save_pretrained(out / "pair")
    tok.save_pretrained(out / "pair")
    g = torch.Generator().manual_seed(77)

    def ids(n: int) -> list[int]:
        return torch.randint(6, V, (n,), generator=g).tolist()

    a, b = ids(70), ids(70)
    prompts = [a + ids(9), a + ids(14), b + ids(6), a + ids(3), b + ids(11)]
    history = ids(70)
    rsn_views = [history + ids(6), history + ids(6) + ids(9)]  # a returning user: the history, then more
    gen_views = [ids(7), ids(10)]
    refs = {"k": k, "max_new_tokens": MAX_NEW_TOKENS, "prompts": prompts,
            "shared": generate(out / "pair", {"max_new_tokens": MAX_NEW_TOKENS, "prompts": prompts}, False),
            "split": {"generator_prompts": gen_views, "reasoner_prompts": rsn_views,
                      **generate(out / "pair", {"max_new_tokens": MAX_NEW_TOKENS, "prompts": gen_views,
                                                "reasoner_prompts": rsn_views}, False)}}
    (out / "refs.json").write_text(json.dumps(refs))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out", type=Path)
    m.add_argument("--gen-family", default="llama")
    m.add_argument("--rsn-family", default="llama")
    m.add_argument("--lam", type=float, default=0.5)
    m.add_argument("--projection", default="pad")
    m.add_argument("--norm-target", default="vocab_mean")
    m.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("generate")
    g.add_argument("ckpt", type=Path)
    g.add_argument("requests", type=Path)
    g.add_argument("out", type=Path)
    g.add_argument("--generator-only", action="store_true")
    st = sub.add_parser("suite")
    st.add_argument("out", type=Path)
    tr = sub.add_parser("truncated")
    tr.add_argument("out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.cmd == "suite":
        suite(a.out)
    elif a.cmd == "truncated":
        truncated_suite(a.out)
    elif a.cmd == "make":
        make(a.out, a.gen_family, a.rsn_family, a.lam, a.projection, a.norm_target, a.seed)
    else:
        res = generate(a.ckpt, json.loads(a.requests.read_text()), a.generator_only)
        a.out.write_text(json.dumps(res))


if __name__ == "__main__":
    main()
