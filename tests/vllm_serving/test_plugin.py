"""The plugin's registration and its refusals (no engine needed)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from flythinker.configuration import FlyThinkerConfig
from flythinker.serving import ARCHITECTURE, register
from flythinker.serving.latent_cache import store_geometry
from flythinker.serving.model import check_servable


def _config(**fusion):
    kw = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=70,
              intermediate_size=64)
    return FlyThinkerConfig(generator=LlamaConfig(**kw), reasoner=Qwen2Config(**kw), **fusion)


def test_register_makes_the_architecture_and_config_known():
    from vllm import ModelRegistry

    register()
    register()  # idempotent: vLLM calls it once per process, tests may call it again
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    cfg = AutoConfig.for_model("flythinker", generator={"model_type": "llama", "vocab_size": 70},
                               reasoner={"model_type": "qwen2", "vocab_size": 70})
    assert isinstance(cfg, FlyThinkerConfig) and cfg.reasoner.model_type == "qwen2"


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("flythinker") == "flythinker.serving:register"


def test_refusals_name_the_problem():
    check_servable(_config())
    with pytest.raises(NotImplementedError, match="fuse_prompt=False"):
        check_servable(_config(fuse_prompt=False))
    cfg = _config()
    cfg.generator.model_type = "gemma"
    with pytest.raises(ValueError, match="generator is a 'gemma' model"):
        check_servable(cfg)


@pytest.mark.parametrize("hidden", [1, 32, 64, 65, 576, 896])
def test_store_rows_hold_a_latent(hidden):
    n, hs = store_geometry(hidden)
    assert 2 * hs * n >= hidden > 2 * hs * (n - 1)


def test_split_plan_follows_the_alignment_rule():
    """Q = 3 reasoner-view tokens, P = 2 generator-view tokens, two reply tokens, all in one step, next to a
    shared-context row of 3 tokens (docs/design.md: G's position P-1+k reads R's position Q-2+k)."""
    import torch

    from flythinker.serving.requests import RowInfo
    from flythinker.serving.split import plan

    prompt = [11, 12, 13, 21, 22]
    ids = torch.tensor(prompt + [31, 32] + [5, 6, 7])
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    qsl = torch.tensor([0, 7, 10], dtype=torch.int32)
    p = plan(pos, ids, qsl, {0: RowInfo(3, prompt)})
    r, g = p.reasoner, p.generator
    assert r.take.tolist() == [0, 1, 2, 5, 6, 7, 8, 9] and r.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert g.take.tolist() == [3, 4, 5, 6, 7, 8, 9] and g.positions.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert r.counts.tolist() == [5, 3] and g.counts.tolist() == [4, 3]
    assert r.seq_lens.tolist() == [5, 3] and g.seq_lens.tolist() == [4, 3]
    # G's view token 0 gets nothing; its last prompt token (g pos 1) gets R pos Q-2 = 1; replies get 2, 3
    assert p.src_valid.tolist() == [False, True, True, True, False, True, True]
    assert p.src_positions[p.src_valid].tolist() == [1, 2, 3, 0, 1]
    with pytest.raises(RuntimeError, match="do not match"):
        plan(pos, ids.flip(0), qsl, {0: RowInfo(3, prompt)})
    with pytest.raises(ValueError, match="at least one token"):
        plan(pos, ids, qsl, {0: RowInfo(5, prompt)})
    assert plan(pos, ids, qsl, {}) is None


def test_rewrite_body_checks_reasoner_views():
    import json

    from flythinker.serving.server import RequestError, rewrite_body

    def no_tokenizer():
        raise AssertionError("not needed")

    assert rewrite_body(b'{"model": "m", "messages": []}', "/v1/chat/completions", no_tokenizer) is None
    assert rewrite_body(b"not json", "/v1/chat/completions", no_tokenizer) is None
    for body, path, match in [
        ({"messages": [], "reasoner_messages": 3}, "/v1/chat/completions", "reasoner_messages"),
        ({"prompt": "text", "reasoner_prompt": "x"}, "/v1/completions", "is for /v1/chat/completions"),
        ({"prompt": [1, 2], "vllm_xargs": {"flythinker_reasoner_tokens": 2}}, "/v1/completions", r"\[1, 1\]"),
        ({"prompt": "ab", "vllm_xargs": {"flythinker_reasoner_tokens": 1}}, "/v1/completions", "list of token"),
    ]:
        loader = no_tokenizer if "reasoner_messages" not in body else _fake_tokenizer
        with pytest.raises(RequestError, match=match):
            rewrite_body(json.dumps(body).encode(), path, loader)


def _fake_tokenizer():
    raise AssertionError("the messages check comes first")


def test_hostile_bodies_are_request_errors_and_split_prompts_carry_their_length():
    """No engine needed: what the middleware refuses (a lone surrogate, a body nested too deeply, vllm_xargs that
    is not an object) and the prompt length it adds to a split completion, which the engine-side check compares
    with the prompt vLLM will run (test_serve.py's fuzz test does the same through a real server)."""
    import json

    from flythinker.serving.server import RequestError, rewrite_body

    def no_tokenizer():
        raise AssertionError("not needed")

    for body, match in [(b'{"messages": [], "reasoner_prompt": "bad \\ud800 text"}', "not valid Unicode"),
                        (b"[" * 100_000, "nested too deeply"),
                        (b'{"messages": [], "reasoner_prompt": "x", "vllm_xargs": [1]}', "vllm_xargs must be")]:
        with pytest.raises(RequestError, match=match):
            rewrite_body(body, "/v1/chat/completions", no_tokenizer)
    out = rewrite_body(json.dumps({"prompt": [5, 6, 7], "vllm_xargs": {"flythinker_reasoner_tokens": 1}}).encode(),
                       "/v1/completions", no_tokenizer)
    assert json.loads(out)["vllm_xargs"] == {"flythinker_reasoner_tokens": 1, "flythinker_prompt_tokens": 3}


def test_split_requests_keep_their_kv_blocks_to_themselves():
    """A split request's generator KV lives in its reasoner view's blocks (docs/caching.md): two split requests
    must never share blocks through prefix caching (each gets its own cache salt, a client's salt included), and
    n > 1 (samples sharing the prompt's blocks) is a clear error."""
    import json

    from flythinker.serving.server import RequestError, rewrite_body

    def no_tokenizer():
        raise AssertionError("not needed")

    body = {"prompt": [5, 6, 7], "vllm_xargs": {"flythinker_reasoner_tokens": 1}, "cache_salt": "mine"}
    salts = {json.loads(rewrite_body(json.dumps(body).encode(), "/v1/completions", no_tokenizer))["cache_salt"]
             for _ in range(3)}
    assert len(salts) == 3 and "mine" not in salts
    for field in ("n", "best_of"):
        with pytest.raises(RequestError, match=f"{field}=2 is not supported"):
            rewrite_body(json.dumps({**body, field: 2}).encode(), "/v1/completions", no_tokenizer)
    plain = {"prompt": [5, 6, 7], "n": 2}  # not split: untouched
    assert rewrite_body(json.dumps(plain).encode(), "/v1/completions", no_tokenizer) is None


def test_admission_check_on_the_prompt_the_engine_runs():
    from types import SimpleNamespace

    from flythinker.serving.requests import check_admitted

    def params(prompt_logprobs=None, **xargs):
        return SimpleNamespace(extra_args=xargs, prompt_logprobs=prompt_logprobs)

    check_admitted([1, 2, 3], params())  # shared context
    check_admitted([1, 2, 3], params(flythinker_reasoner_tokens=2, flythinker_prompt_tokens=3))
    for ids, p, match in [
        ([1, 2, 3], params(flythinker_reasoner_tokens=3), r"\[1, 2\]"),  # no generator view left
        ([1, 2], params(flythinker_reasoner_tokens=1, flythinker_prompt_tokens=5), "instead of the 5 sent"),
        ([1, 2, 3], params(prompt_logprobs=1, flythinker_reasoner_tokens=1), "prompt_logprobs"),
        ([1, 2, 3], params(flythinker_prompt_tokens=3), "only meaningful"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_admitted(ids, p)
    from vllm.v1.engine.input_processor import InputProcessor

    from flythinker.serving import install_admission_check

    install_admission_check()
    assert getattr(InputProcessor.process_inputs, "_flythinker_checked", False)  # register() installed it once
