"""The `flythinker` CLI end to end on a tiny random pair saved to disk (char tokenizer with a chat template).

In-process `main([...])` keeps it fast (one torch import); stdout/stderr are captured with capsys. One
subprocess run checks the real entry point (`python -m flythinker.cli`) and that a user error prints one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flythinker.cli import main
from flythinker.training.toy import save_tiny_model

SUBCOMMANDS = ("demo", "generate", "train", "bench", "info")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    gen = save_tiny_model(root / "gen", seed=0, hidden_size=64)
    rsn = save_tiny_model(root / "rsn", seed=1, hidden_size=48)  # H_r < H_g: pad projection
    return gen, rsn


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLYTHINKER_NO_CPP", "1")  # `info` must not JIT-build the C++ op inside the test


def run(capsys, *argv):
    capsys.readouterr()  # drop what the test printed before (e.g. save_pretrained's progress bar)
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert lines[0].startswith("flythinker: error: "), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_of_each_subcommand(capsys, sub):
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: flythinker {sub}")
    assert len(out.splitlines()) > 5


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in out


def test_generate_pair_split_context(capsys, pair):
    gen, rsn = pair
    rc, out, err = run(capsys, "generate", "--generator", gen, "--reasoner", rsn, "--prompt", "hello",
                       "--reasoner-prompt", "long history, then hello", "--max-new-tokens", 6, "--seed", 0)
    assert rc == 0, err
    assert "6 new tokens" in err and "flythinker, split context" in err and "tok/s" in err
    assert out.strip() != "" or out == "\n"  # random weights: any text, but it was streamed through stdout


def test_generate_sampling_options_and_lambda_zero_matches_generator(capsys, pair):
    gen, rsn = pair
    common = ["--prompt", "abc", "--max-new-tokens", 8, "--no-stream"]
    rc, alone, err = run(capsys, "generate", "--generator", gen, "--generator-only", *common)
    assert rc == 0, err and "generator alone" in err
    rc, lam0, err = run(capsys, "generate", "--generator", gen, "--reasoner", rsn, "--lambda", 0, *common)
    assert rc == 0, err
    assert lam0 == alone  # λ = 0 reproduces the plain generator exactly (greedy)
    rc, out, err = run(capsys, "generate", "--generator", gen, "--reasoner", rsn, *common, "--do-sample",
                       "--temperature", 0.7, "--top-k", 20, "--top-p", 0.9, "--min-p", 0.05, "--seed", 1)
    assert rc == 0, err
    rc, beams, err = run(capsys, "generate", "--generator", gen, "--reasoner", rsn, *common, "--num-beams", 2)
    assert rc == 0, err


def test_generate_from_persona_record(capsys, pair, tmp_path):
    gen, rsn = pair
    rec = {"profile": "likes short answers", "input": "how do I relax?", "output": "breathe."}
    path = tmp_path / "records.json"
    path.write_text(json.dumps([rec, {**rec, "input": "second"}]))
    rc, out, err = run(capsys, "generate", "--generator", gen, "--reasoner", rsn, "--record", path,
                       "--record-index", 1, "--max-new-tokens", 4)
    assert rc == 0, err
    assert "split context" in err and "reasoner" in err


@pytest.mark.parametrize("name", ["persona_longlamp.json", "persona_personaemp.json", "persona_perm.jsonl"])
def test_generate_from_bundled_record_formats(capsys, pair, name):
    path = Path(__file__).parent / "data" / name
    rc, out, err = run(capsys, "generate", "--generator", pair[0], "--reasoner", pair[1], "--record", path,
                       "--max-new-tokens", 3, "--max-reasoner-tokens", 400, "--no-stream")
    assert rc == 0, err
    assert "3 new tokens" in err and "record" in err


def test_train_then_generate_from_checkpoint(capsys, pair, tmp_path):
    gen, rsn = pair
    data = tmp_path / "train.jsonl"
    rows = [{"generator_prompt": f"q{i}", "reasoner_prompt": f"user likes {i}. q{i}", "response": f"a{i}"}
            for i in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out_dir = tmp_path / "ckpt"
    rc, out, err = run(capsys, "train", "--generator", gen, "--reasoner", rsn, "--data", data, "--output-dir",
                       out_dir, "--max-steps", 3, "--batch-size", 2, "--lr", 1e-3, "--no-progress")
    assert rc == 0, err
    assert (out_dir / "config.json").is_file()
    assert any(out_dir.glob("*.safetensors"))
    assert json.loads((out_dir / "config.json").read_text())["model_type"] == "flythinker"
    rc, out, err = run(capsys, "generate", "--model", out_dir, "--prompt", "q1", "--reasoner-prompt",
                       "user likes 1. q1", "--max-new-tokens", 5, "--no-stream")
    assert rc == 0, err
    assert "5 new tokens" in err or "new tokens" in err
    # a flythinker checkpoint is not a plain model: refused as a pair member, in one line
    rc, out, err = run(capsys, "generate", "--generator", out_dir, "--prompt", "q1")
    assert_user_error(rc, err, "flythinker checkpoint")


def test_info_reports_versions_backends_cache(capsys, tmp_path):
    rc, out, err = run(capsys, "info")
    assert rc == 0, err
    for word in ("torch", "triton", "transformers", "latent_fuse", "linear_cross_entropy", "sample", "cache"):
        assert word in out
    # A fresh process: in this one another test may already have loaded the C++ op. There FLYTHINKER_NO_CPP=1
    # (set by the autouse fixture) disables it, so CPU tensors go to the PyTorch twin.
    proc = subprocess.run([sys.executable, "-m", "flythinker.cli", "info", "--json"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["cache_dir"] == str(tmp_path / "cache")
    assert set(info["backends"]) == {"latent_fuse", "linear_cross_entropy", "sample"}
    assert info["backends"]["latent_fuse"]["cpu"] == "PyTorch"
    for per in info["backends"].values():
        assert set(per.values()) <= {"Triton", "C++", "PyTorch", "missing"}


# ---- user errors: non-zero exit, one line, no traceback ------------------------------------------------------------
def test_unknown_model_name(capsys):
    rc, out, err = run(capsys, "generate", "--generator", "no-such-model-xyz", "--prompt", "hi")
    assert_user_error(rc, err, "no-such-model-xyz")


def test_missing_record_file(capsys, pair, tmp_path):
    rc, out, err = run(capsys, "generate", "--generator", pair[0], "--record", tmp_path / "nope.json")
    assert_user_error(rc, err, "nope.json")


def test_malformed_record(capsys, pair, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"profile": "x", "input": 42}]))
    rc, out, err = run(capsys, "generate", "--generator", pair[0], "--reasoner", pair[1], "--record", bad)
    assert_user_error(rc, err, "bad.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    rc, out, err = run(capsys, "generate", "--generator", pair[0], "--reasoner", pair[1], "--record", broken)
    assert_user_error(rc, err, "broken.json")


def test_incompatible_pair(capsys, pair, tmp_path):
    other = save_tiny_model(tmp_path / "other", vocab_size=200)
    rc, out, err = run(capsys, "generate", "--generator", pair[0], "--reasoner", other, "--prompt", "hi")
    assert_user_error(rc, err, "incompatible pair")
    wide = save_tiny_model(tmp_path / "wide", hidden_size=96)  # H_r > H_g with the pad projection
    rc, out, err = run(capsys, "generate", "--generator", pair[0], "--reasoner", wide, "--prompt", "hi")
    assert_user_error(rc, err)


def _reordered_vocab_tokenizer():
    """The char tokenizer's tokens with the characters' ids reversed: same size, different vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from flythinker.training.toy import CHARS, SPECIALS

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + tuple(CHARS[::-1]))},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("command", ["generate", "train"])
def test_one_pair_check_for_generate_and_train(capsys, pair, tmp_path, command):
    """generate and train accept and refuse the same pairs: a reasoner folder without a tokenizer is fine (train
    used to refuse it), a reasoner whose tokenizer maps ids to other tokens is not (generate used to accept it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from flythinker.training.toy import tiny_config

    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(tiny_config(hidden_size=48)).save_pretrained(tmp_path / "notok")
    reordered = save_tiny_model(tmp_path / "reordered", seed=6, hidden_size=48)
    _reordered_vocab_tokenizer().save_pretrained(reordered)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"generator_prompt": "q", "reasoner_prompt": "r q", "response": "a"}) + "\n")
    tail = {"generate": ["--prompt", "hi", "--max-new-tokens", 2, "--no-stream"],
            "train": ["--data", data, "--output-dir", tmp_path / "o", "--max-steps", 1, "--no-progress"]}[command]
    rc, out, err = run(capsys, command, "--generator", pair[0], "--reasoner", tmp_path / "notok", *tail)
    assert rc == 0, err
    if command == "train":  # the first run holds "o" now (a second run into it is refused: flythinker.run_folder)
        tail[tail.index(tmp_path / "o")] = tmp_path / "o2"
    rc, out, err = run(capsys, command, "--generator", pair[0], "--reasoner", reordered, *tail)
    assert_user_error(rc, err, "incompatible pair", "different vocabularies")


@pytest.mark.parametrize("bad", [["--temperature", "0"], ["--top-p", "1.5"], ["--max-new-tokens", "-3"],
                                 ["--lambda", "abc"], ["--num-beams", "0"]])
def test_bad_option_values(capsys, pair, bad):
    rc, out, err = run(capsys, "generate", "--generator", pair[0], "--prompt", "hi", *bad)
    assert_user_error(rc, err, bad[0])


def test_record_index_out_of_range_and_conflicting_inputs(capsys, pair, tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps([{"profile": "p", "input": "q", "output": "r"}]))
    rc, out, err = run(capsys, "generate", "--generator", pair[0], "--record", path, "--record-index", 5)
    assert_user_error(rc, err, "out of range")
    rc, out, err = run(capsys, "generate", "--generator", pair[0], "--record", path, "--prompt", "x")
    assert_user_error(rc, err)
    rc, out, err = run(capsys, "generate", "--prompt", "x")
    assert_user_error(rc, err, "no model")


def test_train_missing_data_file(capsys, pair, tmp_path):
    rc, out, err = run(capsys, "train", "--generator", pair[0], "--data", tmp_path / "none.jsonl",
                       "--output-dir", tmp_path / "o")
    assert_user_error(rc, err, "none.jsonl")


def test_entry_point_subprocess_one_line_error(pair, tmp_path):
    env = dict(os.environ, FLYTHINKER_CACHE=str(tmp_path / "c"))
    proc = subprocess.run([sys.executable, "-m", "flythinker.cli", "generate", "--generator", "not-a-model",
                           "--prompt", "x"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("flythinker: error: ") and len(proc.stderr.strip().splitlines()) == 1


# ---- the demo's pieces on a tiny pair -------------------------------------------------------------------------------
# The demo runs on any saved model (`--model PATH`); a tiny random one with the char tokenizer exercises every stage
# in seconds. --data-users / --max-reasoner-tokens are documented options (a small dataset builds quickly; char
# tokens need a larger reasoner budget than SmolLM2's BPE for the same history).
@pytest.fixture(scope="module")
def tiny_demo_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("demo") / "tiny", vocab_size=128, num_hidden_layers=2)


def _demo_argv(model, *extra):
    return ["demo", "--model", model, "--data-users", 40, "--max-reasoner-tokens", 400, "--steps", 2, "--users", 1,
            "--max-new-tokens", 5, *extra]


def test_demo_tiny_trains_caches_and_compares(capsys, tmp_path, tiny_demo_model):
    argv = _demo_argv(tiny_demo_model, "--ablation")
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert "Trained in" in out and "generator alone" in out and "flythinker" in out
    assert "strategy metric" in out and "tok/s" in out and "fine-tuned, no latents" in out
    assert "first token" in out and "flythinker's speed against the generator alone:" in out
    entries = [p for p in (tmp_path / "cache" / "demo").iterdir()]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert (entries[0] / "reasoner" / "adapter_model.safetensors").is_file()
    rc, out, err = run(capsys, *argv)  # second run reuses the cached fine-tune
    assert rc == 0, err
    assert "Reusing the fine-tuned pair" in out and "Trained in" not in out


def test_demo_killed_between_its_cache_files_recovers(capsys, tmp_path, tiny_demo_model, monkeypatch):
    """A run that dies after the adapters are written but before meta.json leaves no cache entry: the next run
    trains again and works (before, the half-written entry made every later run fail on the missing meta.json)."""
    real_write_text = Path.write_text

    def die_at_meta(self, *args, **kwargs):
        if self.name == "meta.json":
            raise SystemError("killed between the demo's two cache files")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", die_at_meta)
    with pytest.raises(SystemError, match="killed"):
        main([str(a) for a in _demo_argv(tiny_demo_model)])
    monkeypatch.setattr(Path, "write_text", real_write_text)
    demo_dir = tmp_path / "cache" / "demo"
    assert not demo_dir.exists() or not any(demo_dir.iterdir())  # no entry, and no temporary left behind
    capsys.readouterr()
    rc, out, err = run(capsys, *_demo_argv(tiny_demo_model))
    assert rc == 0, err
    assert "Trained in" in out
    rc, out, err = run(capsys, *_demo_argv(tiny_demo_model))
    assert rc == 0, err
    assert "Reusing the fine-tuned pair" in out


def test_demo_lora_goes_through_training_trainable(tmp_path, tiny_demo_model):
    import torch

    from flythinker.cli.demo import Recipe, add_adapters, finetune, load_models
    from flythinker.persona import load_dataset
    from flythinker.training.trainable import lora_parts, merged_state_dict, trainable_parameters

    recipe = Recipe(model=str(tiny_demo_model), steps=3, batch_size=1, max_reasoner_tokens=400,
                    reasoner_layers=1, lr=1e-2)
    model, base, tok = load_models(recipe)
    add_adapters(model, recipe)
    assert lora_parts(model) == ("generator", "reasoner")  # visible to save_merged / merged_state_dict
    names = {id(p): n.removeprefix("model.") for n, p in model.named_parameters()}  # the pair's part names
    trainable = {names[id(p)]: p for p in trainable_parameters(model)}
    frozen = {names[id(v)]: v.clone() for v in model.parameters() if not v.requires_grad}
    before = {k: v.detach().clone() for k, v in trainable.items()}
    assert before and all("lora_" in k for k in before)
    assert any(k.startswith("reasoner.") and ".layers.1." in k for k in before)
    assert not any(k.startswith("reasoner.") and ".layers.0." in k for k in before)  # only the top layer
    losses = finetune(model, tok, load_dataset("persona-empathy", "train", n_users=12)[:6], recipe, progress=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[k], trainable[k]) for k in before)
    assert all(torch.equal(frozen[names[id(v)]], v) for v in model.parameters() if names[id(v)] in frozen)
    assert not any("lora_" in k for k in merged_state_dict(model))
    # the base model the demo compares against is untouched by the pair's LoRA
    assert not any("lora_" in k for k, _ in base.named_parameters())


def test_bench_report_from_results(capsys, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "toy.json").write_text(json.dumps({
        "device": "cpu", "loadavg_start": [1.0, 1.0, 1.0],
        "cases": [{"V": 10, "naive": {"time_s": 2.0}, "fused": {"time_s": 1.0}, "time_ratio": 0.5}]}))
    variants = {"a": {"strategy_accuracy": 0.5}, "b": {"strategy_accuracy": 0.9}}
    (results / "variants.json").write_text(json.dumps(variants))
    bench = tmp_path / "bench"
    bench.mkdir()
    rc, out, err = run(capsys, "bench", "--report-only", "--bench-dir", bench, "--results-dir", results)
    assert rc == 0, err
    report = (results / "REPORT.md").read_text()
    assert "| V | naive.time_s | fused.time_s | time_ratio |" in report
    assert "| name | strategy_accuracy |" in report and "| b | 0.9 |" in report
    assert "Versions:" in report and "torch" in report and "Machine:" in report
    assert (results / "ratios.png").is_file()
    rc, out, err = run(capsys, "bench", "--only", "nope", "--bench-dir", bench, "--results-dir", results)
    assert_user_error(rc, err, "nope")


def test_module_files_are_paths():
    assert Path(__file__).is_file()


def test_generate_text_times_the_first_token(pair):
    """The demo's speed columns: the first new token's time (prefill) is inside the call and the decode rate counts
    the tokens after it; beam search (no streamer allowed) reports no first-token time."""
    import torch

    from flythinker.cli.common import Prompts, generate_text
    from flythinker.modeling import FlyThinkerForCausalLM
    from flythinker.training.toy import char_tokenizer

    tok = char_tokenizer()
    model = FlyThinkerForCausalLM.from_pair(*pair, fusion_lambda=0.5, projection="pad").eval()
    prompts = Prompts(torch.tensor([tok("say:")["input_ids"]]), torch.tensor([tok("key=1:")["input_ids"]]))
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    reply = generate_text(model, prompts, tok, kw, stream=False)
    assert reply.tokens == 6 and 0 < reply.first_token_s < reply.seconds
    assert reply.decode_tokens_per_s == pytest.approx(5 / (reply.seconds - reply.first_token_s))
    assert reply.tokens_per_s == pytest.approx(6 / reply.seconds)
    beams = generate_text(model, prompts, tok, dict(kw, num_beams=2), stream=False)
    assert beams.first_token_s is None and beams.decode_tokens_per_s is None and beams.tokens == 6


def test_serve_refuses_a_shared_base_checkpoint_in_one_line(capsys, tmp_path):
    """vLLM's flythinker model loads two plain halves: a shared-base folder is named as such before vLLM starts."""
    from flythinker import FlyThinkerForCausalLM
    from flythinker.training.toy import char_tokenizer

    base = save_tiny_model(tmp_path / "base", seed=0, hidden_size=64)
    model = FlyThinkerForCausalLM.from_shared_base(str(base), r=4, fusion_lambda=0.5, projection="pad")
    model.save_pretrained(tmp_path / "shared")
    char_tokenizer().save_pretrained(tmp_path / "shared")
    rc, _, err = run(capsys, "serve", tmp_path / "shared")
    assert_user_error(rc, err, "shared-base pair", "to_two_copies()")
    # the conversion the message names gives a folder serve accepts (vLLM itself: tests/vllm_serving)
    from flythinker.serving.server import check_checkpoint

    FlyThinkerForCausalLM.from_pretrained(tmp_path / "shared").to_two_copies().save_pretrained(tmp_path / "two")
    char_tokenizer().save_pretrained(tmp_path / "two")
    assert check_checkpoint(tmp_path / "two") == tmp_path / "two"
