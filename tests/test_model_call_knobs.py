"""Runtime knobs are call arguments: `fusion_lambda`, `loss_impl` and `parallel` per forward / generate call give
what a pair saved with that value gives, and leave the saved config (config.json) as it was."""

from __future__ import annotations

import pytest
import torch

from flythinker import workers
from flythinker.decode import generate_path
from tests.model_helpers import random_ids, split_inputs, tiny_pair


@pytest.fixture(scope="module")
def pair():
    m = tiny_pair(projection="linear", fusion_lambda=0.5)
    yield m
    workers.shutdown(m)


@pytest.mark.parametrize("split", [False, True], ids=["shared_ctx", "split_ctx"])
def test_fusion_lambda_per_call_is_the_pair_saved_with_it(pair, split):
    other = tiny_pair(projection="linear", fusion_lambda=0.2)  # same seeds: the same weights, lambda 0.2 saved
    ids, mask, kw = split_inputs(3, split)
    with torch.no_grad():
        got = pair(ids, attention_mask=mask, use_cache=False, fusion_lambda=0.2, **kw).logits
        want = other(ids, attention_mask=mask, use_cache=False, **kw).logits
        own = pair(ids, attention_mask=mask, use_cache=False, **kw).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, own)
    g = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, **kw)
    ref = other.generate(ids, fast_path=False, **g)
    for fast in (True, False):  # the lean loop and transformers' loop both take it
        assert torch.equal(pair.generate(ids, fast_path=fast, fusion_lambda=0.2, **g), ref)
    assert pair.config.fusion_lambda == 0.5
    workers.shutdown(other)


def test_loss_impl_per_call(pair):
    ids = random_ids(2, 11)
    labels = ids.clone()
    labels[:, :5] = -100
    fused = pair(ids, labels=labels, use_cache=False)
    naive = pair(ids, labels=labels, use_cache=False, loss_impl="naive")
    assert fused.logits is None and naive.logits is not None
    torch.testing.assert_close(fused.loss, naive.loss, rtol=1e-4, atol=1e-5)
    assert pair.config.loss_impl == "fused"


def test_parallel_per_call_names_its_path(pair):
    ids, mask, kw = split_inputs(2, False)
    g = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert generate_path(pair, ids, parallel="threads", **g) == "fast static-cache loop, threads step"
    assert generate_path(pair, ids, **g) == "fast static-cache loop, sequential step"
    assert torch.equal(pair.generate(ids, parallel="threads", **g), pair.generate(ids, **g))
    assert pair.config.parallel == "off"


@pytest.mark.parametrize("kw, match", [
    ({"fusion_lambda": float("nan")}, "fusion_lambda must be a finite number"),
    ({"fusion_lambda": "0.3"}, "fusion_lambda must be a finite number"),
    ({"loss_impl": "liger"}, "loss_impl must be one of"),
    ({"parallel": "gpu"}, "parallel must be one of"),
])
def test_bad_call_values_are_refused(pair, kw, match):
    with pytest.raises(ValueError, match=match):
        pair(random_ids(1, 4), use_cache=False, **kw)


def test_calls_leave_config_json_as_it_was(pair, tmp_path):
    pair.save_pretrained(tmp_path / "before")
    ids = random_ids(1, 6)
    pair(ids, use_cache=False, fusion_lambda=0.1, loss_impl="naive", parallel="threads")
    pair.generate(ids, max_new_tokens=2, do_sample=False, fusion_lambda=0.9, parallel="threads")
    pair.save_pretrained(tmp_path / "after")
    assert (tmp_path / "before" / "config.json").read_text() == (tmp_path / "after" / "config.json").read_text()


def test_runtime_defaults_are_not_saved(tmp_path, caplog):
    """config.json holds what defines the model: `parallel` and `loss_impl` (the defaults of the call arguments) stay
    on the config object of this process only, and a config.json saved with them loads with them ignored."""
    import json

    from flythinker import FlyThinkerForCausalLM

    m = tiny_pair(projection="linear", fusion_lambda=0.5, parallel="threads", loss_impl="naive")
    assert (m.config.parallel, m.config.loss_impl) == ("threads", "naive")  # this process's defaults
    m.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert "parallel" not in saved and "loss_impl" not in saved and saved["fusion_lambda"] == 0.5
    loaded = FlyThinkerForCausalLM.from_pretrained(tmp_path / "new")
    assert (loaded.config.parallel, loaded.config.loss_impl) == ("auto", "fused")
    assert FlyThinkerForCausalLM.from_pretrained(tmp_path / "new", parallel="off").config.parallel == "off"
    # a config.json saved before: its values are ignored, a non-default one named in a warning
    m.save_pretrained(tmp_path / "old")
    old = tmp_path / "old" / "config.json"
    old.write_text(json.dumps({**json.loads(old.read_text()), "parallel": "off", "loss_impl": "fused"}))
    with caplog.at_level("WARNING", logger="flythinker.configuration"):
        loaded = FlyThinkerForCausalLM.from_pretrained(tmp_path / "old")
    assert (loaded.config.parallel, loaded.config.loss_impl) == ("auto", "fused")
    assert "saved parallel is ignored" in caplog.text and "loss_impl" not in caplog.text
    with torch.no_grad():
        ids = random_ids(1, 6)
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, m(ids, use_cache=False).logits)
    workers.shutdown(m)
