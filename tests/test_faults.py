"""What must survive a SIGKILL at each write point: one row per (writer, point), run by one parametrised test.

Each row: a child process (a Python snippet or a `flythinker` command line) killed at a named write point
(tests/faults.py, tests/fault_inject/sitecustomize.py), what must hold right after the kill, then a rerun of the same
child without the fault and what must hold after it. Add a row to cover a new cache or checkpoint writer.
Training checkpoints killed mid-save and resumed: tests/test_resume.py (same helper, same point).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from flythinker.training.toy import save_tiny_model, secret_task
from tests.faults import leftover_temps, run_child, run_killed


@dataclass
class Survival:
    """One row of the table. `child(root)` is a snippet or a flythinker argv; `after_kill(root)` and
    `after_rerun(root, proc)` assert; `setup(root)` prepares the state the child starts from (optional)."""

    child: Callable[[Path], str | list[str]]
    point: str
    where: str
    after_kill: Callable[[Path], None]
    after_rerun: Callable[[Path, object], None]
    setup: Callable[[Path], None] | None = None


# ---- persona-empathy dataset cache -------------------------------------------------------------------------------
N_USERS = 30


def _persona_child(root: Path) -> str:
    return ("from flythinker.persona import load_dataset\n"
            f"recs = load_dataset('persona-empathy', 'train', cache_dir={str(root / 'data')!r}, n_users={N_USERS})\n"
            "print('records', len(recs))\n")


def _persona_folder(root: Path) -> Path:
    return root / "data" / f"persona-empathy-v1-n_users{N_USERS}"


def _persona_count() -> int:
    from flythinker.persona import make_persona_empathy

    return len(make_persona_empathy(n_users=N_USERS)["train"])


def _no_persona_cache(root: Path) -> None:
    assert not _persona_folder(root).exists()  # nothing that looks like a cache: only the killed writer's temp
    assert leftover_temps(root / "data")  # (the next writer removes it)


def _full_persona_cache(root: Path, proc) -> None:
    assert f"records {_persona_count()}" in proc.stdout, proc.stdout
    assert not leftover_temps(root / "data")
    manifest = json.loads((_persona_folder(root) / "manifest.json").read_text())
    assert manifest["splits"]["train"]["records"] == _persona_count()


def _stale_persona_cache(root: Path) -> None:
    """A complete cache, then a hand-edited split (manifest mismatch): the next run rebuilds it in place."""
    run_child(_persona_child(root))
    path = _persona_folder(root) / "train.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))


# ---- records file --------------------------------------------------------------------------------------------------
def _records_child(root: Path) -> str:
    return ("from flythinker.persona import make_persona_empathy, save_records\n"
            f"save_records(make_persona_empathy(n_users=6)['train'], {str(root / 'recs.jsonl')!r})\n")


def _old_records(root: Path) -> None:
    from flythinker.persona import make_persona_empathy, save_records

    save_records(make_persona_empathy(n_users=3)["train"], root / "recs.jsonl")
    (root / "recs.before").write_bytes((root / "recs.jsonl").read_bytes())


def _records_unchanged(root: Path) -> None:
    assert (root / "recs.jsonl").read_bytes() == (root / "recs.before").read_bytes()


def _records_new(root: Path, proc) -> None:
    from flythinker.persona import load_records, make_persona_empathy

    assert len(load_records(root / "recs.jsonl")) == len(make_persona_empathy(n_users=6)["train"])
    assert not leftover_temps(root)


# ---- flythinker train: checkpoints and the final model -----------------------------------------------------------
def _tiny_models(root: Path) -> None:
    save_tiny_model(root / "gen", seed=0, hidden_size=64)
    save_tiny_model(root / "rsn", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    (root / "split.jsonl").write_text("".join(json.dumps(e) + "\n" for e in secret_task(16)))


def _train_child(root: Path) -> list[str]:
    return ["train", "--generator", str(root / "gen"), "--reasoner", str(root / "rsn"), "--data",
            str(root / "split.jsonl"), "--output-dir", str(root / "out"), "--max-steps", "2", "--batch-size", "4",
            "--save-steps", "2", "--no-progress", "--overwrite"]


def _no_checkpoint(root: Path) -> None:
    assert not (root / "out" / "checkpoint-2").exists()
    from flythinker.checkpoint import CheckpointError, latest_checkpoint

    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        latest_checkpoint(root / "out")


def _final_not_loadable(root: Path) -> None:
    """The kill came after the weights were moved in but before config.json: the folder is not a model folder,
    and `generate --model` says so in one line."""
    out = root / "out"
    assert (out / "checkpoint-2").is_dir() and not (out / "config.json").exists()
    import contextlib
    import io

    from flythinker.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["generate", "--model", str(out), "--prompt", "hi"]) == 2
    assert err.getvalue().strip().splitlines()[-1].startswith("flythinker: error: --model"), err.getvalue()


def _trained(root: Path, proc) -> None:
    from flythinker.modeling import FlyThinkerForCausalLM

    FlyThinkerForCausalLM.from_pretrained(root / "out")  # strict: complete
    assert (root / "out" / "checkpoint-2" / "optimizer.safetensors").stat().st_size > 0
    assert not leftover_temps(root / "out")


# ---- flythinker demo: the fine-tuned LoRA cache -------------------------------------------------------------------
def _demo_child(root: Path) -> list[str]:
    return ["demo", "--model", str(root / "tiny"), "--data-users", "40", "--max-reasoner-tokens", "400", "--steps",
            "2", "--users", "1", "--max-new-tokens", "3"]


def _demo_model(root: Path) -> None:
    save_tiny_model(root / "tiny", vocab_size=128, num_hidden_layers=2)


def _no_demo_entry(root: Path) -> None:
    demo = root / "cache" / "demo"
    entries = [p for p in demo.iterdir() if not p.name.startswith(".")] if demo.exists() else []
    assert not entries, entries  # no cache entry (a later run would reuse it by recipe key)


def _demo_retrained(root: Path, proc) -> None:
    assert "Trained in" in proc.stdout, proc.stdout[-2000:]
    entries = [p for p in (root / "cache" / "demo").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert not leftover_temps(root / "cache" / "demo")


SURVIVALS = {
    "persona_cache_written": Survival(_persona_child, "atomic_directory.written", "persona-empathy",
                                      _no_persona_cache, _full_persona_cache),
    "persona_cache_rebuild_replacing": Survival(_persona_child, "atomic_directory.replacing", "persona-empathy",
                                                _no_persona_cache, _full_persona_cache, setup=_stale_persona_cache),
    "save_records_written": Survival(_records_child, "atomic_write.written", "recs.jsonl", _records_unchanged,
                                     _records_new, setup=_old_records),
    "train_checkpoint_written": Survival(_train_child, "atomic_directory.written", "checkpoint-2", _no_checkpoint,
                                         _trained, setup=_tiny_models),
    "train_final_model_partial": Survival(_train_child, "publish.partial", "out", _final_not_loadable, _trained,
                                          setup=_tiny_models),
    "demo_lora_cache_written": Survival(_demo_child, "atomic_directory.written", "cache/demo/", _no_demo_entry,
                                        _demo_retrained, setup=_demo_model),
}


@pytest.mark.parametrize("name", sorted(SURVIVALS))
def test_survives_sigkill(tmp_path, name):
    row = SURVIVALS[name]
    env = {"FLYTHINKER_CACHE": str(tmp_path / "cache")}
    if row.setup is not None:
        row.setup(tmp_path)
    run_killed(row.child(tmp_path), row.point, where=row.where, env=env)
    row.after_kill(tmp_path)
    proc = run_child(row.child(tmp_path), env=env)
    row.after_rerun(tmp_path, proc)


def test_demo_damaged_cache_entry_is_trained_again(tmp_path, monkeypatch, capsys):
    """A damaged demo cache entry (a hand edit, a disk error; no kill needed, so in-process) used to fail every
    later run with a JSONDecodeError traceback and no hint of --retrain; now it is reported and trained again.
    A truncated adapter file is caught the same way (checkpoint.tensor_names)."""
    from flythinker.cli import main

    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path / "cache"))
    _demo_model(tmp_path)
    assert main(_demo_child(tmp_path)) == 0
    (entry,) = [p for p in (tmp_path / "cache" / "demo").iterdir() if not p.name.startswith(".")]
    (entry / "meta.json").write_text('{"steps": 2,')
    capsys.readouterr()
    assert main(_demo_child(tmp_path)) == 0
    out, err = capsys.readouterr()
    assert "is incomplete or damaged" in err and "training again" in err, err[-2000:]
    _demo_retrained(tmp_path, type("Proc", (), {"stdout": out})())
