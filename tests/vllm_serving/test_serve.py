"""`flythinker serve` on loopback, driven with the `openai` client: chat completions (plain, streamed, concurrent,
split context with a per-request reasoner view) equal HF generate on the same chat-templated prompts; bad requests
get clear 4xx answers and the server stays up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
from conftest import ROOT, hf_side

MAX_MODEL_LEN = 128
N = 12
MESSAGES = [{"role": "user", "content": "I failed my exam today . Can you help me plan the next week ?"}]
REASONER = [{"role": "user", "content": "She likes short practical steps , he wants comfort first . Thank you , "
                                        "that helps a lot . What should I do about my job , my sleep ?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(suite, tmp_path_factory):
    """(client, checkpoint, log path): one `flythinker serve` process for the module."""
    out, _ = suite
    ckpt = out / "mixed" / "pair"
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real server layout: API server + engine-core process
    cmd = [sys.executable, "-m", "flythinker.cli", "serve", str(ckpt), "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gib", "0.02", "--served-model-name", "pair"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    proc.log_path = log  # read by the fuzz test
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while not _healthy(base):
        if proc.poll() is not None or time.time() - t0 > 600:
            proc.kill()
            raise RuntimeError(f"flythinker serve did not come up:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    print(f"flythinker serve up in {time.time() - t0:.1f} s")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    yield client, ckpt, proc, base
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _post(base: str, path: str, body: dict) -> tuple[int, str]:
    """Raw POST (the openai client refuses to send a request without its required fields)."""
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _chat(client, **kw):
    return client.chat.completions.create(model="pair", messages=MESSAGES, max_tokens=N, temperature=0.0,
                                          extra_body={"min_tokens": N, "return_token_ids": True}, **kw)


def _hf(ckpt, tmp_path, prompts, reasoner_prompts=None) -> list[list[int]]:
    req, ref = tmp_path / "req.json", tmp_path / "ref.json"
    req.write_text(json.dumps({"max_new_tokens": N, "prompts": prompts, "reasoner_prompts": reasoner_prompts}))
    hf_side("generate", str(ckpt), str(req), str(ref))
    return json.loads(ref.read_text())["tokens"]


def _template(ckpt, messages) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


def test_chat_completion_equals_hf_generate(server, tmp_path):
    """Shared context and split context (the reasoner view as an extra request field), one HF run for both."""
    client, ckpt, _, _ = server
    g_ids, r_ids = _template(ckpt, MESSAGES), _template(ckpt, REASONER)
    shared, split = _hf(ckpt, tmp_path, [g_ids]), _hf(ckpt, tmp_path, [g_ids], [r_ids])
    r = _chat(client)
    assert r.choices[0].token_ids == shared[0]
    assert r.usage.completion_tokens == N and r.usage.prompt_tokens == len(g_ids)
    assert r.choices[0].message.content
    rs = client.chat.completions.create(model="pair", messages=MESSAGES, max_tokens=N, temperature=0.0,
                                        extra_body={"min_tokens": N, "return_token_ids": True,
                                                    "reasoner_messages": REASONER})
    assert rs.choices[0].token_ids == split[0] != shared[0]
    rp = client.chat.completions.create(model="pair", messages=MESSAGES, max_tokens=N, temperature=0.0,
                                        extra_body={"min_tokens": N, "return_token_ids": True,
                                                    "reasoner_prompt": REASONER[0]["content"]})
    assert rp.choices[0].token_ids == split[0]  # a string is one user turn
    # the completions form: prompt = reasoner ids ++ generator ids, the reasoner ids' count in vllm_xargs
    rc = client.completions.create(model="pair", prompt=r_ids + g_ids, max_tokens=N, temperature=0.0,
                                   extra_body={"min_tokens": N, "return_token_ids": True,
                                               "vllm_xargs": {"flythinker_reasoner_tokens": len(r_ids)}})
    assert rc.choices[0].token_ids == split[0]


def test_streaming_gives_the_same_text(server):
    client, _, _, _ = server
    full = _chat(client).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in _chat(client, stream=True) if c.choices]
    assert len([p for p in parts if p]) > 1, "expected the reply in several chunks"
    assert "".join(parts) == full


def test_concurrent_requests_all_answered(server):
    from concurrent.futures import ThreadPoolExecutor

    client, _, _, _ = server
    want = _chat(client).choices[0].token_ids
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda _: _chat(client).choices[0].token_ids, range(6)))
    assert got == [want] * 6  # batched together, each still equals the single answer


def test_missing_messages_is_a_4xx(server):
    client, _, proc, base = server
    status, text = _post(base, "/v1/chat/completions", {"model": "pair", "max_tokens": 4})
    assert 400 <= status < 500 and "messages" in text
    status, text = _post(base, "/v1/chat/completions", {"model": "pair", "messages": "not a list"})
    assert 400 <= status < 500
    assert proc.poll() is None
    assert client.chat.completions.create(model="pair", messages=MESSAGES, max_tokens=2).choices[0].message.content


BAD = {
    "too_long": ({"messages": [{"role": "user", "content": " ".join(["help"] * (MAX_MODEL_LEN + 10))}]},
                 "context length"),
    "bad_max_tokens": ({"max_tokens": -3}, None),
    "reasoner_not_messages": ({"extra_body": {"reasoner_messages": 5}}, "reasoner_messages"),
    "two_reasoner_views": ({"extra_body": {"reasoner_messages": REASONER, "reasoner_prompt": "x"}}, "one reasoner"),
    "reasoner_in_xargs": ({"extra_body": {"vllm_xargs": {"reasoner_prompt": "x"}}}, "top level"),
    "unknown_reasoner_field": ({"extra_body": {"persona_record": "u1"}}, "reasoner_messages"),
    "client_template": ({"extra_body": {"chat_template": "{{ messages }}"}}, "chat_template"),
    "reasoner_too_long": ({"extra_body": {"reasoner_prompt": " ".join(["help"] * (MAX_MODEL_LEN + 10))}},
                          "context length"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_chat_requests_get_400_and_the_server_stays_up(server, case):
    client, _, proc, _ = server
    change, expect = BAD[case]
    kw = {"model": "pair", "messages": MESSAGES, "max_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kw)
    assert err.value.status_code == 400
    if expect:
        assert expect in str(err.value).lower()
    assert proc.poll() is None
    assert client.chat.completions.create(model="pair", messages=MESSAGES, max_tokens=2).choices[0].message.content


@pytest.mark.parametrize("q", [0, 10_000, "3", True])
def test_bad_split_completions_get_400(server, q):
    client, _, proc, _ = server
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="pair", prompt=[7, 8, 9, 10], max_tokens=2,
                                  extra_body={"vllm_xargs": {"flythinker_reasoner_tokens": q}})
    assert "flythinker_reasoner_tokens" in str(err.value)
    assert proc.poll() is None


def _split_ids(ckpt) -> list[int]:
    return _template(ckpt, REASONER) + _template(ckpt, MESSAGES)


def _fuzz_cases(ckpt) -> dict[str, tuple[str, dict]]:
    """Malformed requests, each one a request that reached (and stopped) the engine or raised in the middleware
    before the server checked requests as the engine would run them. name -> (path, body)."""
    ids, q = _split_ids(ckpt), len(_template(ckpt, REASONER))
    chat = {"model": "pair", "messages": MESSAGES, "max_tokens": 2}
    cmpl = {"model": "pair", "prompt": ids, "max_tokens": 2, "vllm_xargs": {"flythinker_reasoner_tokens": q}}
    return {
        "chat_xarg_past_prompt": ("/v1/chat/completions", {**chat, "vllm_xargs": {"flythinker_reasoner_tokens": 500}}),
        "chat_xarg_string": ("/v1/chat/completions", {**chat, "vllm_xargs": {"flythinker_reasoner_tokens": "3"}}),
        "chat_xarg_negative": ("/v1/chat/completions", {**chat, "vllm_xargs": {"flythinker_reasoner_tokens": -2}}),
        "completion_truncated_below_split": ("/v1/completions", {**cmpl, "truncate_prompt_tokens": 4}),
        "completion_truncated_keeps_split": ("/v1/completions", {**cmpl, "truncate_prompt_tokens": q + 2}),
        "completion_truncated_right": ("/v1/completions", {**cmpl, "truncate_prompt_tokens": q + 2,
                                                           "truncation_side": "right"}),
        "chat_reasoner_truncated": ("/v1/chat/completions", {**chat, "reasoner_prompt": "help me please",
                                                             "truncate_prompt_tokens": 5}),
        "chat_reasoner_lone_surrogate": ("/v1/chat/completions", {**chat, "reasoner_prompt": "bad \ud800 text"}),
        "completion_prompt_logprobs": ("/v1/completions", {**cmpl, "prompt_logprobs": 1}),
        "chat_reasoner_prompt_logprobs": ("/v1/chat/completions", {**chat, "reasoner_prompt": "help me please",
                                                                   "prompt_logprobs": 1}),
        "completion_prompt_count_alone": ("/v1/completions", {"model": "pair", "prompt": ids, "max_tokens": 2,
                                                              "vllm_xargs": {"flythinker_prompt_tokens": 3}}),
        "xargs_a_list": ("/v1/chat/completions", {**chat, "reasoner_prompt": "x", "vllm_xargs": [1]}),
        "template_kwargs_a_string": ("/v1/chat/completions", {**chat, "reasoner_prompt": "x",
                                                              "chat_template_kwargs": "x"}),
        "nested_body": ("/v1/chat/completions", None),
    }


def _raw_post(base: str, path: str, data: bytes) -> tuple[int, str]:
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_fuzz_malformed_requests_fail_alone(server):
    """Every malformed request gets a 4xx naming the problem (no 5xx, no traceback in the server log), and
    afterwards the server is healthy and still gives the split request's answer it gave before."""
    client, ckpt, proc, base = server
    log_start = proc.log_path.stat().st_size
    ids, q = _split_ids(ckpt), len(_template(ckpt, REASONER))

    def split_answer():
        return client.completions.create(model="pair", prompt=ids, max_tokens=N, temperature=0.0,
                                         extra_body={"min_tokens": N, "return_token_ids": True,
                                                     "vllm_xargs": {"flythinker_reasoner_tokens": q}}
                                         ).choices[0].token_ids

    before = split_answer()
    got = {}
    for name, (path, body) in sorted(_fuzz_cases(ckpt).items()):
        data = b"[" * 100_000 if body is None else json.dumps(body).encode()
        got[name] = _raw_post(base, path, data)
        assert proc.poll() is None, f"{name} stopped the server"
    wrong = {k: v for k, v in got.items() if not 400 <= v[0] < 500}
    assert not wrong, wrong
    assert "flythinker_reasoner_tokens" in got["chat_xarg_past_prompt"][1]
    assert "instead of the" in got["completion_truncated_below_split"][1]
    assert "not valid unicode" in got["chat_reasoner_lone_surrogate"][1].lower()
    assert "prompt_logprobs" in got["completion_prompt_logprobs"][1]
    assert _healthy(base)
    assert split_answer() == before
    with open(proc.log_path, "rb") as fh:
        fh.seek(log_start)
        assert b"Traceback" not in fh.read()
