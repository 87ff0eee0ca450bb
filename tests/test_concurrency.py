"""Concurrent think-while-generating decode: parallel == sequential, fast_generate == generate,
pipelined prefill == plain prefill, clean worker shutdown."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from model_helpers import EOS, left_pad, random_ids, tiny_pair

import flythinker
from flythinker import prefill as pf
from flythinker import workers as cc
from flythinker.sampling import FusedSamplingLogitsProcessor

ROWS = (9, 13, 5, 11)
R_ROWS = (20, 7, 15, 12)


def _inputs(batch: int, split: bool):
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in ROWS[:batch]])
    kw = {}
    if split:
        rids, rmask = left_pad([random_ids(1, n, seed=n + 50)[0] for n in R_ROWS[:batch]])
        kw = dict(reasoner_input_ids=rids, reasoner_attention_mask=rmask)
    return ids, mask, kw


@pytest.fixture(scope="module")
def pair():
    m = tiny_pair()
    yield m
    cc.shutdown(m)


def _gen(model, mode, ids, mask, kw, sample_seed=None, **extra):
    model.config.parallel = mode
    if sample_seed is None:
        extra.setdefault("do_sample", False)
        return model.generate(ids, attention_mask=mask, max_new_tokens=10, **kw, **extra)
    torch.manual_seed(sample_seed)  # HF's own multinomial sampling, seeded
    return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0, **kw, **extra)


@pytest.mark.parametrize("split", [False, True], ids=["shared", "split"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_parallel_matches_sequential(pair, split, batch, sampling):
    ids, mask, kw = _inputs(batch, split)
    seed = 7 if sampling else None
    ref = _gen(pair, "off", ids, mask, kw, seed)
    threads_seen = set()
    hook = pair.reasoner.get_decoder().register_forward_pre_hook(
        lambda *a: threads_seen.add(threading.current_thread().name))
    try:
        out = _gen(pair, "threads", ids, mask, kw, seed)
    finally:
        hook.remove()
        pair.config.parallel = "off"
    assert torch.equal(ref, out)
    assert out.shape == (batch, ids.shape[1] + 10)
    assert "flythinker-reasoner" in threads_seen  # the decode steps really ran on the worker


def test_fused_sampler_parallel_matches_sequential(pair):
    ids, mask, kw = _inputs(4, False)
    outs = []
    for mode in ("off", "threads"):
        proc = FusedSamplingLogitsProcessor(temperature=0.8, top_k=30, top_p=0.9, seed=11)
        outs.append(_gen(pair, mode, ids, mask, kw, **proc.generate_kwargs()))
    pair.config.parallel = "off"
    assert torch.equal(*outs)


@pytest.mark.parametrize("split", [False, True], ids=["shared", "split"])
@pytest.mark.parametrize("mode", ["off", "threads"])
def test_fast_generate_matches_generate(pair, split, mode):
    ids, mask, kw = _inputs(4, split)
    pair.config.parallel = mode
    try:
        ref = pair.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, fast_path=False, **kw)
        out = flythinker.fast_generate(pair, ids, attention_mask=mask, max_new_tokens=8, **kw)
        assert torch.equal(ref, out)
        proc = FusedSamplingLogitsProcessor(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, seed=3)
        ref_s = pair.generate(ids, attention_mask=mask, max_new_tokens=8, fast_path=False, **kw,
                              **proc.generate_kwargs())
        out_s = flythinker.fast_generate(pair, ids, attention_mask=mask, max_new_tokens=8, do_sample=True,
                                         temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, seed=3, **kw)
        assert torch.equal(ref_s, out_s)
        assert not torch.equal(ref_s, ref)  # the sampled run really sampled
    finally:
        pair.config.parallel = "off"


@pytest.mark.parametrize("check_every", [1, 4])
def test_fast_generate_eos_matches_generate(pair, check_every):
    ids, mask, kw = _inputs(4, False)
    free = pair.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    new = free[:, ids.shape[1]:]
    eos = int(new[0, 2])  # a token row 0 emits early: rows finish at different steps (or not at all)
    ref = pair.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                        pad_token_id=0, fast_path=False)  # HF's own loop: the oracle
    out = flythinker.fast_generate(pair, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos,
                                   pad_token_id=0, check_every=check_every)
    assert torch.equal(ref, out)
    assert out.shape[1] <= free.shape[1] and (out[:, ids.shape[1]:] == eos).any()


def test_fast_generate_streamer_and_errors(pair):
    ids, mask, _ = _inputs(1, False)

    class Rec:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, x):
            self.parts.append(x)

        def end(self):
            self.ended = True

    rec = Rec()
    out = flythinker.fast_generate(pair, ids, max_new_tokens=5, eos_token_id=EOS, streamer=rec)
    assert rec.ended and torch.equal(rec.parts[0], ids)
    assert torch.equal(torch.stack([p for p in rec.parts[1:]], 1), out[:, ids.shape[1]:])
    with pytest.raises(ValueError, match="max_new_tokens"):
        flythinker.fast_generate(pair, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="input_ids"):
        flythinker.fast_generate(pair, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        flythinker.fast_generate(pair, ids, attention_mask=mask[:, 1:], max_new_tokens=2)


@pytest.mark.parametrize("split", [False, True], ids=["shared", "split"])
@pytest.mark.parametrize("fuse_prompt", [True, False])
def test_pipelined_prefill_matches_plain(split, fuse_prompt):
    """The overlapped prefill (chunks / prompt-minus-last) gives the plain prefill's logits, latents and caches."""
    model = tiny_pair(fuse_prompt=fuse_prompt)
    ids, mask, kw = _inputs(4, split)
    ids = torch.cat([ids, random_ids(4, 17, seed=5)], 1)  # long enough for 4 chunks
    mask = torch.cat([mask, torch.ones(4, 17, dtype=mask.dtype)], 1)
    res = {}
    try:
        for mode in ("off", "threads"):
            model.config.parallel = mode
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
            res[mode] = out
    finally:
        cc.shutdown(model)
    a, b = res["off"], res["threads"]
    real = mask.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.cache.latents, b.cache.latents, rtol=1e-5, atol=1e-5)
    r_real = kw["reasoner_attention_mask"].bool() if split else real
    for part, keep in (("reasoner", r_real), ("generator", real)):
        for la, lb in zip(getattr(a.cache, part).layers, getattr(b.cache, part).layers, strict=True):
            # [B, heads, T, D]; pad slots hold garbage from fully-masked queries (never attended): real ones only
            for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
                torch.testing.assert_close(x.transpose(1, 2)[keep], y.transpose(1, 2)[keep], rtol=1e-5, atol=1e-5)


def test_chunk_bounds():
    assert pf.chunk_bounds(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert pf.chunk_bounds(2, 4) == [(0, 1), (1, 2)]
    assert pf.chunk_bounds(7, 1) == [(0, 7)]


def test_worker_errors_threads_and_modes(monkeypatch):
    w = cc.ThreadWorker(num_threads=1, main_threads=1).start()
    try:
        w.submit(torch.get_num_threads)
        assert w.result() == 1  # intra-op threads are per thread: the worker's own setting
        main = torch.get_num_threads()
        w.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            w.result()
        with pytest.raises(RuntimeError, match="without a submitted job"):
            w.result()
        # a failing generator half still waits for the reasoner half before raising
        done = []
        with pytest.raises(KeyError):
            w.run_pair(lambda: {}["x"], lambda: done.append(1))
        assert done == [1]
        assert torch.get_num_threads() == main
        # grad / inference mode of the caller is replayed in the worker
        with torch.inference_mode():
            w.submit(lambda: torch.ones(2) * 2)
            assert w.result().is_inference()
        with torch.enable_grad():
            x = torch.ones(2, requires_grad=True)
            w.submit(lambda: (x * 3).sum())
            assert w.result().requires_grad
    finally:
        w.close()
    assert not w.alive
    with pytest.raises(ValueError, match="streams"):
        cc.resolve_mode("streams", torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="parallel"):
        cc.resolve_mode("fast", torch.device("cpu"), torch.device("cpu"))
    monkeypatch.setattr(cc, "available_cores", lambda: 1)
    assert cc.resolve_mode("auto", torch.device("cpu"), torch.device("cpu")) == "off"
    monkeypatch.setattr(cc, "available_cores", lambda: 2)
    assert cc.resolve_mode("auto", torch.device("cpu"), torch.device("cpu")) == "threads"
    assert cc.split_cores(2) == (1, 1) and cc.split_cores(5) == (3, 2)


def _workers_alive() -> int:
    return sum(t.name.startswith("flythinker-") for t in threading.enumerate())


def test_worker_shutdown_clean():
    before = _workers_alive()
    model = tiny_pair(parallel="threads")
    ids, mask, _ = _inputs(2, False)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert _workers_alive() == before + 1
    cc.shutdown(model)
    assert _workers_alive() == before
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)  # restarts lazily
    assert _workers_alive() == before + 1
    del model
    gc.collect()
    for _ in range(100):  # the finalizer joins the thread
        if _workers_alive() == before:
            break
        threading.Event().wait(0.05)
    assert _workers_alive() == before


def test_two_caller_threads_share_one_model():
    """Two threads generating with one model at once (a server): each caller gets its own worker, so neither
    collects the other's latents; both equal the sequential result."""
    model = tiny_pair(parallel="threads")
    jobs = [_inputs(b, split) for b, split in ((1, False), (4, True))]
    want = [_gen(model, "off", *job) for job in jobs]
    model.config.parallel = "threads"
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for _ in range(3):
                ids, mask, kw = jobs[i]
                got[i] = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw)
                assert torch.equal(got[i], want[i])
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    callers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=120)
    assert not errors, errors
    assert set(got) == {0, 1}
    cc.shutdown(model)
