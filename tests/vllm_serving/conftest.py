"""Tests of the vLLM plugin. They run in the vLLM virtualenv (`make test` builds .venv-vllm and runs them there);
in an environment without vLLM this folder is not collected (the header of the pytest run says so).

The Hugging Face references come from the main virtualenv (hf_side.py, transformers >= 5.24) in one subprocess
per session; engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: no engine-core process to spawn).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores with the rest of the machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HF_PYTHON = os.environ.get("FLYTHINKER_HF_PYTHON", str(ROOT / ".venv" / "bin" / "python"))

try:
    from vllm import SamplingParams  # noqa: F401  (a name only the real package has)

    HAS_VLLM = True
except ImportError:
    HAS_VLLM = False
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if not HAS_VLLM:
        return "tests/vllm_serving: vLLM is not installed here, not collected (they run in .venv-vllm: make test-vllm)"
    return None


def hf_side(*args: str) -> None:
    """Run tests/vllm_serving/hf_side.py with the main virtualenv's python."""
    if not Path(HF_PYTHON).exists():
        raise RuntimeError(f"the HF reference side needs the main virtualenv ({HF_PYTHON}): run `make install`")
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    subprocess.run([HF_PYTHON, str(HERE / "hf_side.py"), *args], check=True, env=env, cwd=ROOT)


@pytest.fixture(scope="session")
def suite(tmp_path_factory) -> tuple[Path, dict]:
    """(folder, refs): the tiny checkpoints of hf_side.SUITE and their HF greedy references."""
    out = tmp_path_factory.mktemp("flythinker_vllm")
    hf_side("suite", str(out))
    return out, json.loads((out / "refs.json").read_text())


ENGINE_DEFAULTS = dict(dtype="float32", enforce_eager=True, max_model_len=128, block_size=32, seed=0,
                       kv_cache_memory_bytes=16 << 20, max_num_seqs=8, max_num_batched_tokens=64,
                       enable_prefix_caching=False)


@contextmanager
def engine(model: Path, **overrides):
    """A vLLM `LLM` on `model` (fp32, eager, small KV cache); torn down on exit so the next one can start."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = LLM(model=str(model), **{**ENGINE_DEFAULTS, **overrides})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        cleanup_dist_env_and_memory()


def greedy(max_new_tokens: int):
    """Greedy sampling params matching hf_side.generate (EOS masked until max_new_tokens, like min_new_tokens)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_new_tokens, min_tokens=max_new_tokens, temperature=0.0)


def run_all(llm, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Submit all prompts at once; new token ids per prompt."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_new_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


sys.path.insert(0, str(HERE))
