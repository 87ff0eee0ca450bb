"""Fault injection for tests: run a child process and SIGKILL it at a named write point.

The hook is tests/fault_inject/sitecustomize.py (put first on the child's PYTHONPATH; it watches `os.replace`, which
every publish of the atomic writers, and so of every cache and checkpoint, goes through): with
``FLYTHINKER_FAULT_POINT=<point>[:<substring>]`` in its environment the child kills itself with SIGKILL when it
reaches that point for a path containing ``<substring>``. Product code carries no hook. No ``finally`` block, no
atexit hook runs, exactly as under the OOM killer or a power cut.

Usage (see tests/test_faults.py for the table of what must survive each point; add a row there)::

    proc = run_killed(["train", "--save-steps", "2", ...], point="atomic_directory.written",
                      where="checkpoint-4", env={"FLYTHINKER_CACHE": str(tmp)})
    # proc.returncode == -SIGKILL is asserted: a child that never reached the point fails the test

:func:`run_child` runs the same child without a fault (the rerun / resume / the uninterrupted reference).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULT_ENV = "FLYTHINKER_FAULT_POINT"
FAULT_POINTS = {
    "atomic_directory.written": "a directory's contents are written under its temporary name, not moved yet",
    "atomic_directory.replacing": "an existing destination was moved aside, the new one is not in place yet",
    "atomic_write.written": "a file's bytes are written (and fsynced) under its temporary name, not moved yet",
    "publish.partial": "a folder published file by file (flythinker train's final model) has its first file moved",
}
INJECTOR = Path(__file__).resolve().parent / "fault_inject"  # its sitecustomize.py arms the point in the child


def _command(child: str | Sequence[str]) -> list[str]:
    """A Python snippet (str) runs with `python -c`; a list is a `flythinker` command line."""
    if isinstance(child, str):
        return [sys.executable, "-c", child]
    return [sys.executable, "-m", "flythinker.cli", *child]


def _env(extra: Mapping[str, str] | None, fault: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models on a shared 2-core machine
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    if fault is not None:
        env[FAULT_ENV] = fault
        env["PYTHONPATH"] = os.pathsep.join([str(INJECTOR), env["PYTHONPATH"]])
    return env


def run_child(child: str | Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run `child` (a Python snippet or a `flythinker` argv) to completion, no fault; returns the process.

    check: raise AssertionError with the child's output tail if it does not exit 0.
    """
    proc = subprocess.run(_command(child), env=_env(env, None), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"child exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def run_killed(child: str | Sequence[str], point: str, *, where: str = "", env: Mapping[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `child` with the fault `point` (one of FAULT_POINTS) armed for paths containing
    `where`; assert that it died there of SIGKILL (not earlier by an error, not later by finishing)."""
    if point not in FAULT_POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {sorted(FAULT_POINTS)}")
    fault = f"{point}:{where}" if where else point
    proc = subprocess.run(_command(child), env=_env(env, fault), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, (
        f"child was meant to be killed at {fault} but exited {proc.returncode}:\n"
        f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def leftover_temps(folder: str | os.PathLike) -> list[Path]:
    """Temporary siblings (`.<name>.tmp-<pid>-...`) under `folder`, recursively."""
    return sorted(p for p in Path(folder).rglob(".*.tmp-*"))


# ---- damaged checkpoint folders (corrupt files, wrong types): what a user or a crash can leave on disk ----------
def _edit_config(folder: Path, edit) -> None:
    import json

    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _strip_tensors(folder: Path, prefix: str) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    save_file({k: v for k, v in state.items() if not k.startswith(prefix)}, path, metadata={"format": "pt"})


def _index_outside(folder: Path) -> None:
    import json

    from safetensors import safe_open

    outside = folder.parent / f"{folder.name}-outside.safetensors"
    os.replace(folder / "model.safetensors", outside)
    with safe_open(outside, "pt") as fh:
        names = list(fh.keys())
    index = {"metadata": {}, "weight_map": {k: f"../{outside.name}" for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header right after its 8-byte length
    path.write_bytes(bytes(data))


def _pickled_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")


def _set_sub(part: str, key: str, value):
    def edit(c):
        c[part][key] = value
    return edit


def _nan_tensor(folder: Path) -> None:
    """NaN in the first floating tensor of model.safetensors (rewritten whole, still a valid file)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    key = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# name -> (how to damage a copy of a good folder, what the one-line error must say). Pair folders unless noted.
DAMAGES = {
    "truncated_safetensors": (lambda f: _truncate(f / "model.safetensors"), "not a complete safetensors file"),
    "corrupt_safetensors": (lambda f: _corrupt_header(f / "model.safetensors"), "not a complete safetensors file"),
    "config_a_list": (lambda f: (f / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    "config_empty": (lambda f: (f / "config.json").write_bytes(b""), "is empty"),
    "config_not_json": (lambda f: (f / "config.json").write_text("{'a': 1"), "not valid JSON"),
    "no_model_type": (lambda f: _edit_config(f, lambda c: c.pop("model_type")), "has no model_type"),
    "lambda_a_string": (lambda f: _edit_config(f, lambda c: c.update(fusion_lambda="0.5")),
                        "fusion_lambda must be a float"),
    "layers_a_string": (lambda f: _edit_config(f, _set_sub("generator", "num_hidden_layers", "two")),
                        "cannot load"),
    "reasoner_stripped": (lambda f: _strip_tensors(f, "reasoner."), "missing"),
    "more_layers_in_config": (lambda f: _edit_config(f, _set_sub("generator", "num_hidden_layers", 3)),
                              "missing"),
    "fewer_layers_in_config": (lambda f: _edit_config(f, _set_sub("generator", "num_hidden_layers", 1)),
                               "extra tensors"),
    "index_outside_folder": (_index_outside, "points outside its folder"),
    "pickled_only": (_pickled_only, "pickled weights only"),
    "nan_tensor": (_nan_tensor, "non-finite values"),
}
# the damages that apply to a plain HF model folder too (its config has no sub-configs / fusion fields)
PLAIN_DAMAGES = ("truncated_safetensors", "corrupt_safetensors", "config_a_list", "config_empty", "no_model_type",
                 "index_outside_folder", "pickled_only", "nan_tensor")


def damaged_copy(good: Path, damage: str, root: Path) -> Path:
    """A copy of the model folder `good` under `root`, damaged as DAMAGES[damage] says; returns its path."""
    import shutil

    dest = root / f"{good.name}-{damage}"
    if not dest.exists():
        shutil.copytree(good, dest)
        DAMAGES[damage][0](dest)
    return dest


# ---- a shipped pair's folder (pair.json + deltas.safetensors, flythinker/pretrained) ------------------------------
def _edit_deltas(edit):
    def damage(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "deltas.safetensors")
        edit(tensors)
        save_file(tensors, folder / "deltas.safetensors", metadata={"format": "pt"})
    return damage


def _edit_pair_json(edit):
    def damage(folder: Path) -> None:
        import json

        info = json.loads((folder / "pair.json").read_text())
        edit(info)
        (folder / "pair.json").write_text(json.dumps(info))
    return damage


def _drop_layer_factors(tensors: dict) -> None:
    for key in [k for k in tensors if ".layers.3.self_attn.q_proj.lora_" in k]:
        del tensors[key]


def _nan_projection(tensors: dict) -> None:
    tensors["latent_proj.weight"] = tensors["latent_proj.weight"].clone().fill_(float("nan"))


# name -> (damage to a copy of a shipped pair's folder, what the error says, whether it is found before the base
# model loads). Loaded with flythinker.pretrained.loading.from_shipped(name, folder=copy).
SHIPPED_DAMAGES = {
    "no_projection": (_edit_deltas(lambda t: t.pop("latent_proj.weight")), "lack latent_proj.weight", False),
    "layer_factors_missing": (_edit_deltas(_drop_layer_factors), "q_proj of layers [3]", False),
    "nan_projection": (_edit_deltas(_nan_projection), "non-finite", True),
    "scaling_nan": (_edit_pair_json(lambda i: i["lora"].update(scaling=float("nan"))), "lora.scaling", True),
    "scaling_a_string": (_edit_pair_json(lambda i: i["lora"].update(scaling="2")), "lora.scaling", True),
    "no_base": (_edit_pair_json(lambda i: i.pop("base")), "'base'", True),
    "fusion_a_list": (_edit_pair_json(lambda i: i.update(fusion=[1])), "'fusion'", True),
    "lora_a_list": (_edit_pair_json(lambda i: i.update(lora=[1])), "'lora'", True),
    "pair_json_not_json": (lambda f: (f / "pair.json").write_text("{'base'"), "not valid JSON", True),
    "pair_json_missing": (lambda f: (f / "pair.json").unlink(), "no pair.json", True),
    "deltas_truncated": (lambda f: _truncate(f / "deltas.safetensors"), "cannot read", True),
}


def shipped_copy(name: str, damage: str, root: Path) -> Path:
    """A copy of shipped pair `name`'s folder under `root`, damaged as SHIPPED_DAMAGES[damage] says."""
    import shutil

    from flythinker.pretrained import HERE

    dest = root / f"{name}-{damage}"
    if not dest.exists():
        shutil.copytree(HERE / name, dest)
        SHIPPED_DAMAGES[damage][0](dest)
    return dest
