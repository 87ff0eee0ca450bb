"""Workers that run the reasoner's half of a step beside the generator's (docs/design.md, "The two models").

At decode step t the reasoner consumes x_t (-> h_t) while the generator consumes x_t fused with h_{t-1}: the two
halves are independent. A `ReasonerWorker` runs the reasoner's half while the caller runs the generator's:

- `InlineWorker`: runs the job at `submit` (sequential; `parallel="off"`, the oracle).
- `ThreadWorker` (CPU, `"threads"`, and `"auto"` where `flythinker.parallel_auto` measured it faster): one
  persistent thread; each side gets its own intra-op thread count
  (`torch.set_num_threads` is per thread under ATen's OpenMP backend: verified, worker 1 / caller 1).
- `StreamWorker` (CUDA, `"streams"`/`"auto"`): the same thread, launching on side streams of every involved device,
  ordered against the caller's streams by events (no host sync). Also covers a reasoner on a second device.

Why threads and not a worker process on CPU: a process holding the reasoner (token and latent in shared memory)
was no faster than a persistent thread, and it would have to own the reasoner's KV cache (beam reorder, crop, weight
updates). Two OpenMP threads per model under oversubscription were far slower than one, so each model gets exactly
its own cores. The measurements: docs/results.md, "Measurements behind design choices".

The prefill schedules that use a worker live beside the model, in `flythinker.prefill`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from flythinker.configuration import PARALLEL_MODES


def available_cores() -> int:
    """CPU cores this process may run on (affinity mask, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def split_cores(n: int | None = None) -> tuple[int, int]:
    """Intra-op threads (caller/generator, worker/reasoner) for `n` cores: the generator gets the larger half."""
    n = available_cores() if n is None else n
    if n < 2:
        return 1, 1
    return n - n // 2, n // 2


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Set this thread's intra-op thread count for the block (None: leave it)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _ThreadState:
    """Grad / inference / autocast modes are thread-local: capture the caller's and replay them in the worker, so a
    reasoner step submitted under `torch.inference_mode()` builds inference tensors like the sequential path."""

    def __init__(self) -> None:
        self.inference = torch.is_inference_mode_enabled()
        self.grad = torch.is_grad_enabled()
        self.autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
                         if torch.is_autocast_enabled(d)]

    @contextlib.contextmanager
    def apply(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.inference:
                stack.enter_context(torch.inference_mode())
            else:
                stack.enter_context(torch.set_grad_enabled(self.grad))
            for dev, dtype in self.autocast:
                stack.enter_context(torch.autocast(dev, dtype=dtype))
            yield


class ReasonerWorker:
    """Runs one job at a time beside the caller: `submit(fn)`, do other work, `result()` (re-raises fn's error).

    `run_pair(gen_fn, rsn_fn)` is the decode-step pattern: the job always completes before run_pair returns or
    raises, so a failing generator half never leaves the reasoner mid-way through its cache update.
    """

    main_threads: int | None = None  # caller's intra-op threads while a job runs (None: unchanged)

    def start(self) -> ReasonerWorker:
        return self

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def alive(self) -> bool:
        return True

    def run_pair(self, gen_fn: Callable[[], Any], rsn_fn: Callable[[], Any]) -> tuple[Any, Any]:
        """(gen_fn(), rsn_fn()) with rsn_fn on the worker."""
        self.submit(rsn_fn)
        try:
            with intra_op_threads(self.main_threads):
                g = gen_fn()
        except BaseException:
            with contextlib.suppress(BaseException):
                self.result()
            raise
        return g, self.result()

    def __enter__(self) -> ReasonerWorker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class InlineWorker(ReasonerWorker):
    """Sequential: the job runs inside `submit` (the `parallel="off"` oracle)."""

    def __init__(self) -> None:
        self._out: tuple[bool, Any] | None = None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._out is not None:
            raise RuntimeError("InlineWorker: result() of the previous job was not collected")
        try:
            self._out = (True, fn(*args, **kwargs))
        except BaseException as e:  # re-raised by result(), like the threaded workers
            self._out = (False, e)

    def result(self) -> Any:
        if self._out is None:
            raise RuntimeError("InlineWorker.result() without a submitted job")
        ok, val = self._out
        self._out = None
        if not ok:
            raise val
        return val

    def run_pair(self, gen_fn: Callable[[], Any], rsn_fn: Callable[[], Any]) -> tuple[Any, Any]:
        return gen_fn(), rsn_fn()  # exactly the sequential order of the model's own code


_STOP = object()


def _worker_loop(jobs: queue.SimpleQueue, results: queue.SimpleQueue, num_threads: int | None) -> None:
    # No reference to the worker object here: a dropped worker gets garbage-collected and its finalizer stops us.
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    while True:
        job = jobs.get()
        if job is _STOP:
            return
        fn, args, kwargs, state = job
        try:
            with state.apply():
                out = (True, fn(*args, **kwargs))
        except BaseException as e:
            out = (False, e)
        # Drop the job before waiting for the next one: its closure references the model, which would otherwise
        # stay alive (and keep this thread alive) until another job arrived.
        del job, fn, args, kwargs, state
        results.put(out)
        del out


def _stop_thread(jobs: queue.SimpleQueue, thread: threading.Thread) -> None:
    jobs.put(_STOP)
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=30)


class ThreadWorker(ReasonerWorker):
    """A persistent worker thread (started lazily).

    Args:
        num_threads: the worker's intra-op threads (None: `split_cores()[1]`).
        main_threads: the caller's intra-op threads during `run_pair` (None: `split_cores()[0]`; on 2 cores 1 + 1:
            the models then stream their weights from their own core instead of both fighting for both).
    """

    def __init__(self, num_threads: int | None = None, main_threads: int | None = None, name: str = "reasoner"):
        main, work = split_cores()
        self.num_threads = work if num_threads is None else num_threads
        self.main_threads = main if main_threads is None else main_threads
        self.name = name
        self._jobs: queue.SimpleQueue | None = None
        self._results: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._pending = False
        self._finalizer: weakref.finalize | None = None

    def start(self) -> ThreadWorker:
        if self._thread is None or not self._thread.is_alive():
            self._jobs, self._results = queue.SimpleQueue(), queue.SimpleQueue()
            self._thread = threading.Thread(target=_worker_loop, name=f"flythinker-{self.name}", daemon=True,
                                            args=(self._jobs, self._results, self.num_threads))
            self._thread.start()
            self._finalizer = weakref.finalize(self, _stop_thread, self._jobs, self._thread)
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _prepare(self) -> Any:
        return None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._pending:
            raise RuntimeError(f"{type(self).__name__}: result() of the previous job was not collected")
        self.start()
        self._pending = True
        self._jobs.put((self._wrap(fn, self._prepare()), args, kwargs, _ThreadState()))

    def _wrap(self, fn: Callable[..., Any], token: Any) -> Callable[..., Any]:
        return fn

    def _finish(self, out: Any) -> Any:
        return out

    def result(self) -> Any:
        if not self._pending:
            raise RuntimeError(f"{type(self).__name__}.result() without a submitted job")
        ok, val = self._results.get()
        self._pending = False
        if not ok:
            raise val
        return self._finish(val)

    def close(self) -> None:
        """Stop and join the thread (idempotent; a later submit starts a new one)."""
        if self._pending:
            with contextlib.suppress(BaseException):
                self.result()
        if self._finalizer is not None:
            self._finalizer()  # stops + joins once
        self._thread = None


class StreamWorker(ThreadWorker):
    """CUDA: the worker thread launches the reasoner on its own stream of each device in `devices`.

    `submit` records an event on the caller's current stream of every device and the side streams wait on it (the
    job sees everything the caller queued before, e.g. the sampled token); `result` makes the caller's streams wait on
    the job's completion events and marks returned tensors as used by the caller's stream (caching-allocator safety).
    The host never blocks on the GPU. Works for a reasoner on the generator's device (two streams of one GPU) and on
    another device (its side stream there plus one on the generator's device for the latent copy).
    """

    def __init__(self, devices: list[torch.device | str], name: str = "reasoner"):
        super().__init__(num_threads=None, main_threads=None, name=name)
        self.main_threads = None  # the host threads only launch kernels: leave intra-op threads alone
        self.num_threads = None
        self.devices = [torch.device(d) for d in dict.fromkeys(str(torch.device(d)) for d in devices)]
        if not self.devices or any(d.type != "cuda" for d in self.devices):
            raise ValueError(f"StreamWorker needs CUDA devices, got {devices}")
        self.streams = {d: torch.cuda.Stream(device=d) for d in self.devices}

    def _prepare(self) -> list[torch.cuda.Event]:
        evs = []
        for d in self.devices:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(d))
            evs.append(ev)
        return evs

    def _wrap(self, fn: Callable[..., Any], ready: list[torch.cuda.Event]) -> Callable[..., Any]:
        def job(*args: Any, **kwargs: Any) -> Any:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.cuda.device(self.devices[0]))
                for d, ev in zip(self.devices, ready, strict=True):
                    s = self.streams[d]
                    s.wait_event(ev)
                    stack.enter_context(torch.cuda.stream(s))  # current stream of device d in this thread
                out = fn(*args, **kwargs)
            done = []
            for d in self.devices:
                ev = torch.cuda.Event()
                ev.record(self.streams[d])
                done.append(ev)
            return out, done

        return job

    def _finish(self, val: Any) -> Any:
        out, done = val
        for d, ev in zip(self.devices, done, strict=True):
            torch.cuda.current_stream(d).wait_event(ev)
        for t in _tensors(out):
            if t.is_cuda:
                t.record_stream(torch.cuda.current_stream(t.device))
        return out


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)
    elif hasattr(x, "to_tuple"):  # HF ModelOutput
        yield from _tensors(x.to_tuple())


def resolve_mode(mode: str, generator_device: torch.device, reasoner_device: torch.device) -> str:
    """The mechanism a `parallel` setting means for these devices: "off", "threads" or "streams"."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    cuda = generator_device.type == "cuda" or reasoner_device.type == "cuda"
    if mode == "streams":
        if not cuda:
            raise ValueError("parallel='streams' needs the generator or the reasoner on a CUDA device; the pair is "
                             f"on {generator_device}/{reasoner_device} (use 'threads' or 'auto')")
        return "streams"
    if mode == "auto":
        if cuda:
            return "streams"
        return "threads" if available_cores() >= 2 else "off"
    return mode


def make_worker(mode: str, generator_device: torch.device, reasoner_device: torch.device) -> ReasonerWorker:
    """A worker for `parallel=mode` (see `resolve_mode`)."""
    kind = resolve_mode(mode, generator_device, reasoner_device)
    if kind == "off":
        return InlineWorker()
    if kind == "streams":
        return StreamWorker([d for d in (reasoner_device, generator_device) if d.type == "cuda"])
    return ThreadWorker()


# One worker per (model, calling thread), kept outside the module (a thread must not be deep-copied or pickled with
# the model). Per calling thread because a worker's job/result queues serve one caller at a time: two threads
# generating with one model (a server) must not collect each other's latents. Thread-local storage drops a caller's
# workers when that thread ends, and a WeakKeyDictionary drops them with the model; their finalizers stop the threads.
_LOCAL = threading.local()


def _workers() -> weakref.WeakKeyDictionary:
    if not hasattr(_LOCAL, "workers"):
        _LOCAL.workers = weakref.WeakKeyDictionary()
    return _LOCAL.workers


def worker_for(owner: object, mode: str, generator_device: torch.device, reasoner_device: torch.device,
               decide_auto: Callable[[object], str] | None = None) -> ReasonerWorker:
    """This thread's worker of `owner` (a model; weakly referenced) for `parallel=mode`, created on first use and
    re-created when the mode or the devices change. "auto" on a CPU pair asks `decide_auto(owner)` ("threads" or
    "off"; the model passes `flythinker.parallel_auto`'s measured decision) and takes threads without one."""
    key = (mode, resolve_mode(mode, generator_device, reasoner_device), str(generator_device), str(reasoner_device))
    workers = _workers()
    entry = workers.get(owner)
    if entry is not None and entry[0] == key and entry[1].alive:
        return entry[1]
    if entry is not None:
        entry[1].close()
    if key[1] == "threads" and mode == "auto" and decide_auto is not None:
        mode = decide_auto(owner)
    worker = make_worker(mode, generator_device, reasoner_device)
    workers[owner] = (key, worker)
    return worker


def shutdown(owner: object) -> None:
    """Stop this thread's worker of `owner` now, and for a module those of its submodules (a FlyThinker pair's
    worker belongs to its fused `.model`); a worker also stops when its owner is garbage-collected or the calling
    thread ends."""
    owners = list(owner.modules()) if isinstance(owner, torch.nn.Module) else [owner]
    for o in owners:
        entry = _workers().pop(o, None)
        if entry is not None:
            entry[1].close()


__all__ = [
    "InlineWorker", "ReasonerWorker", "StreamWorker", "ThreadWorker", "available_cores", "intra_op_threads",
    "make_worker", "resolve_mode", "shutdown", "split_cores", "worker_for",
]
