"""`flythinker train`: a tiny split-context run (LoRA + checkpointing) saves a checkpoint that reloads and generates;
persona records train; bad input ends in one line with exit status 2."""

import json

import pytest
import torch

from flythinker.training.toy import save_tiny_model, secret_task
from flythinker.training.train import main


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on shared CPUs
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "gen", seed=0, hidden_size=64)
    save_tiny_model(root / "rsn", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    save_tiny_model(root / "wide", seed=2, hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    save_tiny_model(root / "othervocab", seed=3, vocab_size=300)
    (root / "split.jsonl").write_text("".join(json.dumps(e) + "\n" for e in secret_task(24)))
    yield root
    torch.set_num_threads(threads)


def _args(root, *extra, data="split.jsonl", out="out"):
    return ["--generator", str(root / "gen"), "--reasoner", str(root / "rsn"), "--data", str(root / data),
            "--output-dir", str(root / out), "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3",
            "--logging-steps", "1", "--no-progress", *extra]


def test_train_split_context_lora_checkpointing_then_generate(root, capsys):
    from flythinker.modeling import FlyThinkerForCausalLM

    assert main(_args(root, "--lora", "--gradient-checkpointing", "--lambda", "0.7", "--train", "both")) == 0
    err = capsys.readouterr().err
    assert "trainable parameters" in err and "saved checkpoint" in err
    out = root / "out"
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum("loss" in e for e in logs) == 3
    assert (out / "lora" / "generator" / "adapter_model.safetensors").is_file()
    assert (out / "training_args.json").is_file() and not list(out.glob("*.bin"))  # nothing pickled
    model = FlyThinkerForCausalLM.from_pretrained(out).eval()  # merged weights: plain keys, no LoRA layers
    assert model.config.fusion_lambda == 0.7
    assert not any("lora_" in k for k in model.state_dict())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    g = tok(["u:say:\na:"], return_tensors="pt")
    r = tok(["u:key=1:\na:"], return_tensors="pt")
    ids = model.generate(**g, reasoner_input_ids=r["input_ids"], reasoner_attention_mask=r["attention_mask"],
                         max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, g["input_ids"].shape[1] + 4) or ids[0, -1] == tok.eos_token_id


def test_top_level_cli_dispatches_train(root):
    from flythinker.cli import main as cli_main

    assert cli_main(["train", *_args(root, "--train", "generator", out="out_cli")]) == 0
    assert (root / "out_cli" / "model.safetensors").is_file()


def test_continue_from_checkpoint_and_persona_records(root):
    from flythinker.persona import Persona, PersonaRecord, Query, save_records

    recs = [PersonaRecord(record_id=str(i), user_id=f"u{i % 2}", query=Query(text="How should I rest?"),
                          persona=Persona(profile=["I love long walks.", "I read at night."][i % 2]),
                          response=["Take a walk.", "Read a book."][i % 2]) for i in range(8)]
    save_records(recs, root / "persona.jsonl")
    from flythinker.modeling import FlyThinkerForCausalLM
    from flythinker.training.toy import char_tokenizer

    FlyThinkerForCausalLM.from_pair(str(root / "gen"), str(root / "rsn"),
                                    projection="pad").save_pretrained(root / "pair")
    char_tokenizer().save_pretrained(root / "pair")
    args = ["--model", str(root / "pair"), "--data", str(root / "persona.jsonl"), "--output-dir",
            str(root / "out_persona"), "--max-steps", "2", "--batch-size", "4", "--no-progress"]
    assert main(args) == 0
    assert (root / "out_persona" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "data file not found"),
        ("badjson", "line 2 is not valid JSON"),
        ("noresponse", "missing ['response']"),
        ("mixed", "mixes shared-context"),
        ("unknown_model", "unknown model"),
        ("vocab", "incompatible pair"),
        ("pad_too_wide", "incompatible pair"),
        ("bad_train", "unknown trainable part"),
        ("not_flythinker", "not a flythinker checkpoint"),
        ("lambda0_reasoner_only", "nothing can learn"),
        ("lora_projection_only", "--lora needs"),
    ],
)
def test_bad_input_is_one_line_exit_2(root, capsys, case, match):
    (root / "badjson.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    (root / "noresponse.jsonl").write_text('{"prompt": "a"}\n')
    (root / "mixed.jsonl").write_text('{"prompt": "a", "response": "b"}\n'
                                      '{"generator_prompt": "a", "reasoner_prompt": "c", "response": "b"}\n')
    args = _args(root, out=f"bad_{case}")
    swap = {
        "missing": ("--data", str(root / "nope.jsonl")),
        "badjson": ("--data", str(root / "badjson.jsonl")),
        "noresponse": ("--data", str(root / "noresponse.jsonl")),
        "mixed": ("--data", str(root / "mixed.jsonl")),
        "unknown_model": ("--reasoner", "no-such-model-xyz"),
        "vocab": ("--reasoner", str(root / "othervocab")),
        "pad_too_wide": ("--reasoner", str(root / "wide")),
    }
    if case in swap:
        flag, value = swap[case]
        args[args.index(flag) + 1] = value
    elif case == "bad_train":
        args += ["--train", "decoder"]
    elif case == "not_flythinker":
        args = ["--model", str(root / "gen")] + args[4:]
    elif case == "lambda0_reasoner_only":
        args += ["--lambda", "0", "--train", "reasoner"]
    elif case == "lora_projection_only":
        args += ["--lora", "--train", "projection", "--projection", "linear"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flythinker: error: ") and match in err[-1], err
    assert not any("Traceback" in line for line in err)
