"""generate() takes the lean static-cache loop when it is token-identical, names the loop a call takes, and
falls back to transformers' loop for everything else."""

from __future__ import annotations

import logging

import pytest
import torch
from model_helpers import EOS, left_pad, random_ids, single_thread, tiny_pair  # noqa: F401
from transformers.utils import logging as hf_logging

from flythinker import workers
from flythinker.decode import generate_path
from flythinker.sampling import FusedSamplingLogitsProcessor


@pytest.fixture(scope="module")
def pair():
    m = tiny_pair()
    yield m
    workers.shutdown(m)


def _inputs(split):
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (9, 13, 5)])
    kw = {}
    if split:
        rids, rmask = left_pad([random_ids(1, n, seed=n + 50)[0] for n in (20, 7, 15)])
        kw = {"reasoner_input_ids": rids, "reasoner_attention_mask": rmask}
    return ids, mask, kw


@pytest.mark.parametrize("split", [False, True], ids=["shared_ctx", "split_ctx"])
@pytest.mark.parametrize("mode", ["off", "threads"])
def test_fast_path_is_token_identical(pair, split, mode):
    ids, mask, kw = _inputs(split)
    kw["parallel"] = mode  # per call: the saved config stays "off"
    ref = pair.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, fast_path=False, **kw)
    assert generate_path(pair, ids, attention_mask=mask, do_sample=False, fast_path=False) == "transformers generate"
    out = pair.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, **kw)
    want = "sequential" if mode == "off" else "threads"
    assert generate_path(pair, ids, attention_mask=mask, max_new_tokens=9, do_sample=False, **kw) == (
        f"fast static-cache loop, {want} step")
    assert torch.equal(pair.generate(ids, attention_mask=mask, max_new_tokens=9, fast_path=True, **kw), ref)
    assert pair.config.parallel == "off"
    assert torch.equal(out, ref)


def test_fast_path_with_eos_and_seeded_fused_sampler(pair):
    ids, mask, _ = _inputs(False)
    gc = {"eos_token_id": EOS, "pad_token_id": 0}
    ref = pair.generate(ids, attention_mask=mask, max_new_tokens=12, fast_path=False, **gc,
                        **FusedSamplingLogitsProcessor(temperature=1.5, top_k=20, seed=3).generate_kwargs())
    out = pair.generate(ids, attention_mask=mask, max_new_tokens=12, **gc,
                        **FusedSamplingLogitsProcessor(temperature=1.5, top_k=20, seed=3).generate_kwargs())
    assert generate_path(pair, ids, attention_mask=mask, max_new_tokens=12, **gc, **FusedSamplingLogitsProcessor(
        temperature=1.5, top_k=20, seed=3).generate_kwargs()).startswith("fast static-cache loop")
    assert torch.equal(out, ref)
    assert not out.is_inference()


@pytest.mark.parametrize("extra", [
    {"num_beams": 2}, {"output_scores": True, "return_dict_in_generate": True}, {"repetition_penalty": 1.3},
    {"do_sample": True}, {"min_new_tokens": 3},
], ids=lambda d: next(iter(d)))
def test_other_calls_fall_back(pair, extra, caplog):
    ids, mask, _ = _inputs(False)
    hf_logging.set_verbosity_debug()
    try:
        with caplog.at_level(logging.DEBUG, logger="flythinker.decode"):
            pair.generate(ids, attention_mask=mask, max_new_tokens=3, **extra)
    finally:
        hf_logging.set_verbosity_warning()
    assert generate_path(pair, ids, attention_mask=mask, max_new_tokens=3, **extra) == "transformers generate"
    assert any("transformers' loop" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="fast_path=True: the lean loop does not reproduce this call"):
        pair.generate(ids, attention_mask=mask, max_new_tokens=3, fast_path=True, **extra)


def test_right_padded_prompt_falls_back(pair):
    ids, mask, _ = _inputs(False)
    ids, mask = ids.flip(1), mask.flip(1)  # right padding: the fast loop needs the last position real
    a = pair.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert generate_path(pair, ids, attention_mask=mask, max_new_tokens=3) == "transformers generate"
    assert torch.equal(a, pair.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                        fast_path=False))


def test_left_pad_batches_lists_and_tensors_and_refuses_empty_rows():
    from flythinker.decode import left_pad as pad_rows

    ids, mask = pad_rows([[5, 6, 7], torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    for bad in ([], [[1], []]):
        with pytest.raises(ValueError, match="at least one"):
            pad_rows(bad, pad_id=0)
