"""parallel="auto" on a CPU: measured (threads vs sequential), cached per machine and pair shape while fresh, never
assumed."""

from __future__ import annotations

import io
import json
import os
import time

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
    monkeypatch.setattr(parallel_auto, "load_average", lambda: list(IDLE))  # the real load is whatever runs here
    monkeypatch.delenv(parallel_auto.MAX_AGE_ENV, raising=False)
    return tmp_path


IDLE = (0.1, 0.1, 0.1)
DAY = 86400.0


def _busy() -> list[float]:
    """A load average above what counts as idle on this machine's cores."""
    return [parallel_auto.load_limit(os.cpu_count()) + 1.0] * 3


def _rewrite(cache, key, drop=(), **fields):
    """Change the saved entry of `key` as another process (or an older flythinker) would have left it."""
    path = cache / "parallel_auto.json"
    data = json.loads(path.read_text())
    data[key].update(fields)
    for f in drop:
        del data[key][f]
    path.write_text(json.dumps(data))


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


def test_entry_records_when_and_under_what_load(fresh, monkeypatch):
    monkeypatch.setattr(parallel_auto, "measure", _fake_measure(50.0, 100.0, []))
    before = time.time()
    d = parallel_auto.decide(tiny_pair(parallel="auto"))
    saved = parallel_auto.cached_decisions()[d.key]
    assert before <= saved["measured_at"] <= time.time()
    assert saved["load_avg"] == list(IDLE) and saved["cpu_count"] == os.cpu_count()
    assert saved["fingerprint"] == parallel_auto.fingerprint() and saved["fingerprint"]["torch"] == torch.__version__


def test_old_entry_is_remeasured(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(parallel_auto, "measure", _fake_measure(50.0, 100.0, calls))
    model = tiny_pair(parallel="auto")
    key = parallel_auto.decide(model).key
    _rewrite(fresh, key, measured_at=time.time() - 40 * DAY)
    monkeypatch.setattr(parallel_auto, "_MEMO", {})
    monkeypatch.setenv(parallel_auto.MAX_AGE_ENV, "60")  # a longer limit keeps it
    assert parallel_auto.decide(model).mode == "threads" and len(calls) == 1
    monkeypatch.setattr(parallel_auto, "_MEMO", {})
    monkeypatch.delenv(parallel_auto.MAX_AGE_ENV)  # the default, 30 days: measured again, and saved fresh
    monkeypatch.setattr(parallel_auto, "measure", _fake_measure(120.0, 100.0, calls))
    assert parallel_auto.decide(model).mode == "off" and len(calls) == 2
    assert time.time() - parallel_auto.cached_decisions()[key]["measured_at"] < DAY


def test_loaded_entry_is_remeasured_until_measured_idle(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(parallel_auto, "measure", _fake_measure(50.0, 100.0, calls))
    monkeypatch.setattr(parallel_auto, "load_average", _busy)
    model = tiny_pair(parallel="auto")
    key = parallel_auto.decide(model).key
    assert "under load" in parallel_auto.stale_reason(parallel_auto.cached_decisions()[key])
    monkeypatch.setattr(parallel_auto, "_MEMO", {})
    assert len(calls) == 1
    parallel_auto.decide(model)  # a new process on a still loaded machine: measured again
    assert len(calls) == 2
    monkeypatch.setattr(parallel_auto, "load_average", lambda: list(IDLE))
    monkeypatch.setattr(parallel_auto, "_MEMO", {})
    parallel_auto.decide(model)  # measured again, now idle
    monkeypatch.setattr(parallel_auto, "_MEMO", {})
    parallel_auto.decide(model)  # that one is kept
    assert len(calls) == 3


def test_old_format_entry_is_stale(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(parallel_auto, "measure", _fake_measure(120.0, 100.0, calls))
    model = tiny_pair(parallel="auto")
    key = parallel_auto.decision_key(model)
    old = {"cores": 2, "key": key, "mode": "threads", "reason": "measured one-token step: ...", "sequential_ms": 695.0,
           "threads_ms": 400.0, "torch_threads": torch.get_num_threads()}  # as flythinker saved entries before
    (fresh / "parallel_auto.json").write_text(json.dumps({key: old}))
    assert "old-format" in parallel_auto.stale_reason(old)
    assert parallel_auto.decide(model).mode == "off" and len(calls) == 1
    assert parallel_auto.stale_reason(parallel_auto.cached_decisions()[key]) is None


def test_other_versions_are_remeasured(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(parallel_auto, "measure", _fake_measure(50.0, 100.0, calls))
    model = tiny_pair(parallel="auto")
    parallel_auto.decide(model)
    real = parallel_auto.fingerprint()
    monkeypatch.setattr(parallel_auto, "fingerprint", lambda: real | {"torch": "99.0"})  # torch upgraded
    monkeypatch.setattr(parallel_auto, "_MEMO", {})
    parallel_auto.decide(model)
    assert len(calls) == 2


@pytest.mark.parametrize(("change", "why"), [
    ({}, None),
    ({"measured_at": 1000.0 - 31 * DAY}, "older than the 30.0 days limit"),
    ({"load_avg": [3.5, 3.0, 2.0], "cpu_count": 2}, "under load: 1-min load 3.50 on 2 cores"),
    ({"load_avg": [1.9, 1.0, 1.0], "cpu_count": 2}, None),  # at most 1 + 0.5 x 2: the measuring process's own
    ({"load_avg": None}, None),  # no load average on this platform: nothing to judge by
    ({"fingerprint": {"torch": "1.0", "cpu": "x"}}, "another set-up (torch 1.0 -> 2.0)"),
    ({"measured_at": 2000.0}, "the clock was changed"),
    ({"mode": "fast"}, "no usable decision"),
])
def test_stale_reason(change, why):
    entry = {"mode": "threads", "reason": "r", "measured_at": 1000.0 - DAY, "load_avg": [0.2, 0.2, 0.2],
             "cpu_count": 2, "fingerprint": {"torch": "2.0", "cpu": "x"}} | change
    got = parallel_auto.stale_reason(entry, now=1000.0, max_age_s=30 * DAY, current={"torch": "2.0", "cpu": "x"})
    assert got is None if why is None else why in got


def test_unreadable_max_age_falls_back(monkeypatch):
    monkeypatch.setenv(parallel_auto.MAX_AGE_ENV, "a month")
    with pytest.warns(UserWarning, match="not a number"):
        assert parallel_auto.max_age_days() == parallel_auto.MAX_AGE_DAYS


def test_info_says_what_auto_would_do(fresh, monkeypatch):
    from flythinker.cli.info import print_info
    from flythinker.info import parallel_auto as info_auto

    monkeypatch.setenv("FLYTHINKER_NO_CPP", "1")  # `info` must not JIT-build the C++ op inside the test
    monkeypatch.setattr(parallel_auto, "measure", _fake_measure(50.0, 100.0, []))
    keys = [parallel_auto.decide(tiny_pair(parallel="auto", rsn_hidden=h)).key for h in (16, 24, 32, 40)]
    _rewrite(fresh, keys[1], measured_at=time.time() - 40 * DAY)
    _rewrite(fresh, keys[2], load_avg=_busy())
    _rewrite(fresh, keys[3], drop=("measured_at", "load_avg", "cpu_count", "fingerprint"))
    measured = info_auto()["measured"]
    assert [measured[k]["would"] for k in keys] == ["threads", "re-measure", "re-measure", "re-measure"]
    assert measured[keys[0]]["load_avg"] == list(IDLE) and 0 <= measured[keys[0]]["age_s"] < DAY
    buf = io.StringIO()
    print_info(out=buf)
    lines = {k: next(ln for ln in buf.getvalue().splitlines() if k in ln) for k in keys}
    assert "would pick threads: measured one-token step" in lines[keys[0]] and "1-min load 0.10" in lines[keys[0]]
    assert "would re-measure: measured 40.0 days ago, older than the 30.0 days limit" in lines[keys[1]]
    assert "would re-measure: measured under load" in lines[keys[2]]
    assert "would re-measure: old-format entry" in lines[keys[3]]


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
