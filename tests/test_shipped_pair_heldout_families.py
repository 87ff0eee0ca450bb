"""The shipped pair on persona-empathy v2 users whose phrasing families it never trained on, by likelihood.

Over 40 held-out records (40 v2 test-split users, query 4: records the benchmark does not score), the likelihood
preference (flythinker.persona.preference: the reply for the user's traits against the same reply with the trait
flipped, by the NLL of its opening) of the pair at its lambda must exceed that of the same weights at lambda 0 by
>= 20 points on strategy, through the public split-context forward.

The pair shipped today was trained on persona-empathy v1 and does not meet it: a strict xfail that records the miss
(benchmarks/results/personalization_v2_shipped_v1.json) and fails once a pair that meets it is shipped, so that the
marker is removed then.
"""

from __future__ import annotations

import pytest
import torch

from flythinker import FlyThinkerForCausalLM
from flythinker.hub import load_tokenizer
from flythinker.persona import load_dataset
from flythinker.persona.preference import accuracy, preference
from flythinker.pretrained import pair_info

pytestmark = pytest.mark.integration
NAME = "smollm2-135m-persona-empathy"
N_RECORDS = 40


@pytest.mark.xfail(strict=True, reason="the shipped pair was trained on persona-empathy v1; on v2's held-out "
                   "phrasing families it is near lambda 0 (benchmarks/results/personalization_v2_shipped_v1.json)")
def test_shipped_pair_beats_lambda0_on_held_out_phrasing_families():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = FlyThinkerForCausalLM.from_pretrained(NAME).eval()
    tok = load_tokenizer(NAME)
    info = pair_info(NAME)
    records = [r for r in load_dataset("persona-empathy", "test", version=2) if r.record_id.endswith("-q4")]
    records = records[:N_RECORDS]
    assert len({r.user_id for r in records}) == N_RECORDS
    kw = dict(max_reasoner_tokens=info["max_reasoner_tokens"])
    acc = accuracy(preference(model, tok, records, ("strategy", "register"), **kw))
    acc0 = accuracy(preference(model.generator, tok, records, ("strategy", "register"), **kw))  # = lambda 0
    print(f"held-out families: at lambda {model.config.fusion_lambda}: {acc}; at lambda 0: {acc0}")
    assert acc["strategy"] - acc0["strategy"] >= 0.20, (acc, acc0)
