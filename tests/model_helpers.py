"""Shared tiny-model helpers for FlyThinker tests (CPU, fp32, random weights; fast).

Import from tests: `from model_helpers import tiny_lm, tiny_pair, left_pad`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from flythinker import FlyThinkerForCausalLM
from flythinker.training.toy import tiny_config

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2


def tiny_lm(family: str = "llama", *, seed: int = 0, hidden_size: int = 32, vocab_size: int = VOCAB,
            attn_implementation: str = "eager", **overrides):
    """A random tiny causal LM of `family` (llama, qwen2, mistral, gemma, ...) in eval mode, fp32, CPU.

    Weights are re-drawn with a larger std than HF's 0.02 so that the logits are far from uniform (greedy ties
    would make token comparisons fragile)."""
    cfg = tiny_config(family, hidden_size=hidden_size, vocab_size=vocab_size, **overrides)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


def tiny_pair(gen_family: str = "llama", rsn_family: str | None = None, *, seed: int = 0, gen_hidden: int = 48,
              rsn_hidden: int = 32, **fusion) -> FlyThinkerForCausalLM:
    """A FlyThinker pair of two tiny random LMs sharing the vocabulary (default lam 0.5, pad projection)."""
    gen = tiny_lm(gen_family, seed=seed, hidden_size=gen_hidden)
    rsn = tiny_lm(rsn_family or gen_family, seed=seed + 1, hidden_size=rsn_hidden)
    fusion.setdefault("fusion_lambda", 0.5)
    fusion.setdefault("parallel", "off")
    fusion.setdefault("projection", "pad")
    return FlyThinkerForCausalLM.from_pair(gen, rsn, **fusion).eval()


def randomise_adapters(model, seed: int = 0, scale: float = 0.3, a_too: bool = False) -> None:
    """New random adapters on both halves of a shared-base pair, in place (copy_: the parameter objects stay, their
    versions move): B ~ N(0, scale^2), and A ~ N(0, 0.09) too with `a_too`."""
    from flythinker.shared_base import adapters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for half in (model.generator, model.reasoner):
            for a in adapters(half).values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * scale)
                if a_too:
                    a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g) * 0.3)


def random_ids(B: int, T: int, *, seed: int = 0, vocab_size: int = VOCAB, low: int = 3) -> torch.Tensor:
    """Random token ids `[B, T]` avoiding the special ids 0..2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (B, T), generator=g)


def left_pad(rows: list[torch.Tensor], pad_id: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """flythinker.decode.left_pad with these tests' pad id by default: `(ids [B, L], mask [B, L])`."""
    from flythinker.decode import left_pad as pad_rows

    return pad_rows(rows, pad_id)


def split_inputs(batch: int, split: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(ids, mask, extra forward kwargs) for up to 3 left-padded rows of 9/13/5 tokens; with `split`, reasoner
    views of 20/7/15 tokens as `reasoner_input_ids` / `reasoner_attention_mask`."""
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (9, 13, 5)[:batch]])
    if not split:
        return ids, mask, {}
    rids, rmask = left_pad([random_ids(1, n, seed=n + 50)[0] for n in (20, 7, 15)[:batch]])
    return ids, mask, {"reasoner_input_ids": rids, "reasoner_attention_mask": rmask}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread while a test module runs (restored after). Tiny matmuls on 2 shared, oversubscribed cores
    are ~35x slower with 2 OpenMP threads (measured: 1.25 ms vs 34 us for a [10, 48] x [48, 128] linear at load
    average 12). Import it into a test module to use it: `from model_helpers import single_thread  # noqa: F401`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
