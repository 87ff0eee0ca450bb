"""Checkpoints without pickle: FlyThinkerTrainer writes optimizer / scheduler / RNG state as safetensors + JSON
(no optimizer.pt, scheduler.pt, rng_state*.pth, training_args.bin), resumes from them without torch.load, and
refuses a checkpoint that holds only the pickled files; `flythinker train` refuses an --output-dir that already
holds checkpoints unless --resume or --overwrite."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from flythinker.checkpoint import CheckpointError, check_resumable
from flythinker.training.toy import save_tiny_model, secret_task
from tests.test_resume import _tiny_trainer

PICKLE_GLOBS = ("*.pt", "*.pth", "*.bin")


def _pickled(folder):
    return sorted(str(p.relative_to(folder)) for g in PICKLE_GLOBS for p in folder.rglob(g))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step reference run and one stopped after checkpoint-2 (same schedule)."""
    root = tmp_path_factory.mktemp("nopickle")
    save_tiny_model(root / "gen", seed=0, hidden_size=64)
    save_tiny_model(root / "rsn", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    ref = _tiny_trainer(root, root / "ref", 4, lora=False)
    ref.train()
    _tiny_trainer(root, root / "run", 4, lora=False, stop_at=2).train()
    return root, {e["step"]: e["loss"] for e in ref.state.log_history if "loss" in e}


def test_checkpoint_is_pickle_free_and_resume_matches_without_torch_load(run, monkeypatch):
    root, want = run
    ckpt = root / "run" / "checkpoint-2"
    assert _pickled(ckpt) == [] and _pickled(root / "ref") == []
    names = {p.name for p in ckpt.iterdir()}
    assert {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state.safetensors",
            "rng_state.json", "training_args.json"} <= names, sorted(names)
    meta = json.loads((ckpt / "optimizer.json").read_text())
    assert meta["param_groups"][0]["lr"] > 0 and meta["order"]  # AdamW's step/exp_avg/exp_avg_sq are tensors

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called while resuming")

    monkeypatch.setattr(torch, "load", no_unpickling)
    resumed = _tiny_trainer(root, root / "run", 4, lora=False)
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert got[3] == pytest.approx(want[3], rel=1e-4) and got[4] == pytest.approx(want[4], rel=1e-4)
    assert _pickled(root / "run") == []


def test_pickled_optimizer_only_is_refused(run):
    root, _ = run
    bad = root / "pickled" / "checkpoint-2"
    shutil.copytree(root / "run" / "checkpoint-2", bad)
    for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json"):
        (bad / name).unlink()
    torch.save({"state": {}, "param_groups": []}, bad / "optimizer.pt")  # what plain HF Trainer writes
    torch.save({}, bad / "scheduler.pt")
    with pytest.raises(CheckpointError, match=r"state only \(optimizer.pt, scheduler.pt\).*never unpickles"):
        check_resumable(bad)
    trainer = _tiny_trainer(root, root / "pickled", 4, lora=False)
    with pytest.raises(CheckpointError, match="pickled optimizer.pt"):
        trainer._load_optimizer_and_scheduler(str(bad))  # the hook itself refuses too (no torch.load)
    (bad / "rng_state.safetensors").unlink()
    torch.save({}, bad / "rng_state.pth")
    with pytest.raises(CheckpointError, match="pickled rng_state.pth"):
        trainer._load_rng_state(str(bad))


def test_rng_states_round_trip():
    from flythinker.training.trainer import rng_states, set_rng_states

    tensors, meta = rng_states()
    meta = json.loads(json.dumps(meta))  # as saved
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_states(tensors, meta)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_cli_refuses_output_dir_with_checkpoints(tmp_path, capsys):
    from flythinker.cli import main

    save_tiny_model(tmp_path / "gen", seed=0, hidden_size=64)
    save_tiny_model(tmp_path / "rsn", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    (tmp_path / "split.jsonl").write_text("".join(json.dumps(e) + "\n" for e in secret_task(16)))
    out = tmp_path / "out"
    (out / "checkpoint-8").mkdir(parents=True)  # an earlier run's
    argv = ["train", "--generator", str(tmp_path / "gen"), "--reasoner", str(tmp_path / "rsn"), "--data",
            str(tmp_path / "split.jsonl"), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4",
            "--save-steps", "2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flythinker: error: --output-dir") and "--resume" in err[-1], err
    assert main([*argv, "--overwrite", "--resume"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the stale one is gone
    assert _pickled(out) == []
