"""The shipped pair's CI check by likelihood preference. Measured on the pair shipped now ((c6), 240 stage-2 steps;
docs/results.md): strategy 87.5% at lambda 1 against 42.5% at lambda 0, +45 points (bar +20), register 100% vs
57.5% (the 120-step (c6) pair: +27.5).

The shipped personalised pair `smollm2-135m-persona-empathy` (flythinker/pretrained): it loads offline by name,
and on held-out persona-empathy users its reasoner measurably carries the user's strategy.

The check: over 40 held-out records (40 test-split users; the pair was trained on train-split users),
the likelihood-preference strategy accuracy (flythinker.persona.preference: the reply for the user's traits
against the same reply with `strategy` flipped, by the summed NLL of its opening) of the pair at its lambda
exceeds that of the same weights at lambda = 0 (the generator alone) by >= 20 points, through the public
split-context forward.
"""

from __future__ import annotations

import pytest
import torch

from flythinker import FlyThinkerForCausalLM
from flythinker.hub import load_tokenizer
from flythinker.persona import make_persona_empathy
from flythinker.persona.preference import accuracy, preference
from flythinker.pretrained import pair_info

pytestmark = pytest.mark.integration
NAME = "smollm2-135m-persona-empathy"
N_RECORDS = 40


def test_shipped_pair_loads_by_name_and_its_reasoner_carries_the_strategy():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = FlyThinkerForCausalLM.from_pretrained(NAME).eval()
    tok = load_tokenizer(NAME)
    info = pair_info(NAME)
    assert model.config.projection == info["fusion"]["projection"] == "zero"
    lam = model.config.fusion_lambda
    assert lam == info["fusion"]["fusion_lambda"] and lam > 0
    assert model.latent_proj.weight.abs().max() > 0  # the trained projection, not a fresh zero one
    # q3: records neither the benchmark's preference (q0-q2) nor its generation (q0) scored
    records = [r for r in make_persona_empathy()["test"] if r.record_id.endswith("-q3")][:N_RECORDS]
    assert len({r.user_id for r in records}) == N_RECORDS
    kw = dict(max_reasoner_tokens=info["max_reasoner_tokens"])
    traits = ("strategy", "register")
    acc = accuracy(preference(model, tok, records, traits, **kw))
    # the same weights at lambda = 0 are exactly the pair's generator (tests/test_fusion_zero.py): score it directly,
    # which skips a second reasoner pass over every history
    acc0 = accuracy(preference(model.generator, tok, records, traits, **kw))
    print(f"preference at lambda {lam}: {acc}; at lambda 0: {acc0} ({N_RECORDS} held-out records)")
    acc, acc0 = acc["strategy"], acc0["strategy"]
    assert acc - acc0 >= 0.20, (acc, acc0)
