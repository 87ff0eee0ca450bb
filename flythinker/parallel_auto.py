"""What `parallel="auto"` means for a pair on a CPU: measured per machine and pair shape, cached while fresh.

On a GPU "auto" is side streams (the halves overlap without sharing compute). On a CPU the choice is between

- "threads": the reasoner's one-token step on its own core(s) beside the generator's, each with half the cores
  (`workers.split_cores`), step time ~ max(t_g(n/2 cores), t_r(n/2 cores));
- "off": the halves one after the other, each with all the cores, step time ~ t_g(n) + t_r(n).

Which is faster depends on how well one model's step scales from n/2 to n cores, which a core count cannot tell:
a batch-1 decode step is bound by streaming weights, and on some machines one core streams nearly as fast as two
(then "threads" wins: two models in the time of one), on others it does not (two same-size models, each on one
core, measured 0.51x the generator alone against 0.5x run one after the other on two cores). So "auto" measures it:
the pair's own one-token step (generator with its LM head, reasoner without), batch 1, over a short cached context,
run both ways, interleaved, `ROUNDS` times; "threads" is picked only if its median step is below `MARGIN` times the
sequential one (a tie goes to sequential: "auto" is never slower than "off" by more than the measurement's noise).
With fewer than 2 cores it is "off" without measuring.

The decision is cached per process and on disk (`$FLYTHINKER_CACHE/parallel_auto.json`, keyed by the machine's
cores, the torch thread count and both models' shapes and dtypes; written atomically under a file lock). Each
entry records when it was measured, the load average then, the machine's core count and a fingerprint of what
the timing depends on (torch, transformers, flythinker and Python versions, the CPU model). A new process reuses
an entry only while it is fresh; it measures again (`stale_reason` says why) when the entry

- is older than `max_age_days()` (`MAX_AGE_DAYS`, 30, or `$FLYTHINKER_PARALLEL_AUTO_MAX_AGE_DAYS`; 0 measures in
  every new process),
- was measured under load: the 1-minute load average, less 1 for the measuring process itself, above
  `LOAD_FRACTION` (0.5) of the machine's cores (on 2 cores: a load above 2),
- has another fingerprint than this process (say torch was upgraded or the cache folder moved to another CPU),
- or is in the old format, without these records.

A process measures at most once per pair shape and keeps its decision for its life (`decide(model,
remeasure=True)` measures again). On a machine that stays loaded every new process measures once, as each of
its measurements is marked loaded too. `cached_decisions()` and `entry_status()` are what `flythinker info`
prints.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flythinker.workers import InlineWorker, ThreadWorker, available_cores, split_cores

ROUNDS = 7  # interleaved step pairs per mode (plus one warm-up each)
MARGIN = 0.95  # threads must beat sequential by 5%
CONTEXT = 32  # cached tokens the measured steps attend to
MAX_AGE_DAYS = 30.0  # an entry older than this is measured again ($FLYTHINKER_PARALLEL_AUTO_MAX_AGE_DAYS overrides)
MAX_AGE_ENV = "FLYTHINKER_PARALLEL_AUTO_MAX_AGE_DAYS"
LOAD_FRACTION = 0.5  # measured under load: 1-min load, less OWN_LOAD, above this fraction of the machine's cores
OWN_LOAD = 1.0  # what the measuring process itself adds to the load average
_RECORDS = ("measured_at", "load_avg", "cpu_count", "fingerprint")  # what an entry in the old format lacks
_MEMO: dict[str, Decision] = {}
_MEMO_LOCK = threading.Lock()


@dataclass
class Decision:
    """`mode` ("threads" | "off") and why: the measured median step times (ms) of both ways, and the conditions
    of the measurement (when, the load average, the machine's cores, the versions: see `stale_reason`)."""

    mode: str
    reason: str
    threads_ms: float | None = None
    sequential_ms: float | None = None
    cores: int = 1
    torch_threads: int = 1
    key: str = ""
    measured_at: float | None = None  # time.time() of the measurement
    load_avg: list[float] | None = None  # os.getloadavg() (1, 5, 15 min) just before it; None where unknown
    cpu_count: int | None = None  # the machine's cores (os.cpu_count()), what the load average is shared by
    fingerprint: dict[str, str] | None = None  # `fingerprint()` then


def _shape(config: Any, dtype: torch.dtype) -> str:
    return (f"{getattr(config, 'model_type', '?')}-L{config.num_hidden_layers}-H{config.hidden_size}"
            f"-V{config.vocab_size}-{str(dtype).removeprefix('torch.')}")


def _dtype(module: Any) -> torch.dtype:
    # The input embedding, not `PreTrainedModel.dtype`: a shared-base pair's reasoner holds its weights as plain
    # tensors aliasing the generator's (flythinker.shared_base), so it has no registered parameters.
    return module.get_input_embeddings().weight.dtype


def decision_key(model: Any) -> str:
    """The cache key of `model` on this machine: cores, torch threads, CPU, both models' shapes and dtypes."""
    g = _shape(model.config.generator, _dtype(model.generator))
    r = _shape(model.config.reasoner, _dtype(model.reasoner))
    return f"{platform.machine()}-c{available_cores()}-t{torch.get_num_threads()}|gen {g}|rsn {r}"


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "none"


def fingerprint() -> dict[str, str]:
    """What a measured step time depends on beyond the cache key (which holds the cores and torch threads): the
    torch, transformers, flythinker and Python versions and the CPU model. An entry measured under another
    fingerprint is measured again."""
    from flythinker import __version__

    return {"torch": torch.__version__, "transformers": _version("transformers"), "flythinker": __version__,
            "python": platform.python_version(), "cpu": _cpu_model()}


def load_average() -> list[float] | None:
    """`os.getloadavg()` (1, 5, 15 min) rounded, or None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def max_age_days() -> float:
    """How old (days) an entry may be before it is measured again: `$FLYTHINKER_PARALLEL_AUTO_MAX_AGE_DAYS`, else
    `MAX_AGE_DAYS`. A value that is not a number is ignored with a warning."""
    raw = os.environ.get(MAX_AGE_ENV)
    if raw is None or not raw.strip():
        return MAX_AGE_DAYS
    try:
        return float(raw)
    except ValueError:
        warnings.warn(f"{MAX_AGE_ENV}={raw!r} is not a number of days: using {MAX_AGE_DAYS:g}", stacklevel=2)
        return MAX_AGE_DAYS


def format_age(seconds: float) -> str:
    """`seconds` in the unit a person reads: s, min, h or days."""
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def load_limit(cpu_count: int) -> float:
    """The 1-minute load average above which a measurement on `cpu_count` cores counts as taken under load."""
    return OWN_LOAD + LOAD_FRACTION * cpu_count


def _fingerprint_change(saved: Any, now: dict[str, str]) -> str | None:
    if not isinstance(saved, dict):
        return "no fingerprint"
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v]
    return ", ".join(changed) or None


def _age_reason(age: float, limit: float) -> str | None:
    if age < -60.0:  # more than clock jitter
        return "measured in the future: the clock was changed"
    if age > limit:
        return f"measured {format_age(age)} ago, older than the {format_age(limit)} limit"
    return None


def _load_reason(entry: dict) -> str | None:
    load, cpus = entry.get("load_avg"), entry.get("cpu_count")
    if not load or not cpus:  # the platform had no load average: nothing to judge by
        return None
    if load[0] > load_limit(cpus):
        return (f"measured under load: 1-min load {load[0]:.2f} on {cpus} cores, above "
                f"{OWN_LOAD:g} + {LOAD_FRACTION:g} x {cpus} = {load_limit(cpus):g}")
    return None


def stale_reason(entry: Any, *, now: float | None = None, max_age_s: float | None = None,
                 current: dict[str, str] | None = None) -> str | None:
    """Why the saved `entry` (a dict of `Decision` fields) must be measured again, or None if it may be reused:
    no usable decision, the old format (no record of when and under what load it was measured), another
    `fingerprint()` than `current` (default: this process's), older than `max_age_s` (default: `max_age_days()`),
    or measured under load (`load_limit`)."""
    if not isinstance(entry, dict) or entry.get("mode") not in ("threads", "off"):
        return "no usable decision saved"
    if any(f not in entry for f in _RECORDS) or not isinstance(entry.get("measured_at"), (int, float)):
        return "old-format entry: no record of when and under what load it was measured"
    change = _fingerprint_change(entry.get("fingerprint"), fingerprint() if current is None else current)
    if change:
        return f"measured under another set-up ({change})"
    age = (time.time() if now is None else now) - entry["measured_at"]
    return _age_reason(age, max_age_days() * 86400.0 if max_age_s is None else max_age_s) or _load_reason(entry)


def entry_status(entry: dict, *, now: float | None = None) -> dict[str, Any]:
    """What `parallel="auto"` would do with the saved `entry` in a new process with these settings: `would`
    ("threads" / "off", reusing it, or "re-measure"), `stale` (why it would measure again, or None), the saved
    `mode` and `reason`, and the measurement's `age_s`, `load_avg`, `cores` and `cpu_count` (None when unknown)."""
    now = time.time() if now is None else now
    stale = stale_reason(entry, now=now)
    at = entry.get("measured_at")
    status = {"would": "re-measure" if stale else entry["mode"], "stale": stale,
              "age_s": round(now - at, 1) if isinstance(at, (int, float)) else None}
    return status | {f: entry.get(f) for f in ("mode", "reason", "load_avg", "cores", "cpu_count")}


def _disk_path() -> Path:
    from flythinker.hub import cache_dir

    return cache_dir() / "parallel_auto.json"


def cached_decisions() -> dict[str, dict]:
    """Decisions measured on this machine so far (key -> Decision fields), from the disk cache; {} if none."""
    path = _disk_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(decision: Decision) -> None:
    from flythinker.hub import atomic_write_json, file_lock

    path = _disk_path()
    try:
        with file_lock(path.with_suffix(".lock")):
            data = cached_decisions()
            data[decision.key] = asdict(decision)
            atomic_write_json(path, dict(sorted(data.items())))
    except OSError:  # a read-only cache folder: the in-process memo still holds it
        pass


@torch.inference_mode()
def measure(model: Any, rounds: int = ROUNDS) -> tuple[float, float]:
    """Median one-token step time (ms) of `model`'s two halves run with threads and sequentially, batch 1, over
    a `CONTEXT`-token cache: `(threads_ms, sequential_ms)`."""
    from flythinker.cache import FlyThinkerCache

    dev = model.generator_device
    ids = torch.full((1, CONTEXT), 1, dtype=torch.long, device=dev)
    cache = FlyThinkerCache(generator_config=model.config.generator, reasoner_config=model.config.reasoner)
    model.reasoner_forward(ids, None, None, cache, True)
    model.generator_forward(model.embed(ids), None, None, cache, True)
    tok = ids[:, :1]
    state = {"pos": CONTEXT}

    head = model.generator.get_output_embeddings()  # the generator's LM head runs in every decode step

    def gen() -> torch.Tensor:
        pos = torch.tensor([[state["pos"]]], device=dev)
        hidden = model.generator_forward(model.embed(tok), None, pos, cache, True).last_hidden_state
        return head(hidden[:, -1:])

    def rsn() -> torch.Tensor:
        return model.reasoner_forward(tok, None, torch.tensor([[state["pos"]]], device=dev), cache, True)

    workers = {"threads": ThreadWorker(), "off": InlineWorker()}
    times: dict[str, list[float]] = {"threads": [], "off": []}
    try:
        for r in range(rounds + 1):
            for name in (("threads", "off") if r % 2 else ("off", "threads")):
                t0 = time.perf_counter()
                workers[name].run_pair(gen, rsn)
                state["pos"] += 1
                if r:  # round 0 warms up (the worker thread starts)
                    times[name].append(time.perf_counter() - t0)
    finally:
        workers["threads"].close()
    return statistics.median(times["threads"]) * 1e3, statistics.median(times["off"]) * 1e3


def _measured(model: Any, key: str, cores: int, nt: int) -> Decision:
    """Measure `model` now (`measure`) and decide, recording the conditions of the measurement."""
    load, at = load_average(), time.time()
    t_thr, t_seq = measure(model)
    main, work = split_cores(cores)
    mode = "threads" if t_thr < MARGIN * t_seq else "off"
    verdict = "below" if mode == "threads" else "not below"
    reason = (f"measured one-token step: threads ({main}+{work} cores) {t_thr:.1f} ms, sequential ({nt} "
              f"threads) {t_seq:.1f} ms; threads is {verdict} {MARGIN:g}x sequential")
    return Decision(mode, reason, round(t_thr, 3), round(t_seq, 3), cores, nt, key, measured_at=at,
                    load_avg=load, cpu_count=os.cpu_count(), fingerprint=fingerprint())


def _reusable(key: str) -> Decision | None:
    """The saved decision of `key` if it is fresh (`stale_reason`), else None."""
    saved = cached_decisions().get(key)
    if stale_reason(saved) is not None:
        return None
    return Decision(**{k: saved.get(k) for k in Decision.__dataclass_fields__})


def decide(model: Any, remeasure: bool = False) -> Decision:
    """`parallel="auto"` for `model` on this CPU: this process's decision, else the saved one while it is fresh
    (`stale_reason`), else measured (`measure`) and saved."""
    key = decision_key(model)
    cores, nt = available_cores(), torch.get_num_threads()
    if cores < 2:
        return Decision("off", f"{cores} core: nothing to run beside", cores=cores, torch_threads=nt, key=key)
    with _MEMO_LOCK:
        if not remeasure:
            if key in _MEMO:
                return _MEMO[key]
            saved = _reusable(key)
            if saved is not None:
                _MEMO[key] = saved
                return saved
        decision = _measured(model, key, cores, nt)
        _MEMO[key] = decision
    _save(decision)
    return decision


__all__ = ["CONTEXT", "LOAD_FRACTION", "MARGIN", "MAX_AGE_DAYS", "MAX_AGE_ENV", "OWN_LOAD", "ROUNDS", "Decision",
           "cached_decisions", "decide", "decision_key", "entry_status", "fingerprint", "format_age", "load_average",
           "load_limit", "max_age_days", "measure", "stale_reason"]
