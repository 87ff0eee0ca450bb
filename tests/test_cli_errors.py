"""Every user error probed here ends in one line, `flythinker: error: ...`, exit status 2, no traceback:
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
    FlyThinkerForCausalLM.from_pair(str(root / "gen"), str(root / "rsn"),
                                    projection="pad").save_pretrained(root / "pair")
    char_tokenizer().save_pretrained(root / "pair")
    (root / "data.jsonl").write_text("".join(json.dumps(e) + "\n" for e in secret_task(8)))
    (root / "a_file").write_text("x")
    (root / "judged.jsonl").write_text(json.dumps({"record_id": "a", "user_id": "u", "query": {"text": "My dog died."},
                                                   "response": "I am so sorry."}) + "\n")
    (root / "nested.json").write_text("[" * 100_000)
    (root / "not_json.jsonl").write_text('{"a": 1}\n{"b": \n')
    (root / "latin1.jsonl").write_bytes('{"query": "caf\u00e9"}\n'.encode("latin-1"))
    (root / "empty.jsonl").write_text("")
    (root / "no_traits.jsonl").write_text(json.dumps({"record_id": "a", "user_id": "u", "query": {"text": "hi"},
                                                      "response": "hello"}) + "\n")
    (root / "done").mkdir()  # a finished run's output folder
    (root / "done" / "config.json").write_text("{}")
    from flythinker.persona.wordlevel import word_tokenizer

    save_tiny_model(root / "digitless", seed=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    word_tokenizer(["hello world how are you"]).save_pretrained(root / "digitless")  # no single-token "1".."5"
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


def _judge(r, *extra):
    return ["judge", str(r / "judged.jsonl"), *extra]


def _rl(r, *extra, data="judged.jsonl"):
    return ["rl", "--generator", str(r / "gen"), "--data", str(r / data), "--steps", "1", "--group", "2",
            "--batch", "2", "--out", str(r / "rl-out"), *extra]


OPTION_CASES.update({  # the numeric options of judge / rl, checked at parse time (flythinker.cli.options)
    f"judge_{flag}_{value}": (lambda r, f=flag, v=value: _judge(r, f"--{f}", v), want)
    for flag, value, want in [
        ("bystander-coef", "nan", "a number >= 0"), ("bystander-coef", "inf", "a number >= 0"),
        ("bystander-coef", "-3", "a number >= 0"), ("fallback-score", "nan", "a judge score in [1, 5]"),
        ("fallback-score", "7", "a judge score in [1, 5]"), ("timeout", "-1", "a positive number"),
        ("max-retries", "-1", "an integer >= 0"), ("temperature", "nan", "a number >= 0"),
        ("min-score-mass", "2", "a number in [0, 1]")]
})
OPTION_CASES.update({
    "rl_reward_weight_nan": (lambda r: _rl(r, "--reward", "trait:nan"), "finite number"),
    "rl_reward_weight_inf": (lambda r: _rl(r, "--reward", "length:inf"), "finite number"),
    "rl_lambda_nan": (lambda r: _rl(r, "--fusion-lambda", "nan"), "a number in [0, 100]"),
    "rl_beta_negative": (lambda r: _rl(r, "--beta", "-1"), "a number >= 0"),
    "rl_seed_negative": (lambda r: _rl(r, "--seed", "-1"), "an integer >= 0"),
    "train_seed_negative": (lambda r: _train(r, "--generator", str(r / "gen"), "--seed", "-5"), "an integer >= 0"),
    "serve_unbalanced_quote": (lambda r: ["serve", str(r / "pair"), "--vllm-args", "'unbalanced"],
                               "No closing quotation"),
})
# bad data files: one line, before any model loads
DATA_CASES = {
    "judge_nested": (lambda r: ["judge", str(r / "nested.json")], "nested too deeply"),
    "generate_record_nested": (lambda r: ["generate", "--generator", str(r / "gen"), "--record",
                                          str(r / "nested.json")], "nested too deeply"),
    "train_data_nested": (lambda r: ["train", "--generator", str(r / "gen"), "--data", str(r / "nested.json"),
                                     "--output-dir", str(r / "nested-out")], "nested too deeply"),
    "rl_data_nested": (lambda r: _rl(r, data="nested.json"), "nested too deeply"),
    "rl_data_not_json": (lambda r: _rl(r, data="not_json.jsonl"), "line 2 is not valid JSON"),
    "rl_data_not_utf8": (lambda r: _rl(r, data="latin1.jsonl"), "not UTF-8"),
    "rl_data_empty": (lambda r: _rl(r, data="empty.jsonl"), "no records"),
    "rl_trait_reward_without_traits": (lambda r: _rl(r, data="no_traits.jsonl"), "no hidden traits"),
}
# outputs: refused before the work that would produce them
OUTPUT_CASES = {
    "train_into_a_finished_run": (lambda r: _train(r, "--generator", str(r / "gen"), out="done"),
                                  "already holds a run"),
    "rl_into_a_finished_run": (lambda r: ["rl", "--generator", str(r / "gen"), "--data", str(r / "judged.jsonl"),
                                          "--reward", "length", "--out", str(r / "done")], "already holds a run"),
    "judge_out_a_folder": (lambda r: _judge(r, "--base-url", "http://127.0.0.1:9/v1", "--out", str(r / "done")),
                           "is a folder"),
    "judge_out_exists": (lambda r: _judge(r, "--base-url", "http://127.0.0.1:9/v1", "--out", str(r / "a_file")),
                         "--overwrite"),
    "judge_expected_mode_multi_token_scores": (lambda r: _judge(r, "--judge-model", str(r / "digitless")),
                                               "single token"),
    "serve_truncated_weights": (lambda r: ["serve", str(_with_tokenizer(damaged_copy(r / "pair",
                                                                                     "truncated_safetensors", r),
                                                                        r))], "not a complete safetensors file"),
}


def _with_tokenizer(folder, root):
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option_values(root, capsys, case):
    argv, match = OPTION_CASES[case]
    _one_line_error(capsys, argv(root), match)


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_files(root, capsys, case):
    argv, match = DATA_CASES[case]
    _one_line_error(capsys, argv(root), match)


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_outputs_refused_before_the_work(root, capsys, case):
    argv, match = OUTPUT_CASES[case]
    _one_line_error(capsys, argv(root), match)
    assert (root / "done" / "config.json").read_text() == "{}"  # the finished run is untouched


@pytest.fixture(scope="module")
def bad_endpoint():
    """A local HTTP server answering /v1/chat/completions badly, per path prefix: 500, a body that is not JSON,
    JSON that is not a chat completion, an answer slower than the client's timeout. Yields its base URL."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            kind = self.path.split("/")[1]
            if kind == "slow":
                time.sleep(3)
            status, body = {"500": (500, b'{"error": "boom"}'), "badjson": (200, b"this is not json"),
                            "nope": (200, b'{"choices": "nope"}')}.get(kind, (200, b"{}"))
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out first ("slow")
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("where", ["closed_port", "500", "badjson", "nope", "slow", "not_a_url"])
def test_judge_endpoint_failures_are_one_line(root, capsys, bad_endpoint, where):
    url = {"closed_port": f"http://127.0.0.1:{_closed_port()}/v1", "not_a_url": "not a url"}.get(
        where, f"{bad_endpoint}/{where}/v1")
    _one_line_error(capsys, _judge(root, "--base-url", url, "--max-retries", "0", "--timeout", "1",
                                   "--no-bystander"), "judge endpoint")
