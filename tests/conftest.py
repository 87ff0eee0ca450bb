# TRITON_INTERPRET must be set before anything imports triton: kernels are decorated at import time.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Unit tests use tiny models: one intra-op thread avoids thread-pool overhead that dominates tiny matmuls
# (measured here on loaded cores: a tiny matmul took 1.25 ms with 2 threads, 34 us with 1). Tests that need more
# set it themselves and restore it.
torch.set_num_threads(int(os.environ.get("FLYTHINKER_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
