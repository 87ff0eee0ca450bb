"""`flythinker judge` and `flythinker rl` end to end on tiny saved models (CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from grpo_helpers import import_trl

from flythinker.cli import main

import_trl()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from flythinker.persona import make_persona_empathy
    from flythinker.persona.wordlevel import word_tokenizer
    from flythinker.training.toy import tiny_config

    recs = make_persona_empathy(n_users=6, queries_per_user=1)["train"]
    tok = word_tokenizer([t.text for r in recs for t in r.history] + [r.query.text for r in recs]
                         + [r.response for r in recs] + ["Score : 1 2 3 4 5 Total / 100"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=32, vocab_size=len(tok),
                                                         num_hidden_layers=1))
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder, recs


def test_judge_command(tiny_folder, tmp_path, capsys):
    folder, recs = tiny_folder
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in recs[:3]))
    out = tmp_path / "scores.jsonl"
    # --min-score-mass 0: a random tiny judge puts little probability on the score tokens (default threshold 5%)
    assert main(["judge", str(data), "--rubric", "perm", "--judge-model", str(folder), "--out", str(out),
                 "--min-score-mass", "0"]) == 0
    text = capsys.readouterr().out
    assert "3 responses judged with perm (hf:" in text and "mode expected" in text
    for name in ("resonation", "expression", "reception", "bystander", "reward"):
        assert name in text
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all(1 <= r["scores"]["expression"] <= 5 and r["reward"] is not None for r in rows)
    # generate mode with a random tiny judge: unparsed outputs are counted in the summary, not scored
    assert main(["judge", str(data), "--rubric", "peregrm", "--judge-model", str(folder), "--mode", "generate",
                 "--max-new-tokens", "3", "--no-bystander", "--limit", "1", "--fixed-criteria"]) == 0
    text = capsys.readouterr().out
    assert "parse_failures" in text and "criteria_calls 3" in text and "items_without_reward 1" in text
    # the authors' rules: every failed trial becomes PereGRM's 0.6 fallback (counted), so the item has a reward
    assert main(["judge", str(data), "--rubric", "peregrm", "--judge-model", str(folder), "--mode", "generate",
                 "--max-new-tokens", "3", "--trials", "1", "--no-bystander", "--limit", "1", "--rules",
                 "authors"]) == 0
    text = capsys.readouterr().out
    assert "rules authors" in text and "fallbacks 3" in text and "items_without_reward 0" in text


def test_judge_command_errors(tiny_folder, tmp_path, capsys):
    folder, _ = tiny_folder
    assert main(["judge", str(tmp_path / "missing.jsonl")]) == 2
    bad = tmp_path / "noresp.jsonl"
    bad.write_text(json.dumps({"record_id": "a", "user_id": "u", "query": {"text": "hi"}}) + "\n")
    assert main(["judge", str(bad), "--judge-model", str(folder)]) == 2
    assert "no response" in capsys.readouterr().err
    assert main(["judge", str(bad), "--backend", "openai"]) == 2


def test_rl_command(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    out = tmp_path / "rl"
    assert main(["rl", "--generator", str(folder), "--steps", "1", "--group", "2", "--batch", "2",
                 "--max-completion", "4", "--limit", "4", "--lora", "--lr", "1e-3", "--reward", "trait",
                 "--reward", "length:0.5", "--length-limit", "1", "--out", str(out)]) == 0
    curve = [json.loads(x) for x in (out / "reward_curve.jsonl").read_text().splitlines()]
    assert len(curve) == 1 and "rewards/trait/mean" in curve[0] and "rewards/length_penalty/mean" in curve[0]
    assert any(p.suffix == ".safetensors" for p in (out / "model").iterdir())
    assert main(["rl", "--generator", str(folder), "--batch", "3", "--group", "2", "--out", str(out)]) == 2
    assert main(["rl", "--reward", "bogus", "--out", str(out)]) == 2
    assert main(["rl", "--rules", "lenient", "--out", str(out)]) == 2


def test_rl_generator_lora_reuses_reasoner_prompts(tiny_folder, tmp_path, capsys):
    """LoRA on the generator alone leaves the reasoner frozen: its prompt prefill is reused (and says so); asking
    for reuse where the reasoner trains is an error."""
    from safetensors import safe_open

    folder, _ = tiny_folder
    base = ["rl", "--generator", str(folder), "--steps", "1", "--group", "2", "--batch", "2", "--max-completion", "4",
            "--limit", "4", "--lora", "--lr", "1e-3"]
    assert main([*base, "--lora-models", "generator", "--out", str(tmp_path / "gen")]) == 0
    err = capsys.readouterr().err
    assert "reasoner prompt reuse: on" in err and "bypassed: none" in err
    assert int(err.split(" reused over ")[0].rsplit(" ", 1)[1]) > 0
    saved = list((tmp_path / "gen" / "model").glob("*.safetensors"))
    with safe_open(str(saved[0]), "pt") as f:
        lora = [k for k in f.keys() if "lora_" in k]
    assert lora and all(".generator." in k for k in lora)
    assert main([*base, "--reuse-reasoner-prompts", "on", "--out", str(tmp_path / "both")]) == 2
    assert "not valid" in capsys.readouterr().err
    assert main(["rl", "--lora-models", "generator", "--out", str(tmp_path / "x")]) == 2


def test_rl_run_folder_refused_resumed_and_overwritten(tiny_folder, tmp_path, capsys):
    """`rl --out` holds one run: a rerun is refused (it used to overwrite model/ and delete the reward curve),
    --resume continues from the newest checkpoint (no pickle in it), --overwrite starts over."""
    folder, _ = tiny_folder
    out = tmp_path / "rl"
    base = ["rl", "--generator", str(folder), "--group", "2", "--batch", "2", "--max-completion", "4", "--limit",
            "4", "--lr", "1e-3", "--reward", "length:0.5", "--length-limit", "1", "--out", str(out)]

    def steps():
        return [json.loads(x)["step"] for x in (out / "reward_curve.jsonl").read_text().splitlines()]

    assert main([*base, "--steps", "2", "--save-steps", "1"]) == 0
    assert steps() == [1, 2]
    assert sorted(p.name for p in (out / "trainer").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin")]
    model = (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*base, "--steps", "2"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").read_bytes() == model and steps() == [1, 2]
    assert main([*base, "--steps", "3", "--save-steps", "1", "--resume"]) == 0
    assert steps() == [1, 2, 3] and (out / "trainer" / "checkpoint-3").is_dir()
    assert main([*base, "--steps", "1", "--overwrite"]) == 0
    assert steps() == [1] and not list(out.glob("trainer/checkpoint-*"))
