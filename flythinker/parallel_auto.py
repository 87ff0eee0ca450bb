"""What `parallel="auto"` means for a pair on a CPU: measured once per machine and pair shape, then cached.

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
cores, the torch thread count and both models' shapes and dtypes; written atomically under a file lock), so a
pair measures once per machine. `decide(model, remeasure=True)` measures again; `cached_decisions()` is what
`flythinker info` prints.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flythinker.workers import InlineWorker, ThreadWorker, available_cores, split_cores

ROUNDS = 7  # interleaved step pairs per mode (plus one warm-up each)
MARGIN = 0.95  # threads must beat sequential by 5%
CONTEXT = 32  # cached tokens the measured steps attend to
_MEMO: dict[str, Decision] = {}
_MEMO_LOCK = threading.Lock()


@dataclass
class Decision:
    """`mode` ("threads" | "off") and why: the measured median step times (ms) of both ways."""

    mode: str
    reason: str
    threads_ms: float | None = None
    sequential_ms: float | None = None
    cores: int = 1
    torch_threads: int = 1
    key: str = ""


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
    from flythinker.hub import file_lock

    path = _disk_path()
    try:
        with file_lock(path.with_suffix(".lock")):
            data = cached_decisions()
            data[decision.key] = asdict(decision)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".parallel_auto.")
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, path)
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


def decide(model: Any, remeasure: bool = False) -> Decision:
    """`parallel="auto"` for `model` on this CPU: the cached decision, else measured (`measure`) and cached."""
    key = decision_key(model)
    cores, nt = available_cores(), torch.get_num_threads()
    if cores < 2:
        return Decision("off", f"{cores} core: nothing to run beside", cores=cores, torch_threads=nt, key=key)
    with _MEMO_LOCK:
        if not remeasure:
            if key in _MEMO:
                return _MEMO[key]
            saved = cached_decisions().get(key)
            if isinstance(saved, dict) and saved.get("mode") in ("threads", "off"):
                _MEMO[key] = Decision(**{k: saved.get(k) for k in Decision.__dataclass_fields__})
                return _MEMO[key]
        t_thr, t_seq = measure(model)
        main, work = split_cores(cores)
        mode = "threads" if t_thr < MARGIN * t_seq else "off"
        verdict = "below" if mode == "threads" else "not below"
        reason = (f"measured one-token step: threads ({main}+{work} cores) {t_thr:.1f} ms, sequential ({nt} "
                  f"threads) {t_seq:.1f} ms; threads is {verdict} {MARGIN:g}x sequential")
        decision = Decision(mode, reason, round(t_thr, 3), round(t_seq, 3), cores, nt, key)
        _MEMO[key] = decision
    _save(decision)
    return decision


__all__ = ["CONTEXT", "MARGIN", "ROUNDS", "Decision", "cached_decisions", "decide", "decision_key", "measure"]
