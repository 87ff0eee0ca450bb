"""flythinker.evaluation and `flythinker eval`: per-user scores, bootstrap intervals, pair vs lambda 0 vs a
baseline (tiny random models, persona-empathy v2 records)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flythinker import FlyThinkerForCausalLM
from flythinker.evaluation import evaluate_pair, format_table, paired, user_bootstrap
from flythinker.evaluation.scoring import reply_nll, spaced_punctuation, trait_hits
from flythinker.persona import make_persona_empathy, save_records
from flythinker.persona.empathy_v2 import make_persona_empathy_v2
from flythinker.persona.wordlevel import word_tokenizer
from flythinker.training.toy import tiny_config


@pytest.fixture(scope="module")
def setup():
    recs = make_persona_empathy_v2(n_users=20, queries_per_user=2)["test"][:6]
    texts = [t.text for r in recs for t in r.history] + [r.query.text for r in recs] + [r.response for r in recs]
    tok = word_tokenizer(texts)
    torch.manual_seed(0)
    gen = AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tok), num_hidden_layers=1)).eval()
    rsn = AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tok), num_hidden_layers=1)).eval()
    pair = FlyThinkerForCausalLM.from_pair(gen, rsn, projection="zero", fusion_lambda=1.0, parallel="off").eval()
    return recs, tok, pair


def test_user_bootstrap_interval_and_degenerate_cases():
    s = user_bootstrap([0.0, 1.0] * 20)
    assert s["mean"] == 0.5 and s["ci95"][0] < 0.5 < s["ci95"][1] and s["users"] == 40
    assert user_bootstrap([1.0, 1.0, 1.0])["ci95"] == [1.0, 1.0]
    d = paired({"a": 1.0, "b": 1.0, "c": 0.0}, {"a": 0.0, "b": 0.0, "c": 0.0, "z": 5.0})
    assert d["users"] == 3 and abs(d["mean"] - 2 / 3) < 1e-9
    with pytest.raises(ValueError):
        user_bootstrap([])


def test_trait_metric_and_spaced_punctuation():
    v1 = make_persona_empathy(n_users=6)["train"][0]
    assert trait_hits(v1.response, v1) == {"strategy": 1.0, "length": 1.0, "register": 1.0}
    assert spaced_punctuation("oh no , that really sucks .") and not spaced_punctuation("Oh no, that sucks.")


@torch.no_grad()
def test_zero_pair_equals_lambda0_and_a_trained_projection_does_not(setup):
    recs, tok, pair = setup
    report = evaluate_pair(pair, tok, recs, baseline=(pair.generator, "full"), generate=True, max_new_tokens=3)
    s = report["summary"]
    assert set(s) == {"pair", "lambda0", "baseline"} and report["users"] == len({r.user_id for r in recs})
    assert s["pair"]["nll_per_token"]["mean"] == pytest.approx(s["lambda0"]["nll_per_token"]["mean"], abs=1e-5)
    assert {"rouge_l", "strategy", "register", "length"} <= set(s["pair"])
    assert "pair-baseline" in report["differences"] and "nll_per_token" in format_table(report)
    with torch.no_grad():
        pair.latent_proj.weight.normal_(0, 0.5)
    try:
        a = reply_nll(pair, tok, recs, context="split")
        from flythinker.evaluation import fusion_lambda

        with fusion_lambda(pair, 0.0):
            b = reply_nll(pair, tok, recs, context="split")
    finally:
        pair.latent_proj.weight.zero_()
    assert any(abs(x["nll"] - y["nll"]) > 1e-4 for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="split"):
        reply_nll(pair.generator, tok, recs, context="split")


def test_cli_eval_writes_json_and_plot(setup, tmp_path, capsys):
    from flythinker.cli import main

    recs, tok, pair = setup
    pair.save_pretrained(tmp_path / "pair")
    tok.save_pretrained(tmp_path / "pair")
    pair.generator.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    save_records(recs, tmp_path / "recs.jsonl")
    rc = main(["eval", "--model", str(tmp_path / "pair"), "--data", str(tmp_path / "recs.jsonl"), "--baseline",
               str(tmp_path / "base"), "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "lambda0" in out and "pair-baseline" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["records"] == len(recs) and (tmp_path / "r.png").stat().st_size > 1000
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    assert main(["eval", "--model", str(tmp_path / "pair"), "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert main(["eval", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "recs.jsonl")]) == 2


def test_eval_and_recipe_read_records_through_one_loader(setup, tmp_path):
    """`flythinker eval` and `train --recipe` share `cli.common.reply_records`: a record without a reply is refused
    with one line naming the command, a bundled spec is read, and `select` (eval's --limit) applies before the
    check."""
    import dataclasses

    from flythinker.cli.common import CLIError, reply_records

    recs = setup[0]
    save_records([dataclasses.replace(recs[0], response=None), *recs[1:]], tmp_path / "noreply.jsonl")
    with pytest.raises(CLIError, match=r"^eval: .* 1 without a reference reply"):
        reply_records(str(tmp_path / "noreply.jsonl"), "eval")
    assert len(reply_records(str(tmp_path / "noreply.jsonl"), "eval", lambda rs: rs[1:])) == len(recs) - 1
    assert len(reply_records("bundled:persona-empathy@2:validation", "eval", lambda rs: rs[:3])) == 3
    with pytest.raises(CLIError, match="data file not found"):
        reply_records(str(tmp_path / "absent.jsonl"), "eval")
