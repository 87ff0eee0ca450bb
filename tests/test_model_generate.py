"""FlyThinkerForCausalLM.generate with HF decoding strategies, each against a plain reference where one exists."""

from __future__ import annotations

import pytest
import torch
from model_helpers import (
    PAD,
    random_ids,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_pair,
)
from transformers import (
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TextStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_pair(fusion_lambda=0.8)


@torch.no_grad()
def test_beam_search_best_score_equals_no_cache_recompute(model):
    ids = random_ids(2, 5, seed=20)
    out = model.generate(ids, num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False,
                         length_penalty=0.0, early_stopping=True, pad_token_id=PAD, eos_token_id=None,
                         return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (4, 11)
    P = ids.shape[1]
    for row in range(4):
        seq = out.sequences[row: row + 1]
        logp = torch.log_softmax(model(seq, use_cache=False).logits[0, P - 1: -1].float(), -1)
        score = logp.gather(-1, seq[0, P:, None]).sum()
        torch.testing.assert_close(out.sequences_scores[row], score, atol=1e-4, rtol=1e-4)
    assert out.sequences_scores[0] >= out.sequences_scores[1]
    # beam search really reordered rows: the best beam beats the greedy continuation's score (or equals it)
    greedy = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    glogp = torch.log_softmax(model(greedy, use_cache=False).logits[0, P - 1: -1], -1)
    assert out.sequences_scores[0] >= glogp.gather(-1, greedy[0, P:, None]).sum() - 1e-4


@torch.no_grad()
def test_beam_search_lambda_zero_matches_generator():
    m = tiny_pair(fusion_lambda=0.0)
    ids = random_ids(2, 4, seed=21)
    kw = dict(num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(m.generate(ids, **kw), m.generator.generate(ids, **kw))


@torch.no_grad()
def test_sampling_matches_reference_loop_and_is_reproducible(model):
    ids = random_ids(2, 4, seed=22)
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=8, pad_token_id=PAD,
              eos_token_id=None)
    torch.manual_seed(123)
    a = model.generate(ids, **kw)
    torch.manual_seed(123)
    b = model.generate(ids, **kw)
    assert torch.equal(a, b)
    # reference: full recompute each step, HF's warpers in HF's order, one multinomial draw per step
    procs = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
    torch.manual_seed(123)
    seq = ids
    for _ in range(8):
        logits = model(seq, use_cache=False).logits[:, -1].float()
        probs = torch.softmax(procs(seq, logits), -1)
        seq = torch.cat([seq, torch.multinomial(probs, 1)], 1)
    assert torch.equal(a, seq)
    torch.manual_seed(7)
    assert not torch.equal(model.generate(ids, **kw), a)  # a different seed gives a different sample


@torch.no_grad()
def test_top_k_one_is_greedy_and_top_p_support(model):
    ids = random_ids(1, 4, seed=23)
    greedy = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=PAD, eos_token_id=None)
    torch.manual_seed(0)
    k1 = model.generate(ids, do_sample=True, top_k=1, max_new_tokens=6, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(greedy, k1)
    # every token drawn with top_p=0.5 lies in the nucleus of the recomputed distribution
    torch.manual_seed(1)
    seq = model.generate(ids, do_sample=True, top_k=0, top_p=0.5, max_new_tokens=6, pad_token_id=PAD,
                         eos_token_id=None)
    P = ids.shape[1]
    probs = torch.softmax(model(seq, use_cache=False).logits[0, P - 1: -1], -1)
    for t in range(6):
        p_sorted, order = probs[t].sort(descending=True)
        keep = (p_sorted.cumsum(0) - p_sorted) < 0.5
        assert seq[0, P + t] in order[keep]


@torch.no_grad()
def test_num_return_sequences_sampling(model):
    ids = random_ids(2, 4, seed=24)
    torch.manual_seed(5)
    out = model.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=5, pad_token_id=PAD,
                         eos_token_id=None)
    assert out.shape == (6, 9)
    assert torch.equal(out[:, :4], ids.repeat_interleave(3, 0))
    torch.manual_seed(5)
    same = model.generate(ids.repeat_interleave(3, 0), do_sample=True, max_new_tokens=5, pad_token_id=PAD,
                          eos_token_id=None)
    assert torch.equal(out, same)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


class FakeTokenizer:
    def decode(self, ids, **kwargs):
        return "".join(f"<{int(i)}>" for i in ids)


@torch.no_grad()
def test_streamers(model, capsys):
    ids = random_ids(1, 4, seed=25)
    s = Collect()
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None, streamer=s)
    assert s.ended and torch.equal(s.chunks[0].reshape(-1), ids[0])
    assert torch.equal(torch.cat([c.reshape(-1) for c in s.chunks[1:]]), out[0, 4:])
    model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                   streamer=TextStreamer(FakeTokenizer(), skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.strip() == FakeTokenizer().decode(out[0, 4:])


class StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@torch.no_grad()
def test_stopping_criteria_max_new_tokens_and_eos(model):
    ids = random_ids(1, 4, seed=26)
    kw = dict(do_sample=False, pad_token_id=PAD, eos_token_id=None)
    full = model.generate(ids, max_new_tokens=10, **kw)
    assert full.shape == (1, 14)
    stopped = model.generate(ids, max_new_tokens=10, stopping_criteria=StoppingCriteriaList([StopAfter(7)]), **kw)
    assert torch.equal(stopped, full[:, :7])
    # eos: pick the third generated token as eos (first occurrence): generation stops right after it
    eos = int(full[0, 6])
    first = 4 + int((full[0, 4:] == eos).nonzero()[0])
    kw["eos_token_id"] = eos
    out = model.generate(ids, max_new_tokens=10, **kw)
    assert torch.equal(out, full[:, : first + 1])
    # in a batch, a finished row is padded with pad_token_id while the other goes on
    ids2 = torch.cat([ids, random_ids(1, 4, seed=27)])
    other = model.generate(ids2[1:], max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    if eos not in other[0, 4:].tolist():
        both = model.generate(ids2, max_new_tokens=10, **kw)
        assert torch.equal(both[0, : first + 1], full[0, : first + 1])
        assert (both[0, first + 1:] == PAD).all() and torch.equal(both[1], other[0])


@torch.no_grad()
def test_user_cache_is_filled_and_returned(model):
    from flythinker import FlyThinkerCache

    ids = random_ids(1, 4, seed=28)
    cache = FlyThinkerCache(generator_config=model.config.generator, reasoner_config=model.config.reasoner)
    out = model.generate(ids, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=PAD,
                         eos_token_id=None, return_dict_in_generate=True)
    assert out.cache is cache and cache.get_seq_length() == 7 and cache.reasoner.get_seq_length() == 7
    plain = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(out.sequences, plain)
