"""Reasoner prompt reuse for GRPO groups (flythinker.reasoner_prefix_cache.PromptReuse, FlyThinkerGRPOTrainer's
`reuse_reasoner_prompts`): with a frozen reasoner each distinct reasoner prompt of a batch runs through the reasoner
once; log-probs, fusion gradients and sampled tokens equal those without reuse for groups of completions of
different lengths; the reasoner processes fewer tokens (counted by a hook on its decoder); prompts that differ in
one token never share entries past it; reuse is off (and says why) where it is not valid."""

from __future__ import annotations

import pytest
import torch
from grpo_helpers import import_trl
from model_helpers import left_pad, random_ids, tiny_lm, tiny_pair

import_trl()

from flythinker import FlyThinkerForCausalLM  # noqa: E402
from flythinker.reasoner_prefix_cache import PromptReuse, reusing_prompts  # noqa: E402
from flythinker.rl import TraitReward, grpo_rows  # noqa: E402
from flythinker.rl.trainer import FlyThinkerGRPOTrainer, GRPOConfig, completion_logps, train_only  # noqa: E402

G = 3  # completions per prompt


class ReasonerTokens:
    """Calls of the reasoner's decoder and the positions they process."""

    def __init__(self, model):
        self.calls = self.tokens = 0
        self.handle = model.reasoner.get_decoder().register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        self.calls += 1
        self.tokens += kwargs["input_ids"].numel()

    def reset(self):
        self.calls = self.tokens = 0


def _frozen_pair(**fusion):
    m = tiny_pair(projection="linear", **fusion)
    m.reasoner.requires_grad_(False)
    return m


def _group_batch(m, prompts, seed=0, K=6):
    """G sampled completions per reasoner prompt (generator prompts differ per group), their masks with
    completions of different lengths, and the reasoner prompts (left-padded)."""
    rows = [p for p in prompts for _ in range(G)]
    r_ids, r_mask = left_pad([torch.tensor(r) for r in rows])
    gen = [random_ids(1, 4 + i, seed=10 + i)[0] for i in range(len(prompts)) for _ in range(G)]
    g_ids, g_mask = left_pad(gen)
    torch.manual_seed(seed)
    out = m.generate(g_ids, attention_mask=g_mask, reasoner_input_ids=r_ids, reasoner_attention_mask=r_mask,
                     max_new_tokens=K, min_new_tokens=K, do_sample=True)
    comp = torch.ones(len(rows), K, dtype=torch.long)
    for i in range(len(rows)):  # completions of lengths K, K-1, ..., (an EOS and padding after it)
        comp[i, K - (i % G) * 2:] = 0
    return rows, g_ids, g_mask, r_ids, r_mask, out, torch.cat([g_mask, comp], 1), K


def test_logps_and_fusion_gradient_equal_with_fewer_reasoner_tokens():
    m = _frozen_pair()
    prompts = [random_ids(1, 9, seed=3)[0].tolist(), random_ids(1, 12, seed=4)[0].tolist()]
    rows, _, _, r_ids, r_mask, seq, mask, K = _group_batch(m, prompts)
    B, Q = r_ids.shape
    count = ReasonerTokens(m)

    def logps_and_grad():
        m.zero_grad()
        lp, _ = completion_logps(m, seq, mask, K, 1.0, r_ids, r_mask)
        (lp * mask[:, -K:]).sum().backward()
        return lp.detach(), m.model.latent_proj.weight.grad.clone()

    m.train()  # the loss forward's mode (the tiny models have no dropout)
    lp0, g0 = logps_and_grad()
    plain = count.tokens
    assert (count.calls, plain) == (1, B * (Q + K))  # the reasoner reads every prompt and every completion
    reuse = PromptReuse()
    assert reuse.begin(rows) == 2  # G copies of each prompt: two distinct ones
    count.reset()
    with reusing_prompts(m, reuse):
        lp1, g1 = logps_and_grad()
        fill = count.tokens - B * K
        lp2, g2 = logps_and_grad()  # a second forward of the batch (old policy / loss): the prompts are stored
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=0)  # bit-equal here (CPU fp32); tight elsewhere
    torch.testing.assert_close(lp2, lp0, atol=1e-6, rtol=0)
    torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g2, g0, atol=1e-6, rtol=1e-6)
    assert fill == 2 * max(map(len, prompts))  # each distinct prompt once (padded to the longest)
    assert count.tokens == fill + 2 * B * K < 2 * plain  # then the completions only, per forward
    assert reuse.stats.reused_tokens == 2 * G * sum(map(len, prompts)) and not reuse.stats.bypassed
    assert m.model.reasoner_prompt_reuse is None  # restored on exit
    count.handle.remove()


def test_generate_samples_the_same_tokens_without_a_prompt_prefill():
    m = _frozen_pair()
    prompts = [random_ids(1, 9, seed=3)[0].tolist(), random_ids(1, 12, seed=4)[0].tolist()]
    rows, g_ids, g_mask, r_ids, r_mask, seq, _, K = _group_batch(m, prompts, seed=1)
    reuse = PromptReuse()
    reuse.begin(rows)
    with reusing_prompts(m, reuse):
        reuse._store(m.model)  # fill first: the generate below then runs no reasoner prompt prefill
        count = ReasonerTokens(m)
        torch.manual_seed(1)
        again = m.generate(g_ids, attention_mask=g_mask, reasoner_input_ids=r_ids, reasoner_attention_mask=r_mask,
                           max_new_tokens=K, min_new_tokens=K, do_sample=True)
    assert torch.equal(again, seq)
    assert count.tokens == len(rows) * (K - 1)  # only the one-token decode steps (the last token is not fed)
    count.handle.remove()


def test_prompts_differing_in_one_token_share_only_the_tokens_before_it():
    m = _frozen_pair().eval()
    a = random_ids(1, 10, seed=5)[0].tolist()
    b = list(a)
    b[6] = a[6] + 1 if a[6] + 1 < m.vocab_size else 3  # one token differs, at position 6
    c = list(a)
    c[0] = a[0] + 1 if a[0] + 1 < m.vocab_size else 3  # differs in the first token
    comp = random_ids(1, 4, seed=6)[0].tolist()
    seqs = [a + comp, b + comp, c + comp]
    r_ids, r_mask = left_pad([torch.tensor(s) for s in seqs])
    r_pos = (r_mask.cumsum(1) - 1).clamp_min(0)
    plain = m.model.reasoner_forward(r_ids, r_mask, r_pos, None, False)
    reuse = PromptReuse()
    reuse.begin([a])  # only a is stored
    h = reuse.prompt_forward(m.model, r_ids[:2], r_mask[:2], r_pos[:2], None, False)
    torch.testing.assert_close(h, plain[:2], atol=1e-6, rtol=1e-6)  # b's row: a's entries up to position 6 only
    assert reuse.stats.reused_tokens == 2 * 6  # the common boundary: b's first 6 tokens (a's are not copied past)
    assert reuse.prompt_forward(m.model, r_ids[2:], r_mask[2:], r_pos[2:], None, False) is None  # nothing shared
    assert reuse.stats.bypassed == {"rows that do not start with a registered prompt": 1}
    reuse.begin([a, b])  # both stored: each row reads its own prompt's entries
    h = reuse.prompt_forward(m.model, r_ids[:2], r_mask[:2], r_pos[:2], None, False)
    torch.testing.assert_close(h, plain[:2], atol=1e-6, rtol=1e-6)
    assert reuse.stats.reused_tokens == 2 * 6 + 2 * 10


def test_bypassed_where_not_valid():
    m = tiny_pair()  # the reasoner trains: no reuse, the plain forward runs
    r_ids, r_mask = left_pad([random_ids(1, 8, seed=7)[0]])
    r_pos = (r_mask.cumsum(1) - 1).clamp_min(0)
    reuse = PromptReuse()
    reuse.begin([r_ids[0].tolist()])
    assert reuse.prompt_forward(m.model, r_ids, r_mask, r_pos, None, False) is None
    assert list(reuse.stats.bypassed) == ["not a frozen reasoner"]
    m.reasoner.requires_grad_(False)
    h = reuse.prompt_forward(m.model, r_ids, r_mask, r_pos, None, False)
    torch.testing.assert_close(h, m.model.reasoner_forward(r_ids, r_mask, r_pos, None, False), atol=1e-6, rtol=0)
    fills = reuse.stats.fills
    with torch.no_grad():  # another reasoner signature (changed weights): a new fill, never the stale entries
        next(m.reasoner.parameters()).mul_(1.5)
    h = reuse.prompt_forward(m.model, r_ids, r_mask, r_pos, None, False)
    assert reuse.stats.fills == fills + 1
    torch.testing.assert_close(h, m.model.reasoner_forward(r_ids, r_mask, r_pos, None, False), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- the trainer
def _setup(projection="linear", **rsn_overrides):
    from flythinker.persona import make_persona_empathy
    from flythinker.persona.wordlevel import word_tokenizer

    recs = make_persona_empathy(n_users=6, queries_per_user=2, history_sessions=(1, 1))["train"]
    tok = word_tokenizer([t.text for r in recs for t in r.history] + [r.query.text for r in recs]
                         + [r.response for r in recs])
    gen = tiny_lm(hidden_size=48, vocab_size=len(tok), seed=0)
    rsn = tiny_lm(hidden_size=32, vocab_size=len(tok), seed=1, **rsn_overrides)
    pair = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.5, parallel="off", projection=projection)
    return recs, tok, pair


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=6, max_steps=1, learning_rate=5e-2, logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def _run(tmp_path, reuse, **cfg):
    from datasets import Dataset

    recs, tok, pair = _setup()
    train_only(pair, ["fusion"])
    count = ReasonerTokens(pair)
    trainer = FlyThinkerGRPOTrainer(model=pair, reward_funcs=[TraitReward()], args=_config(tmp_path, **cfg),
                                    train_dataset=Dataset.from_list(grpo_rows(recs, tok, mode="split")),
                                    processing_class=tok, reuse_reasoner_prompts=reuse)
    seen = []
    orig = trainer._generate_and_score_completions

    def keep(inputs):
        out = orig(inputs)
        seen.append(out["completion_ids"].clone())
        return out

    trainer._generate_and_score_completions = keep
    trainer.train()
    return trainer, pair, count, seen


def test_grpo_step_with_reuse_equals_without(tmp_path):
    """One GRPO step (fusion only, beta > 0: the frozen reference copy reuses too): the same completions and
    the same trained projection with reuse, for fewer reasoner tokens."""
    on, pair_on, count_on, seen_on = _run(tmp_path / "on", None, beta=0.1)
    off, pair_off, count_off, seen_off = _run(tmp_path / "off", False, beta=0.1)
    assert on.reasoner_reuse and not off.reasoner_reuse and off.prompt_reuse is None
    assert "turned off" in off.reasoner_reuse_reason
    assert len(seen_on) == len(seen_off) == 1 and torch.equal(seen_on[0], seen_off[0])
    torch.testing.assert_close(pair_on.model.latent_proj.weight, pair_off.model.latent_proj.weight,
                               atol=1e-6, rtol=1e-6)
    st = on.prompt_reuse.stats
    assert st.fills == 2 and not st.bypassed  # the policy's reasoner and the reference's, once each
    assert st.forwards == 3  # generate, the reference's log-probs, the loss forward
    assert count_on.tokens < count_off.tokens


def test_reuse_decision(tmp_path):
    from datasets import Dataset

    recs, tok, pair = _setup()
    rows = Dataset.from_list(grpo_rows(recs, tok, mode="split"))
    make = lambda p, rows=rows, **kw: FlyThinkerGRPOTrainer(  # noqa: E731
        model=p, reward_funcs=[TraitReward()], args=_config(tmp_path), train_dataset=rows, processing_class=tok, **kw)
    t = make(pair)  # the whole pair trains, reasoner included
    assert not t.reasoner_reuse and "frozen" in t.reasoner_reuse_reason and t.prompt_reuse is None
    with pytest.raises(ValueError, match="not valid.*frozen"):
        make(pair, reuse_reasoner_prompts=True)
    train_only(pair, ["fusion"])
    t = make(pair)
    assert t.reasoner_reuse and isinstance(t.prompt_reuse, PromptReuse)
    shared = Dataset.from_list(grpo_rows(recs, tok, mode="shared"))
    t = make(pair, rows=shared)
    assert not t.reasoner_reuse and "shared context" in t.reasoner_reuse_reason
    _, _, drop = _setup(attention_dropout=0.1)
    train_only(drop, ["fusion"])
    t = make(drop)
    assert not t.reasoner_reuse and "dropout" in t.reasoner_reuse_reason
