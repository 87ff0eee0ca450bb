"""GRPO through TRL on a tiny FlyThinker pair: rewards, log-probs through the fusion (equal to generate's), a 2-step
run in split context whose reward is computed and whose parameters change, LoRA + reference model (beta > 0) +
gradient accumulation, and the refused fast paths."""

from __future__ import annotations

import json

import pytest
import torch
from grpo_helpers import import_trl
from model_helpers import left_pad, random_ids, single_thread, tiny_lm, tiny_pair  # noqa: F401

import_trl()

from flythinker import FlyThinkerForCausalLM  # noqa: E402
from flythinker.persona import make_persona_empathy  # noqa: E402
from flythinker.persona.wordlevel import word_tokenizer  # noqa: E402
from flythinker.rl import LengthPenalty, TraitReward, combine_rewards, grpo_rows  # noqa: E402
from flythinker.rl.trainer import FlyThinkerGRPOTrainer, GRPOConfig, completion_logps  # noqa: E402
from flythinker.training.trainable import part_of  # noqa: E402


def test_trait_reward_and_length_penalty():
    r = TraitReward()
    traits = [json.dumps({"strategy": "validation", "length": "short", "register": "casual"})] * 2
    good = "oh no , that really sucks . just tell them you felt kinda left out ."
    bad = ("Here is a practical plan . Request a brief meeting with your manager to discuss the feedback . Write "
           "down the specific points that were raised . Prepare a revised version of the work and share it .")
    assert r(completions=[good, bad], traits=traits) == [1.0, 0.0]
    assert TraitReward(("strategy",))(completions=[[{"role": "assistant", "content": good}]],
                                      traits=traits[:1]) == [1.0]
    with pytest.raises(ValueError, match="traits"):
        r(completions=[good])
    with pytest.raises(ValueError):
        TraitReward(("humour",))
    lp = LengthPenalty(limit=3, coef=0.5)
    assert lp(completions=["a", "b"], completion_ids=[[1, 2], [1, 2, 3, 4, 5]]) == [0.0, -1.0]
    both = combine_rewards([(r, 1.0), (lp, 2.0)])
    assert both(completions=[good, bad], completion_ids=[[1], [1, 2, 3, 4]], traits=traits) == [1.0, -1.0]
    none = combine_rewards([(lambda **k: [None, 1.0], 1.0), (lp, 1.0)])
    assert none(completions=["a", "b"], completion_ids=[[1], [1]]) == [None, 1.0]


@pytest.mark.parametrize("split", [True, False])
def test_completion_logps_match_generate(split):
    """The trainer's log-probs (one training-path forward) equal the scores generate sampled from."""
    m = tiny_pair()
    g_ids, g_mask = left_pad([random_ids(1, 5, seed=1)[0], random_ids(1, 3, seed=2)[0]])
    r_ids, r_mask = left_pad([random_ids(1, 9, seed=3)[0], random_ids(1, 12, seed=4)[0]])
    kw = {"reasoner_input_ids": r_ids, "reasoner_attention_mask": r_mask} if split else {}
    out = m.generate(g_ids, attention_mask=g_mask, max_new_tokens=6, do_sample=False, output_scores=True,
                     return_dict_in_generate=True, **kw)
    K = out.sequences.shape[1] - g_ids.shape[1]
    ref = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
    ref = torch.gather(ref, -1, out.sequences[:, -K:, None]).squeeze(-1)
    mask = torch.cat([g_mask, torch.ones(2, K, dtype=torch.long)], 1)
    lp, ent = completion_logps(m, out.sequences, mask, K, 1.0, r_ids if split else None,
                               r_mask if split else None, compute_entropy=True)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    assert ent.shape == (2, K) and bool((ent > 0).all())
    assert m.config.loss_impl == "fused"  # restored after the call
    if split:  # the reasoner prompt matters: another one changes the log-probs
        other = completion_logps(m, out.sequences, mask, K, 1.0, r_ids.flip(1), r_mask.flip(1))[0]
        assert not torch.allclose(other, lp)


def _setup(n_users: int = 6):
    recs = make_persona_empathy(n_users=n_users, queries_per_user=2, history_sessions=(1, 1))["train"]
    tok = word_tokenizer([t.text for r in recs for t in r.history] + [r.query.text for r in recs]
                         + [r.response for r in recs])
    gen = tiny_lm(hidden_size=48, vocab_size=len(tok), seed=0)
    rsn = tiny_lm(hidden_size=32, vocab_size=len(tok), seed=1)
    pair = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.5, parallel="off", projection="pad")
    return recs, tok, pair


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, max_steps=2, learning_rate=5e-3, logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def test_grpo_two_steps_split_context(tmp_path):
    from datasets import Dataset

    recs, tok, pair = _setup()
    rows = grpo_rows(recs, tok, mode="split")
    assert rows[0]["reasoner_prompt_ids"] != rows[0]["prompt_ids"]
    calls = []

    def spy(completions, traits, **kw):
        calls.append((len(completions), kw.get("reasoner_prompt_ids") is not None))
        return TraitReward()(completions=completions, traits=traits)

    spy.__name__ = "trait_spy"
    before = {n: p.detach().clone() for n, p in pair.named_parameters()}
    trainer = FlyThinkerGRPOTrainer(model=pair, reward_funcs=[spy], args=_config(tmp_path),
                                    train_dataset=Dataset.from_list(rows), processing_class=tok)
    seen = []
    orig = trainer._get_per_token_logps_and_entropies

    def watch(*a, **k):
        seen.append(trainer._reasoner is not None)
        return orig(*a, **k)

    trainer._get_per_token_logps_and_entropies = watch
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2 and all(0.0 <= h["reward"] <= 1.0 for h in logs)
    assert calls == [(4, True), (4, True)]  # the reward ran on every completion, with the dataset columns
    assert seen and all(seen)  # every log-prob forward had the reasoner prompts
    changed = {part_of(n) for n, p in pair.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {"generator", "reasoner"}


def test_grpo_lora_reference_and_accumulation(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig

    recs, tok, pair = _setup()
    rows = grpo_rows(recs, tok, mode="split")
    base = {n: p.detach().clone() for n, p in pair.named_parameters()}
    cfg = _config(tmp_path, beta=0.1, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = FlyThinkerGRPOTrainer(model=pair, reward_funcs=[TraitReward()], args=cfg,
                                    train_dataset=Dataset.from_list(rows), processing_class=tok,
                                    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None  # PEFT: the reference is the adapter-free base
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2 and all("kl" in h for h in logs)
    lora_after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(v, lora_after[n].detach()) for n, v in lora_before.items())
    for n, p in pair.named_parameters():  # the base weights stay frozen under LoRA
        if n in base:
            assert torch.equal(base[n], p.detach()), n
    assert any(".reasoner." in n for n in lora_before) and any(".generator." in n for n in lora_before)


def test_grpo_full_model_reference_copy(tmp_path):
    from datasets import Dataset

    recs, tok, pair = _setup()
    rows = grpo_rows(recs, tok, mode="shared")
    trainer = FlyThinkerGRPOTrainer(model=pair, reward_funcs=[TraitReward()], args=_config(tmp_path, beta=0.1,
                                                                                           max_steps=1),
                                    train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert isinstance(trainer.ref_model, FlyThinkerForCausalLM) and trainer.ref_model is not pair
    ref_w = trainer.ref_model.generator.get_input_embeddings().weight.detach().clone()
    trainer.train()
    assert [h for h in trainer.state.log_history if "kl" in h]
    assert torch.equal(ref_w, trainer.ref_model.generator.get_input_embeddings().weight)  # frozen
    assert not torch.equal(ref_w, pair.generator.get_input_embeddings().weight)  # the policy moved


@pytest.mark.parametrize("flag", ["use_liger_kernel", "use_vllm"])
def test_fast_paths_refused(tmp_path, flag):
    from datasets import Dataset

    recs, tok, pair = _setup(3)
    cfg = _config(tmp_path)
    object.__setattr__(cfg, flag, True)
    with pytest.raises(ValueError, match="fusion|reasoner"):
        FlyThinkerGRPOTrainer(model=pair, reward_funcs=[TraitReward()], args=cfg,
                              train_dataset=Dataset.from_list(grpo_rows(recs, tok)), processing_class=tok)
    with pytest.raises(TypeError, match="FlyThinkerForCausalLM"):
        FlyThinkerGRPOTrainer(model=tiny_lm(), reward_funcs=[TraitReward()], args=_config(tmp_path))


def test_rows_and_held_out_report():
    from flythinker.rl import bootstrap_ci, paired_bootstrap_diff, strategy_report

    recs, tok, _ = _setup(3)
    split, shared = grpo_rows(recs, tok, mode="split"), grpo_rows(recs, tok, mode="shared")
    assert "reasoner_prompt_ids" not in shared[0] and len(split[0]["reasoner_prompt_ids"]) > len(split[0]["prompt_ids"])
    assert json.loads(split[0]["traits"]) == recs[0].persona.traits
    rep = strategy_report([r.response for r in recs], split)  # the reference replies match every trait
    assert rep["strategy_accuracy"]["mean"] == 1.0 and rep["per_record"] == [1.0] * len(recs)
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5, 0.5)
    m, lo, hi = bootstrap_ci([0, 1] * 20)
    assert m == 0.5 and lo < 0.5 < hi and hi - lo < 0.4
    assert lo == pytest.approx(0.5 - 1.96 * 0.5 / 40 ** 0.5, abs=0.03)  # the normal approximation's interval
    assert hi == pytest.approx(0.5 + 1.96 * 0.5 / 40 ** 0.5, abs=0.03)
    assert bootstrap_ci([3.0]) == (3.0, 3.0, 3.0)
    assert paired_bootstrap_diff([0, 0, 1], [1, 1, 1])[0] == pytest.approx(2 / 3)


def test_judge_reward_reads_dataset_columns():
    from flythinker.empathy import CallableJudgeBackend, EmpathyJudge, get_rubric
    from flythinker.rl import JudgeReward

    recs, tok, _ = _setup(3)
    rows = grpo_rows(recs[:2], tok)
    seen = []

    def fn(messages):
        seen.append(messages[-1]["content"])
        return "Total Score: 100/100" if "Total Score" in messages[-1]["content"] else "Score: 5"

    reward = JudgeReward(EmpathyJudge(get_rubric("perm", analysis=False), CallableJudgeBackend(fn)))
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    assert reward(prompts=[r["prompt"] for r in rows], completions=["ok", "fine"], **cols) == [1.0, 1.0]
    assert reward.__name__ == "perm_judge"
    assert any(rows[0]["query"] in s for s in seen)  # the judge saw the row's query
    with pytest.raises(ValueError, match="query"):
        reward(completions=["ok"])


def test_train_only_the_fusion(tmp_path):
    from datasets import Dataset

    from flythinker.rl.trainer import train_only

    recs, tok, _ = _setup()
    with pytest.raises(ValueError, match="no parameter"):
        train_only(_setup()[2], ["fusion"])  # a 'pad' projection has nothing to learn
    gen = tiny_lm(hidden_size=48, vocab_size=len(tok), seed=0)
    rsn = tiny_lm(hidden_size=32, vocab_size=len(tok), seed=1)
    pair = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.5, parallel="off", projection="linear")
    assert train_only(pair, ["fusion"]) == 32 * 48
    before = {n: p.detach().clone() for n, p in pair.named_parameters()}
    trainer = FlyThinkerGRPOTrainer(model=pair, reward_funcs=[TraitReward()], args=_config(tmp_path, max_steps=1),
                                    train_dataset=Dataset.from_list(grpo_rows(recs, tok, mode="split")),
                                    processing_class=tok)
    trainer.train()
    changed = {n for n, p in pair.named_parameters() if not torch.equal(before[n], p.detach())}
    assert {n.rsplit(".", 2)[-2] for n in changed} == {"latent_proj"}  # only the fusion trained
    with pytest.raises(ValueError, match="subset"):
        train_only(pair, ["everything"])
