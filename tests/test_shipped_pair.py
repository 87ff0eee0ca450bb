"""The shipped personalised pair `smollm2-135m-persona-empathy` (flythinker/pretrained): it loads offline by name with
its trained tensors (the generator's merged LoRA, the fusion), and `flythinker demo` runs on it.

Issue 16's strategy check, in generated replies (the metric of the issue's targets): on 40 held-out records the pair
at its lambda opens its greedy reply the way the user wants more often than the same weights at lambda 0, by at least
STRATEGY_GAIN. Measured on the pair shipped before (c3): 77.5% against 60%, +17.5 points, below the issue's +20 on
this sample (over the benchmark's 100 users: +23 [+10, +35]); not yet measured here on the shipped c6 (+24 [+12, +36]
over the benchmark's 100 users, README, Results); the bar here is +10 points (4 records
of 40), which a pair whose reasoner carries nothing (a gain of 0) fails. The same check by likelihood preference (the
opening's summed NLL, bar +20) is tests/test_shipped_pair_likelihood.py: the (c6) pair passes it; the earlier (c3)
did not, so it was not part of `make test` before.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flythinker import FlyThinkerForCausalLM
from flythinker.models import load_tokenizer
from flythinker.pretrained import pair_info

pytestmark = pytest.mark.integration
NAME = "smollm2-135m-persona-empathy"
N_RECORDS = 40
STRATEGY_GAIN = 0.10  # see the module docstring: measured +0.175 on these records


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return FlyThinkerForCausalLM.from_pretrained(NAME).eval(), load_tokenizer(NAME)


def test_shipped_pair_loads_by_name_with_its_trained_tensors(shipped):
    from flythinker.hub import load_pretrained

    model, _ = shipped
    info = pair_info(NAME)
    for key, value in info["fusion"].items():
        assert getattr(model.config, key) == value
    assert model.latent_proj.weight.abs().max() > 0  # the trained projection, not a fresh zero one
    assert not torch.equal(model.latent_mean, torch.zeros_like(model.latent_mean))  # calibrated statistics
    base, _ = load_pretrained(info["base"])
    q = "model.layers.0.self_attn.q_proj.weight"
    # the generator carries the merged LoRA; the reasoner is SmolLM2 as shipped
    assert not torch.equal(model.generator.state_dict()[q], base.state_dict()[q])
    assert torch.equal(model.reasoner.state_dict()[q], base.state_dict()[q])
    k = info.get("reasoner_layers", base.config.num_hidden_layers)  # a truncated reasoner: the base's first k layers
    assert len(model.reasoner.model.layers) == k and len(model.generator.model.layers) == base.config.num_hidden_layers


@torch.no_grad()
def test_shipped_pair_personalises_the_strategy_of_its_replies(shipped):
    from model_helpers import left_pad

    from flythinker.persona import build_views, classify_response, make_persona_empathy

    model, tok = shipped
    info = pair_info(NAME)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # q3: records neither the benchmark's preference (q0-q2) nor its generation (q0) scored; users never trained on
    records = [r for r in make_persona_empathy()["test"] if r.record_id.endswith("-q3")][:N_RECORDS]
    assert len({r.user_id for r in records}) == N_RECORDS
    hits = {"pair": 0, "lambda 0": 0}
    for i in range(0, N_RECORDS, 10):
        recs = records[i:i + 10]
        views = [build_views(r, tok, mode="split", max_reasoner_tokens=info["max_reasoner_tokens"], warn=False)
                 for r in recs]
        g_ids, g_mask = left_pad([torch.tensor(v.generator_prompt_ids) for v in views], pad)
        r_ids, r_mask = left_pad([torch.tensor(v.reasoner_prompt_ids) for v in views], pad)
        kw = dict(attention_mask=g_mask, max_new_tokens=24, do_sample=False, pad_token_id=pad)
        outs = {"pair": model.generate(g_ids, reasoner_input_ids=r_ids, reasoner_attention_mask=r_mask, **kw),
                # the same weights at lambda 0 are exactly the pair's generator (tests/test_fusion_zero.py)
                "lambda 0": model.generator.generate(g_ids, **kw)}
        for label, out in outs.items():
            for r, seq in zip(recs, out[:, g_ids.shape[1]:]):
                opening = classify_response(tok.decode(seq, skip_special_tokens=True))["strategy"]
                hits[label] += opening == r.persona.traits["strategy"]
    acc = {label: n / N_RECORDS for label, n in hits.items()}
    print(f"strategy of greedy replies on {N_RECORDS} held-out records: {acc}")
    assert acc["pair"] - acc["lambda 0"] >= STRATEGY_GAIN, acc


def test_demo_runs_on_the_shipped_pair():
    """`flythinker demo` as `make demo` runs it (smaller): three replies per user and the live table."""
    out = subprocess.run([sys.executable, "-m", "flythinker.cli", "demo", "--users", "1", "--table-users", "4",
                          "--max-new-tokens", "24"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for label in ("generator alone", "fine-tuned, no latents", "flythinker", "likelihood preference over 4"):
        assert label in text, text[-3000:]
