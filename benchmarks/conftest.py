"""pytest options of the kernel microbenchmark suites in benchmarks/suites/ (pytest-benchmark).

    pytest benchmarks/ --benchmark-only                         # every suite, full shapes
    pytest benchmarks/ --benchmark-only --bench-quick           # quick shapes (what `flythinker bench --quick` runs)
    pytest benchmarks/ --benchmark-only --benchmark-autosave    # save the run under .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:25%   # regression gate

`pytest tests` (the project's testpaths) never collects these: they live outside tests/.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flythinker benchmarks")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="quick mode of the kernel suites: the small shapes only, fewer rounds, no torch.compile")
    group.addoption("--bench-device", default=None,
                    help="device of the kernel suites: cpu or cuda (default: cuda when available, else cpu)")
    group.addoption("--bench-threads", type=int, default=1,
                    help="torch intra-op threads on CPU (default: 1, as the scripts: on a shared machine a 2-thread "
                         "pool stalls behind other jobs; 0 = torch's default)")


@pytest.fixture(scope="session")
def bench_quick(request: pytest.FixtureRequest) -> bool:
    """Whether the suites run in quick mode (`--bench-quick`)."""
    return bool(request.config.getoption("--bench-quick"))


@pytest.fixture(scope="session")
def bench_device(request: pytest.FixtureRequest):
    """The torch.device the suites run on (`--bench-device`, else cuda when available, else cpu)."""
    import torch

    name = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--bench-device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA device here")
    threads = request.config.getoption("--bench-threads")
    if threads < 0:
        raise pytest.UsageError(f"--bench-threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return torch.device(name)
