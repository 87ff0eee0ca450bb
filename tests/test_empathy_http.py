"""The OpenAI-compatible HTTP judge backend against a real server on 127.0.0.1 (FastAPI + uvicorn serving a tiny
random HF model): round trip, judge end to end, retries on server errors, the timeout, the concurrency limit."""

from __future__ import annotations

import time

import pytest
import torch

openai = pytest.importorskip("openai", reason="the HTTP judge needs the `judge` extra (installed by make test)")

from flythinker.empathy import (  # noqa: E402
    EmpathyJudge,
    JudgeBackendError,
    JudgeContext,
    OpenAIJudgeBackend,
    get_rubric,
)
from flythinker.empathy.prompts import JudgePrompt  # noqa: E402
from flythinker.empathy.server import LoopbackServer, build_app  # noqa: E402

CTX = JudgeContext(query="I lost my job today .", persona="proud ; private")


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    from flythinker.persona.wordlevel import word_tokenizer
    from flythinker.training.toy import tiny_config

    tok = word_tokenizer([CTX.query, "Score : Reason Total / 100 1 2 3 4 5 hello world"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=32, vocab_size=len(tok),
                                                         num_hidden_layers=1)).eval()
    return model, tok


def _prompt(text: str = "hello world") -> JudgePrompt:
    return JudgePrompt([{"role": "user", "content": text}], "expression")


def test_round_trip_matches_local_generate(tiny):
    model, tok = tiny
    with LoopbackServer(build_app(model, tok, model_name="tiny")) as srv:
        backend = OpenAIJudgeBackend("tiny", base_url=srv.base_url, timeout=30, max_retries=0)
        (texts,) = backend.generate([_prompt()], n=1, temperature=0.0, max_new_tokens=5)
    from flythinker.persona.views import render_chat

    ids = tok(render_chat(tok, _prompt().messages, add_generation_prompt=True), add_special_tokens=False,
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        local = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               pad_token_id=tok.pad_token_id)
    assert texts == [tok.decode(local[0, ids.shape[1]:], skip_special_tokens=True)]


def test_judge_over_http_counts_unparsed(tiny):
    model, tok = tiny
    with LoopbackServer(build_app(model, tok)) as srv:
        judge = EmpathyJudge(get_rubric("perm", analysis=False),
                             OpenAIJudgeBackend("local", base_url=srv.base_url, max_concurrency=2),
                             max_new_tokens=4)
        results = judge.score(["I am sorry .", "hello"], [CTX, CTX])
    rep = judge.report()
    assert rep["score_calls"] == 8  # 2 responses x (3 dimensions + bystander), each an HTTP request
    assert rep["parse_failures"] == sum(len(r.failures) for r in results)
    for r in results:
        assert (r.reward is None) == bool(r.failures)


def test_retries_after_server_errors(tiny):
    model, tok = tiny
    app = build_app(model, tok, fail_first=2)
    with LoopbackServer(app) as srv:
        failing = OpenAIJudgeBackend("local", base_url=srv.base_url, max_retries=0)
        with pytest.raises(JudgeBackendError, match="InternalServerError"):  # one line naming the endpoint
            failing.generate([_prompt()], max_new_tokens=2)
        retrying = OpenAIJudgeBackend("local", base_url=srv.base_url, max_retries=2)
        (texts,) = retrying.generate([_prompt()], max_new_tokens=2)
        stats = _stats(srv)
    assert len(texts) == 1
    assert stats["received"] == 3 and stats["served"] == 1  # 1 refused, then 1 refused + 1 retry served


def test_timeout(tiny):
    model, tok = tiny
    with LoopbackServer(build_app(model, tok, delay_s=1.5)) as srv:
        slow = OpenAIJudgeBackend("local", base_url=srv.base_url, timeout=0.3, max_retries=0)
        t = time.perf_counter()
        with pytest.raises(JudgeBackendError, match="APITimeoutError"):
            slow.generate([_prompt()], max_new_tokens=2)
        assert time.perf_counter() - t < 1.4  # gave up at the timeout, did not wait for the answer


def test_concurrency_limit(tiny):
    model, tok = tiny
    with LoopbackServer(build_app(model, tok, delay_s=0.3)) as srv:
        backend = OpenAIJudgeBackend("local", base_url=srv.base_url, max_concurrency=2, max_retries=0)
        out = backend.generate([_prompt()] * 6, max_new_tokens=2)
        stats = _stats(srv)
    assert len(out) == 6 and stats["served"] == 6
    assert stats["max_in_flight"] == 2  # the client never had more than 2 requests in flight (and did reach 2)
    with pytest.raises(ValueError):
        OpenAIJudgeBackend("local", base_url="http://127.0.0.1:1/v1", max_concurrency=0)


def _stats(srv) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(srv.base_url.rsplit("/v1", 1)[0] + "/stats", timeout=5) as r:
        return json.loads(r.read())


def test_peregrm_authors_reward_over_http_sends_the_papers_sampling(tiny):
    # PereGRM training under the authors' rules over real HTTP: K = 4 samples per dimension in one request
    # (n=4, temperature 0.3), the bystander once; a random judge's unparsed outputs become 0.6 / 0.8, so the
    # reward TRL receives is a number, never None.
    from flythinker.rl import JudgeReward

    model, tok = tiny
    with LoopbackServer(build_app(model, tok)) as srv:
        judge = EmpathyJudge(get_rubric("peregrm"), OpenAIJudgeBackend("local", base_url=srv.base_url),
                             rules="authors", max_new_tokens=4)
        rewards = JudgeReward(judge)(completions=["I am sorry .", "hello"], prompts=["p", "p"],
                                     query=[CTX.query] * 2)
    rep = judge.report()
    assert rep["score_calls"] == 2 * (3 * 4 + 1)
    assert all(isinstance(r, float) for r in rewards)
    assert rep["fallbacks"] == rep["parse_failures"] and rep["items_without_reward"] == 0
