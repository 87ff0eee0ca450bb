"""The training script runs unchanged under torchrun (2 processes, DDP over gloo) and accelerate launch, and gives
the same loss curve as one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flythinker.training.toy import reverse_task, save_tiny_model
from flythinker.training.train import main

pytestmark = pytest.mark.distributed

BIN = Path(sys.executable).parent
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the OMP_NUM_THREADS=1 of the launched processes: tiny matmuls, shared CPUs
    root = tmp_path_factory.mktemp("dist")
    save_tiny_model(root / "gen", seed=0, hidden_size=64)
    save_tiny_model(root / "rsn", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    with open(root / "train.jsonl", "w") as fh:
        for ex in reverse_task(32, seed=0):  # variable lengths: per-process token counts differ
            fh.write(json.dumps(ex) + "\n")
    common = ["--generator", str(root / "gen"), "--reasoner", str(root / "rsn"), "--data", str(root / "train.jsonl"),
              "--max-steps", str(STEPS), "--lr", "3e-3", "--logging-steps", "1", "--no-progress",
              "--chat-template", "off", "--seed", "7"]
    # reference: one process, global batch 4
    assert main([*common, "--output-dir", str(root / "single"), "--batch-size", "4"]) == 0
    yield root, common, _losses(root / "single")
    torch.set_num_threads(threads)


def _losses(out: Path) -> list[float]:
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in logs if "loss" in e]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run(cmd: list[str], out: Path) -> list[float]:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(out)


def _check_same_curve(ref: list[float], got: list[float]) -> None:
    assert len(ref) == len(got) == STEPS
    assert ref[-1] < ref[0]  # it trains
    for a, b in zip(ref, got, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (ref, got)


def test_torchrun_two_processes_matches_single_process(setup):
    root, common, ref = setup
    got = _run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
                "flythinker.training.train", *common, "--output-dir", str(root / "ddp"), "--batch-size", "2"],
               root / "ddp")
    _check_same_curve(ref, got)
    # one checkpoint, written by rank 0, that reloads
    from flythinker.modeling import FlyThinkerForCausalLM

    assert FlyThinkerForCausalLM.from_pretrained(root / "ddp").config.fusion_lambda == 0.5


def test_per_process_batch_is_really_sharded(setup):
    """Guard against a vacuous match: a 2-process run whose ranks both saw the *same* 2 examples would have the
    loss curve of one process with batch 2, which differs from the batch-4 curve."""
    root, common, ref = setup
    assert main([*common, "--output-dir", str(root / "single2"), "--batch-size", "2"]) == 0
    other = _losses(root / "single2")
    assert max(abs(a - b) for a, b in zip(ref, other, strict=True)) > 1e-3


def test_accelerate_launch_two_processes(setup):
    # On CPU, `accelerate launch --cpu` runs ONE process unless MPI is set up; `--multi_gpu` starts torch's
    # elastic launcher, and Trainer picks gloo since there is no CUDA device.
    root, common, ref = setup
    got = _run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m",
                "flythinker.training.train", *common, "--output-dir", str(root / "acc"), "--batch-size", "2"],
               root / "acc")
    _check_same_curve(ref, got)
