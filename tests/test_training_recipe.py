"""flythinker.training.recipe: the pretrained-pair recipe's building blocks and the named recipe (tiny models)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flythinker.persona import make_persona_empathy
from flythinker.persona.wordlevel import word_tokenizer
from flythinker.training.collator import FlyThinkerCollator
from flythinker.training.recipe import (
    RECIPES,
    PairRecipe,
    RepeatedPermutationSampler,
    build_pair,
    record_features,
    run_recipe,
    save_pair_deltas,
)
from flythinker.training.toy import tiny_config


@pytest.fixture(scope="module")
def setup():
    data = make_persona_empathy(n_users=12, queries_per_user=2)
    recs = data["train"][:8]
    texts = [t.text for r in recs for t in r.history] + [r.query.text for r in recs] + [r.response for r in recs]
    tok = word_tokenizer(texts)
    return recs, tok


def _lm(tok, seed):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tok), num_hidden_layers=2)).eval()


TINY = PairRecipe(stage1_steps=2, stage2_steps=8, batch_size=2, warmup_steps=1, calibration_batches=2,
                  lora_rank=2, lora_targets=("q_proj", "v_proj"), max_reasoner_tokens=120)


def test_recipe_validates_its_numbers():
    assert RECIPES["persona-pair"].stage2_steps == 240
    with pytest.raises(ValueError, match="stage2_steps"):
        PairRecipe(stage2_steps=0)
    with pytest.raises(ValueError, match="calibrate_on"):
        PairRecipe(calibrate_on="middle")


@torch.no_grad()
def test_built_pair_starts_exactly_at_its_generator(setup):
    recs, tok = setup
    gen = _lm(tok, 0)
    ref = _lm(tok, 0)
    pair = build_pair(gen, _lm(tok, 1), TINY).eval()
    batch = FlyThinkerCollator(tokenizer=tok, add_eos=True)(record_features(recs[:2], tok, TINY, "split"))
    plain = FlyThinkerCollator(tokenizer=tok, add_eos=True)(record_features(recs[:2], tok, TINY, "generator"))
    out = pair(**batch, use_cache=False).logits
    want = ref(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
    # the pair's logits on the generator's positions equal the generator's own (zero projection, LoRA B = 0)
    mask = plain["attention_mask"].bool()
    torch.testing.assert_close(out[batch["attention_mask"].bool()], want[mask], atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for p in pair.reasoner.parameters())


def test_sampler_repeats_one_permutation():
    s = RepeatedPermutationSampler(10, seed=3)
    assert list(s) == list(s) and sorted(s) == list(range(10))
    assert list(RepeatedPermutationSampler(10, seed=4)) != list(s)


def test_run_recipe_trains_both_stages_and_reuses_latents(setup, tmp_path):
    recs, tok = setup
    model, _, report = run_recipe(_lm(tok, 0), _lm(tok, 1), recs, TINY, output_dir=tmp_path, tokenizer=tok,
                                  log=lambda _: None)
    assert len(report["stage1"]["losses"]) == 2 and len(report["stage2"]["losses"]) == 8
    assert all(torch.isfinite(torch.tensor(report["stage2"]["losses"])))
    # 8 records / batch 2 = 4 distinct batches, 8 steps: the second pass reads the stored latents
    assert report["stage2"]["reasoner_cache"] == {"misses": 4, "hits": 4}
    assert model.latent_proj.weight.abs().sum() > 0  # the zero projection learned
    lora_b = [p for n, p in model.generator.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    saved = json.loads((tmp_path / "recipe_report.json").read_text())
    assert saved["recipe"]["stage2_steps"] == 8 and saved["calibration"]["latents"] > 0
    folder = save_pair_deltas(model, tmp_path / "ship", TINY, base="tiny")
    tensors = load_file(folder / "deltas.safetensors")
    assert any(k.endswith("lora_A") for k in tensors) and "latent_proj.weight" in tensors
    assert json.loads((folder / "pair.json").read_text())["fusion"]["projection"] == "zero"


def test_recipe_with_a_reasoner_lora_starts_at_the_generator_and_trains_the_reasoner_top_layers(setup, tmp_path):
    """``reasoner_lora_rank``: a zero-initialised LoRA on the reasoner's top layers only, the pair still computes its
    generator's logits at step 0; stage 2 trains it at its own rate (no latent cache: the reasoner changes) and the
    shipped-pair format, which carries the generator's LoRA only, refuses the result."""
    from flythinker.training.recipe import stage2_parts

    recs, tok = setup
    recipe = TINY.replace(reasoner_lora_rank=2, reasoner_lora_layers=1, reasoner_lr=5e-3)
    assert stage2_parts(recipe) == ("generator", "projection", "reasoner")
    with pytest.raises(ValueError, match="reasoner_lora_rank"):
        TINY.replace(reasoner_lora_rank=-1)
    pair = build_pair(_lm(tok, 0), _lm(tok, 1), recipe).eval()
    trainable = [n for n, p in pair.reasoner.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n and "lora_" in n for n in trainable)  # top layer of 2 only
    batch = FlyThinkerCollator(tokenizer=tok, add_eos=True)(record_features(recs[:2], tok, recipe, "split"))
    plain = FlyThinkerCollator(tokenizer=tok, add_eos=True)(record_features(recs[:2], tok, recipe, "generator"))
    with torch.no_grad():
        out = pair(**batch, use_cache=False).logits
        want = _lm(tok, 0)(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
    torch.testing.assert_close(out[batch["attention_mask"].bool()], want[plain["attention_mask"].bool()],
                               atol=1e-5, rtol=1e-5)
    model, _, report = run_recipe(_lm(tok, 0), _lm(tok, 1), recs, recipe, output_dir=tmp_path, tokenizer=tok,
                                  log=lambda _: None)
    assert "reasoner_cache" not in report["stage2"]
    lora_b = [p for n, p in model.reasoner.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    with pytest.raises(ValueError, match="generator's LoRA only"):
        save_pair_deltas(model, tmp_path / "ship", recipe, base="tiny")


def test_stage2_uses_per_part_learning_rates(setup, tmp_path):
    from flythinker.training.recipe import _trainer_class

    recs, tok = setup
    pair = build_pair(_lm(tok, 0), _lm(tok, 1), TINY)
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, use_cpu=True, report_to="none")
    trainer = _trainer_class()(model=pair, args=args, train_dataset=[{}], part_lrs={"projection": 5e-3})
    opt = trainer.create_optimizer()
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [1e-4, 5e-3]


def test_cli_train_recipe_saves_a_loadable_pair_and_the_shipped_format(tmp_path, capsys):
    from flythinker.cli import main as cli_main
    from flythinker.modeling import FlyThinkerForCausalLM

    args = [*_cli_recipe_args(tmp_path), "--stage1-steps", "1", "--stage2-steps", "2", "--ship-dir",
            str(tmp_path / "ship")]
    assert cli_main(args) == 0
    model = FlyThinkerForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert model.config.projection == "zero" and model.config.latent_norm == "standardize"
    assert (tmp_path / "ship" / "deltas.safetensors").is_file()
    report = json.loads((tmp_path / "out" / "recipe_report.json").read_text())
    assert len(report["stage2"]["losses"]) == 2
    capsys.readouterr()
    assert cli_main([*args[:2], "nope", *args[3:]]) == 2
    assert "unknown --recipe 'nope'" in capsys.readouterr().err


def test_retrain_shipped_runs_the_recipe_on_the_data_pair_json_names(tmp_path):
    from flythinker.training.recipe import retrain_shipped
    from flythinker.training.toy import save_tiny_model

    base = save_tiny_model(tmp_path / "base", seed=0, hidden_size=32, max_position_embeddings=4096,
                           num_hidden_layers=1)
    spec = {"train_users": 4, "per_user": 1, "changes": {"stage1_steps": 1, "stage2_steps": 1, "batch_size": 2,
                                                         "calibration_batches": 1, "lora_rank": 2,
                                                         "lora_targets": ("q_proj",), "max_reasoner_tokens": 4000}}
    info = {"base": str(base), "trained": "x", "recipe_spec": spec}
    folder = retrain_shipped(info, tmp_path / "out", log=lambda _: None)
    pair = json.loads((folder / "pair.json").read_text())
    assert pair["recipe_spec"]["train_users"] == 4 and pair["base"] == str(base)
    report = json.loads((folder / "run" / "recipe_report.json").read_text())
    assert report["records"] == 4 and report["users"] == 4


def test_cli_recipe_reads_a_bundled_data_set_and_selects_users(tmp_path, capsys):
    """`--data bundled:NAME@VERSION:SPLIT` + `--users/--per-user`: the records the recipe trains on."""
    from flythinker.cli import main as cli_main
    from flythinker.cli.common import CLIError, bundled_records
    from flythinker.persona import load_dataset

    assert [r.record_id for r in bundled_records("bundled:persona-empathy@2:validation")] == \
        [r.record_id for r in load_dataset("persona-empathy", "validation", version=2)]
    for bad, msg in (("bundled:persona-empathy", "expected bundled:NAME"), ("bundled:nope:train", "unknown dataset"),
                     ("bundled:persona-empathy@x:train", "must be a number")):
        with pytest.raises(CLIError, match=msg):
            bundled_records(bad)
    from flythinker.training.toy import save_tiny_model

    save_tiny_model(tmp_path / "gen", seed=0, hidden_size=32, num_hidden_layers=1, max_position_embeddings=4096)
    args = ["train", "--generator", str(tmp_path / "gen"), "--data", "bundled:persona-empathy@2:validation",
            "--output-dir", str(tmp_path / "out"), "--users", "3", "--per-user", "1"]
    assert cli_main(args) == 2  # without --recipe the selection means nothing: refused, nothing trained
    assert "--users, --per-user only applies with --recipe" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _cli_recipe_args(tmp_path, n_layers: int = 2) -> list[str]:
    """`flythinker train --recipe persona-pair` on tiny random models (the reasoner `n_layers` deep) and 8 records."""
    from flythinker.persona import Persona, PersonaRecord, Query, save_records
    from flythinker.training.toy import save_tiny_model

    save_tiny_model(tmp_path / "gen", seed=0, hidden_size=64)
    save_tiny_model(tmp_path / "rsn", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                    num_hidden_layers=n_layers)
    recs = [PersonaRecord(record_id=str(i), user_id=f"u{i % 4}", query=Query(text="How should I rest?"),
                          persona=Persona(profile=["I love walks.", "I read."][i % 2]),
                          response=["Take a walk.", "Read a book."][i % 2]) for i in range(8)]
    save_records(recs, tmp_path / "persona.jsonl")
    return ["train", "--recipe", "persona-pair", "--generator", str(tmp_path / "gen"), "--reasoner",
            str(tmp_path / "rsn"), "--data", str(tmp_path / "persona.jsonl"), "--output-dir", str(tmp_path / "out")]


def test_cli_train_recipe_with_a_reasoner_lora_trains_its_top_layers_and_saves_them_merged(tmp_path):
    """`--reasoner-lora-rank/-layers/--reasoner-lr`: stage 2 trains the reasoner's top layer (of 3) only, and the
    merged pair in --output-dir/model loads with that layer moved and the others as they were."""
    from safetensors.torch import load_file as load_weights

    from flythinker.cli import main as cli_main
    from flythinker.modeling import FlyThinkerForCausalLM

    args = _cli_recipe_args(tmp_path, n_layers=3)
    # stage 2 step 1 runs at lr 0 (warm-up) and the zero projection passes no gradient to the reasoner until it has
    # moved: the reasoner's LoRA first moves at step 3
    assert cli_main([*args, "--stage1-steps", "0", "--stage2-steps", "4", "--reasoner-lora-rank", "2",
                     "--reasoner-lora-layers", "1", "--reasoner-lr", "5e-2"]) == 0
    report = json.loads((tmp_path / "out" / "recipe_report.json").read_text())
    assert report["recipe"]["reasoner_lora_rank"] == 2 and report["recipe"]["reasoner_lora_layers"] == 1
    assert report["recipe"]["reasoner_lr"] == 5e-2 and "reasoner_cache" not in report["stage2"]
    model = FlyThinkerForCausalLM.from_pretrained(tmp_path / "out" / "model")
    before = load_weights(tmp_path / "rsn" / "model.safetensors")
    after = {k.removeprefix("model."): v for k, v in model.reasoner.state_dict().items()}
    moved = {k for k, v in before.items() if not torch.equal(v, after[k.removeprefix("model.")])}
    assert moved and all(".layers.2." in k for k in moved)  # the top layer's LoRA targets, merged in
    assert not any("lora_" in k for k in model.state_dict())


def test_cli_train_recipe_refuses_bad_reasoner_lora_options_before_training(tmp_path, capsys):
    import argparse

    from flythinker.cli import main as cli_main
    from flythinker.cli.train import add_arguments

    args = _cli_recipe_args(tmp_path)
    cases = [(["--reasoner-lora-rank", "0"], "--reasoner-lora-rank: expected a positive integer, got '0'"),
             (["--reasoner-lora-rank", "2", "--reasoner-lora-layers", "-1"],
              "--reasoner-lora-layers: expected a positive integer, got '-1'"),
             (["--reasoner-lora-rank", "2", "--reasoner-lr", "0"], "--reasoner-lr: expected a positive number"),
             (["--reasoner-lora-layers", "2", "--reasoner-lr", "1e-3"],
              "--reasoner-lora-layers, --reasoner-lr only applies with --reasoner-lora-rank"),
             (["--reasoner-lora-rank", "2", "--ship-dir", str(tmp_path / "ship")],
              "the shipped-pair format carries the generator's LoRA only")]
    for extra, msg in cases:
        capsys.readouterr()
        assert cli_main([*args, *extra]) == 2
        assert msg in capsys.readouterr().err
    assert cli_main([a for a in args if a not in ("--recipe", "persona-pair")] + ["--reasoner-lora-rank", "2"]) == 2
    assert "--reasoner-lora-rank only applies with --recipe" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ship").exists()  # nothing ran
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    default = PairRecipe()  # the help texts state the recipe's own defaults
    assert f"default: {default.reasoner_lora_layers};" in helps["reasoner_lora_layers"]
    assert float(re.search(r"default: ([0-9.e-]+)\)", helps["reasoner_lr"]).group(1)) == default.reasoner_lr
    assert default.reasoner_lora_rank == 0 and "default: none" in helps["reasoner_lora_rank"]
