"""Resuming an interrupted run: `flythinker train --resume` after a real SIGKILL, and
`FlyThinkerTrainer.train(resume_from_checkpoint=True)`, for full and LoRA runs.

The defect this guards: a LoRA run resumed from its checkpoint lost its adapters silently (the checkpoint holds
merged weights + lora/<part> and nothing loaded them back: loss at the step after the checkpoint 5.43 against
3.11 uninterrupted), and train_log.jsonl was emptied on every start.
"""

import json

import pytest
import torch

from flythinker.training.toy import save_tiny_model, secret_task
from tests.faults import leftover_temps, run_child, run_killed


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_tiny_model(root / "gen", seed=0, hidden_size=64)
    save_tiny_model(root / "rsn", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    (root / "split.jsonl").write_text("".join(json.dumps(e) + "\n" for e in secret_task(48)))
    return root


def _argv(root, out, *extra):
    return ["train", "--generator", str(root / "gen"), "--reasoner", str(root / "rsn"), "--data",
            str(root / "split.jsonl"), "--output-dir", str(root / out), "--max-steps", "6", "--batch-size", "4",
            "--lr", "3e-3", "--logging-steps", "1", "--save-steps", "2", "--no-progress", *extra]


def _losses(folder) -> dict[int, float]:
    entries = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in entries if "loss" in e]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_cli_resume_after_sigkill_matches_uninterrupted(root, mode):
    extra = ["--lora", "--lora-r", "4"] if mode == "lora" else ["--train", "generator,projection",
                                                                "--projection", "linear"]
    run_child(_argv(root, f"ref_{mode}", *extra))
    want = _losses(root / f"ref_{mode}")
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    out = root / f"killed_{mode}"
    run_killed(_argv(root, f"killed_{mode}", *extra), "atomic_directory.written", where="checkpoint-4")
    # the kill came while checkpoint-4 was being moved into place: only checkpoint-2 looks like a checkpoint
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert sorted(_losses(out)) == [1, 2, 3, 4]

    proc = run_child(_argv(root, f"killed_{mode}", *extra, "--resume"))
    assert "resuming from" in proc.stderr and "checkpoint-2" in proc.stderr
    got = _losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # the log was continued, not emptied, and not doubled
    # step 3 is the first step after the checkpoint: it must see the trained adapters/weights and the optimizer
    torch.testing.assert_close(torch.tensor([got[s] for s in range(1, 7)]),
                               torch.tensor([want[s] for s in range(1, 7)]), rtol=1e-4, atol=1e-5)
    assert (out / "config.json").is_file() and (out / "checkpoint-6").is_dir()
    assert not [p for p in leftover_temps(out) if p.name.startswith(".checkpoint-6")]


def test_cli_resume_without_checkpoint_is_one_line(root, capsys):
    from flythinker.cli import main

    (root / "empty_run").mkdir(exist_ok=True)
    assert main(_argv(root, "empty_run", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flythinker: error: no complete checkpoint-<step> folder"), err


def _tiny_trainer(tmp_path, out, steps, *, lora: bool, stop_at: int | None = None):
    from transformers import TrainingArguments

    from flythinker.modeling import FlyThinkerForCausalLM
    from flythinker.training import FlyThinkerCollator, apply_lora, set_trainable
    from flythinker.training.toy import char_tokenizer, reverse_task
    from flythinker.training.trainer import FlyThinkerTrainer, JsonlLogCallback

    torch.manual_seed(0)
    model = FlyThinkerForCausalLM.from_pair(str(tmp_path / "gen"), str(tmp_path / "rsn"), fusion_lambda=0.5,
                                            projection="pad")
    if lora:
        apply_lora(model, "both", r=4, alpha=8)
    set_trainable(model, "both")
    tok = char_tokenizer()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=3e-3, logging_steps=1, save_strategy="steps", save_steps=2,
                             report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
                             seed=0, data_seed=0)
    callbacks = [JsonlLogCallback(out / "train_log.jsonl")] + ([_StopAt(stop_at)] if stop_at else [])
    return FlyThinkerTrainer(model=model, args=args, train_dataset=reverse_task(32),
                             data_collator=FlyThinkerCollator(tokenizer=tok), processing_class=tok,
                             callbacks=callbacks)


class _StopAt:
    """A run that stops (as if killed) right after the checkpoint of step `step`, same schedule as the full run."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class StopAt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True

        return StopAt()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_trainer_resume_from_checkpoint_true(tmp_path, lora):
    """API path: the newest complete checkpoint is chosen; a newer half-written one (0-byte optimizer.safetensors, as an
    old non-atomic save could leave) is skipped with a warning; the next step's loss equals the uninterrupted."""
    import shutil

    save_tiny_model(tmp_path / "gen", seed=0, hidden_size=64)
    save_tiny_model(tmp_path / "rsn", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    ref = _tiny_trainer(tmp_path, tmp_path / "ref", 4, lora=lora)
    ref.train()
    want = {e["step"]: e["loss"] for e in ref.state.log_history if "loss" in e}

    out = tmp_path / "run"
    _tiny_trainer(tmp_path, out, 4, lora=lora, stop_at=2).train()  # "interrupted" after checkpoint-2
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    (out / "checkpoint-3" / "optimizer.safetensors").write_bytes(b"")
    resumed = _tiny_trainer(tmp_path, out, 4, lora=lora)
    with pytest.warns(UserWarning, match="checkpoint-3.*optimizer.safetensors is empty"):
        resumed.train(resume_from_checkpoint=True)
    got = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert got[3] == pytest.approx(want[3], rel=1e-4) and got[4] == pytest.approx(want[4], rel=1e-4)
    assert sorted(_losses(out)) == [1, 2, 3, 4]


@pytest.mark.distributed
def test_torchrun_checkpoints_complete_and_resume(root):
    """Two DDP processes (gloo) write one checkpoint folder (each its own RNG state) staged under one name and
    moved into place once both are done; a resumed 2-process run continues it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def launch(*extra):
        argv = _argv(root, "ddp", "--batch-size", "2", *extra)[1:]
        proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "flythinker.cli",
                               "train", *argv], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc

    out = root / "ddp"
    launch("--max-steps", "4")
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        assert {"rng_state_0.safetensors", "rng_state_1.safetensors", "optimizer.safetensors", "model.safetensors"} <= {
            p.name for p in ckpt.iterdir()}, sorted(p.name for p in ckpt.iterdir())
    assert not list(out.glob(".checkpoint-*"))  # no staging folder left
    import shutil

    shutil.rmtree(out / "checkpoint-4")  # as if killed before it: resume from checkpoint-2
    proc = launch("--max-steps", "4", "--resume")
    assert "checkpoint-2" in proc.stderr
    assert sorted(_losses(out)) == [1, 2, 3, 4] and (out / "checkpoint-4").is_dir()
