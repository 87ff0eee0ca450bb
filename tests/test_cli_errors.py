"""Every user error of the issue-15 probe ends in one line, `flythinker: error: ...`, exit status 2, no traceback:
bad model folders under `generate --model`, `train --model` and `train --generator`, and bad option values.
Add a row to a table to cover a new case."""

import json

import pytest
import torch

from flythinker.cli import main
from flythinker.training.toy import char_tokenizer, save_tiny_model, secret_task
from tests.faults import DAMAGES, PLAIN_DAMAGES, damaged_copy


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from flythinker.modeling import FlyThinkerForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("clierr")
    save_tiny_model(root / "gen", seed=0, hidden_size=64)
    save_tiny_model(root / "rsn", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    FlyThinkerForCausalLM.from_pair(str(root / "gen"), str(root / "rsn")).save_pretrained(root / "pair")
    char_tokenizer().save_pretrained(root / "pair")
    (root / "data.jsonl").write_text("".join(json.dumps(e) + "\n" for e in secret_task(8)))
    (root / "a_file").write_text("x")
    yield root
    torch.set_num_threads(threads)


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("flythinker: error: "), err
    assert match in err[-1], (match, err[-1])
    assert not any("Traceback" in line for line in err)


def _train(root, *extra, out="out"):
    return ["train", "--data", str(root / "data.jsonl"), "--output-dir", str(root / out), "--max-steps", "1",
            "--no-progress", *extra]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_generate_model_bad_pair_folder(root, capsys, damage):
    folder = damaged_copy(root / "pair", damage, root)
    _one_line_error(capsys, ["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "2"],
                    DAMAGES[damage][1])


@pytest.mark.parametrize("damage", PLAIN_DAMAGES)
def test_generate_model_bad_plain_folder(root, capsys, damage):
    folder = damaged_copy(root / "gen", damage, root)
    _one_line_error(capsys, ["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "2"],
                    DAMAGES[damage][1])


@pytest.mark.parametrize("damage", ["truncated_safetensors", "config_a_list", "no_model_type", "config_empty",
                                    "reasoner_stripped", "more_layers_in_config", "lambda_a_string"])
def test_train_model_bad_pair_folder(root, capsys, damage):
    folder = damaged_copy(root / "pair", damage, root)
    _one_line_error(capsys, _train(root, "--model", str(folder), out=f"out-{damage}"), DAMAGES[damage][1])


@pytest.mark.parametrize("damage", ["truncated_safetensors", "corrupt_safetensors", "config_a_list",
                                    "no_model_type"])
def test_train_generator_bad_folder(root, capsys, damage):
    folder = damaged_copy(root / "gen", damage, root)
    _one_line_error(capsys, _train(root, "--generator", str(folder), out=f"outg-{damage}"), DAMAGES[damage][1])


def test_generate_model_missing_path_names_it(root, capsys):
    _one_line_error(capsys, ["generate", "--model", str(root / "runs" / "ckpt"), "--prompt", "hi"],
                    f"{root / 'runs' / 'ckpt'}")


OPTION_CASES = {  # name -> (argv builder, what the message says)
    "empty_raw_prompt": (lambda r: ["generate", "--generator", str(r / "gen"), "--prompt", "", "--raw"],
                         "--prompt is empty"),
    "streams_on_cpu": (lambda r: ["generate", "--generator", str(r / "gen"), "--prompt", "hi", "--parallel",
                                  "streams", "--device", "cpu"], "needs a CUDA device"),
    "device_mps": (lambda r: ["generate", "--generator", str(r / "gen"), "--prompt", "hi", "--device", "mps"],
                   "--device mps cannot be used"),
    "device_nonsense": (lambda r: ["generate", "--generator", str(r / "gen"), "--prompt", "hi", "--device",
                                   "gpu0"], "bad --device"),
    "max_length_1": (lambda r: _train(r, "--generator", str(r / "gen"), "--max-length", "1"), "integer >= 2"),
    "warmup_negative": (lambda r: _train(r, "--generator", str(r / "gen"), "--warmup-ratio", "-1"), "[0, 1)"),
    "warmup_two": (lambda r: _train(r, "--generator", str(r / "gen"), "--warmup-ratio", "2"), "[0, 1)"),
    "weight_decay_negative": (lambda r: _train(r, "--generator", str(r / "gen"), "--weight-decay", "-1"),
                              "a number >= 0"),
    "save_steps_negative": (lambda r: _train(r, "--generator", str(r / "gen"), "--save-steps", "-1"),
                            "an integer >= 0"),
    "lora_dropout_one": (lambda r: _train(r, "--generator", str(r / "gen"), "--lora", "--lora-dropout", "1"),
                         "[0, 1)"),
    "output_dir_a_file": (lambda r: ["train", "--generator", str(r / "gen"), "--data", str(r / "data.jsonl"),
                                     "--output-dir", str(r / "a_file")], "is an existing file"),
    "resume_bad_folder": (lambda r: _train(r, "--generator", str(r / "gen"), "--resume", str(r / "gen")),
                          "is not a complete training checkpoint"),
    "bench_results_dir_a_file": (lambda r: ["bench", "--report-only", "--results-dir", str(r / "a_file")],
                                 "is an existing file"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option_values(root, capsys, case):
    argv, match = OPTION_CASES[case]
    _one_line_error(capsys, argv(root), match)
