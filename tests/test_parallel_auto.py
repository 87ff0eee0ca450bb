"""parallel="auto" on a CPU: measured (threads vs sequential), cached per machine and pair shape, never assumed."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_ids, single_thread, tiny_pair  # noqa: F401

from flythinker import parallel_auto
from flythinker.workers import InlineWorker, ThreadWorker, shutdown


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path))
    monkeypatch.setattr(parallel_auto, "_MEMO", {})
    monkeypatch.setattr(parallel_auto, "available_cores", lambda: 2)
    return tmp_path


def _fake_measure(threads_ms, sequential_ms, calls):
    def measure(model, rounds=parallel_auto.ROUNDS):
        calls.append(model)
        return threads_ms, sequential_ms
    return measure


@pytest.mark.parametrize(("thr", "seq", "mode"), [(50.0, 100.0, "threads"), (97.0, 100.0, "off"),
                                                  (120.0, 100.0, "off")])
def test_decision_follows_the_measurement(fresh, monkeypatch, thr, seq, mode):
    calls = []
    monkeypatch.setattr(parallel_auto, "measure", _fake_measure(thr, seq, calls))
    model = tiny_pair(parallel="auto")
    d = parallel_auto.decide(model)
    assert d.mode == mode and d.threads_ms == thr and d.sequential_ms == seq and "measured" in d.reason
    worker = model.reasoner_worker()
    assert isinstance(worker, ThreadWorker if mode == "threads" else InlineWorker)
    assert len(calls) == 1  # the worker used the cached decision
    shutdown(model)


def test_cached_in_process_and_on_disk(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(parallel_auto, "measure", _fake_measure(50.0, 100.0, calls))
    model = tiny_pair(parallel="auto")
    first = parallel_auto.decide(model)
    assert parallel_auto.decide(model) is first and len(calls) == 1
    assert first.key in parallel_auto.cached_decisions()
    monkeypatch.setattr(parallel_auto, "_MEMO", {})  # a new process: read from disk, no measurement
    again = parallel_auto.decide(tiny_pair(parallel="auto", seed=5))  # same shapes, other weights
    assert again.mode == "threads" and len(calls) == 1
    other = tiny_pair(parallel="auto", rsn_hidden=16)  # another shape: measured
    parallel_auto.decide(other)
    assert len(calls) == 2
    parallel_auto.decide(model, remeasure=True)
    assert len(calls) == 3

    from flythinker.info import parallel_auto as info_auto

    info = info_auto()
    assert first.key in info["measured"] and info["measured"][first.key]["mode"] == "threads"


def test_one_core_is_sequential_without_measuring(fresh, monkeypatch):
    monkeypatch.setattr(parallel_auto, "available_cores", lambda: 1)
    monkeypatch.setattr(parallel_auto, "measure", lambda *a, **k: pytest.fail("measured on one core"))
    assert parallel_auto.decide(tiny_pair(parallel="auto")).mode == "off"


def test_real_measurement_and_same_tokens(fresh):
    model = tiny_pair(parallel="auto")
    thr, seq = parallel_auto.measure(model, rounds=2)
    assert thr > 0 and seq > 0
    ids = random_ids(1, 7)
    auto = model.generate(ids, max_new_tokens=5, do_sample=False)
    model.config.parallel = "off"
    assert torch.equal(auto, model.generate(ids, max_new_tokens=5, do_sample=False))
    shutdown(model)
