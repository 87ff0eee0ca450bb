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
