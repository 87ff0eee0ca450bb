"""Checkpoint folders: the one home of their validation and strict loading (a FlyThinker pair or a plain HF model),
and of "which training checkpoint is complete" for resuming.

Loading is strict by default. `transformers` loads a folder whose tensors do not match its config anyway: missing
tensors are randomly initialised and extra ones dropped, with a report that flythinker's CLI hides (a pair with
every `reasoner.*` tensor stripped, or with `num_hidden_layers` changed in config.json, generated from random
layers). Here such a folder is refused with a :class:`CheckpointError` naming what is missing or extra.

Before any weights load, :func:`check_folder` refuses, naming the file: a path that does not exist (at once: no
model hub is ever asked), an empty/invalid/non-object config.json or one
without a `model_type` (what a kill while writing one leaves), no safetensors weights, a truncated or corrupt
safetensors file (its header does not cover the file) and a safetensors index naming a file outside the folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# what a resumable `Trainer` checkpoint holds besides the model (written by HF Trainer._save_checkpoint)
# (`flythinker.training.trainer.FlyThinkerTrainer` writes optimizer/scheduler state as safetensors + JSON: no pickle)
RESUME_FILES = ("trainer_state.json", "optimizer.safetensors", "optimizer.json", "scheduler.json")
PICKLED_RESUME_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt")  # plain HF Trainer's: never unpickled
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is (the message names the folder and what is wrong)."""


# ---- validation before loading --------------------------------------------------------------------------------------
def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model folder as a dict; CheckpointError if missing, empty, not JSON, not an object or
    without a string `model_type`."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} (not a model folder)")
    text = path.read_bytes()
    if not text.strip():
        raise CheckpointError(f"{path} is empty (a half-written checkpoint?)")
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{path} has no model_type (a string naming the architecture, e.g. 'llama')")
    return config


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files a model folder loads (`model.safetensors`, or those its index names); refuses an
    index entry outside the folder and a folder with no safetensors weights."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc})") from None
        root = folder.resolve()
        files = []
        for name in names:
            path = (folder / str(name)).resolve()
            if path.parent != root:
                raise CheckpointError(f"{index} points outside its folder ({name!r}); refused")
            files.append(path)
        return files
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(f"{folder} has pickled weights only (.bin/.pt): flythinker loads safetensors only")
    raise CheckpointError(f"{folder} has no {WEIGHTS_NAME} (nor {INDEX_NAME})")


def tensor_names(path: str | os.PathLike) -> set[str]:
    """Names of the tensors in one safetensors file; CheckpointError if it is missing, truncated or corrupt."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (named by the folder's safetensors index)")
    try:
        with safe_open(path, "pt") as fh:
            return set(fh.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a complete safetensors file ({exc}; truncated or corrupt?)") from None


def check_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Validate a model folder before loading anything; returns its config dict (see module docstring)."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such checkpoint folder: {folder} (flythinker loads local folders only; nothing "
                              "is downloaded from a model hub)")
    if not path.is_dir():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder")
    config = read_config(path)
    for file in weight_files(path):
        tensor_names(file)
    return config


# ---- strict loading -------------------------------------------------------------------------------------------------
def _summary(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    prefixes = sorted({k.split(".", 1)[0] for k in keys})
    head = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
    return f"{head} [under: {', '.join(prefixes)}]"


def check_loading_info(folder: str | os.PathLike, info: dict[str, Any]) -> None:
    """Raise CheckpointError if HF's loading info reports a tensor missing, extra or of the wrong shape."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {len(info['missing_keys'])} tensors the config needs: "
                        f"{_summary(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"{len(info['unexpected_keys'])} extra tensors the config has no place for: "
                        f"{_summary(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        shown = [str(m) for m in list(info["mismatched_keys"])[:4]]
        problems.append(f"{len(info['mismatched_keys'])} tensors of the wrong shape: {', '.join(shown)}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(e) for e in info["error_msgs"])[:500])
    if problems:
        raise CheckpointError(f"{folder}: its tensors do not match its config.json: " + "; ".join(problems)
                              + " (pass strict=False to load it anyway, missing tensors randomly initialised)")


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a malformed folder raises (besides CheckpointError): a config value of the wrong type is a
    TypeError or huggingface_hub's StrictDataclassError (a plain Exception), a corrupt file a SafetensorError."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return (ValueError, TypeError, KeyError, AttributeError, IndexError, StrictDataclassError, SafetensorError)


def load_strict(loader: Callable[..., Any], folder: str | os.PathLike | None, *args: Any,
                strict: bool | None = None, **kwargs: Any) -> Any:
    """`loader(folder, *args, **kwargs)` (an HF `from_pretrained`) after :func:`check_folder`, refusing a load
    whose tensors do not match the config unless `strict=False`. `strict=None` (default) is strict, except for
    a caller that asks for the load report (`output_loading_info=True`: it gets `(model, info)` with the
    missing/extra keys to judge itself, as HF's own tests do). Errors of a malformed folder (a config value of
    the wrong type, ...) come back as CheckpointError naming the folder."""
    if folder is not None:  # None: weights from `state_dict=` (HF API), nothing on disk to check
        check_overrides(folder, check_folder(folder), kwargs)
    want_info = bool(kwargs.pop("output_loading_info", False))
    strict = not want_info if strict is None else strict
    try:
        model, info = loader(folder, *args, output_loading_info=True, **kwargs)
    except CheckpointError:
        raise
    except load_errors() as exc:
        raise CheckpointError(f"cannot load {folder}: {type(exc).__name__}: {exc}") from exc
    if strict:
        check_loading_info(folder, info)
        check_finite(folder, model)
    return (model, info) if want_info else model


def check_finite(folder: str | os.PathLike | None, model: Any) -> None:
    """Raise CheckpointError naming the tensors of a loaded model that hold NaN or inf (a damaged or diverged
    checkpoint: such a tensor decides every output, e.g. a NaN projection makes every fused logit NaN)."""
    import torch

    named = model.state_dict().items()  # what a checkpoint holds (non-persistent buffers, e.g. masks, are not)
    bad = sorted({name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())})
    if bad:
        raise CheckpointError(f"{folder}: non-finite values (NaN/inf) in {len(bad)} tensor(s): "
                              f"{_summary(bad, limit=4)}")


def check_overrides(folder: str | os.PathLike, config: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Config overrides that would silently drop or invent trained weights are refused: the projection
    (`"linear"` is a trained matrix; loading it as `"pad"` would throw it away)."""
    asked = overrides.get("projection")
    saved = config.get("projection", "pad")
    if asked is not None and asked != saved:
        raise CheckpointError(f"{folder} was saved with projection={saved!r}; projection={asked!r} cannot be "
                              "chosen at load time (the projection is part of the weights)")


# ---- training checkpoints -------------------------------------------------------------------------------------------
def check_resumable(folder: str | os.PathLike) -> Path:
    """A `Trainer` checkpoint folder that can be resumed: the model folder checks plus non-empty optimizer,
    scheduler and a valid trainer_state.json. Returns the path; CheckpointError naming the first problem."""
    path = Path(folder)
    check_folder(path)
    pickled = [n for n in PICKLED_RESUME_FILES if (path / n).is_file()]
    if pickled and not (path / RESUME_FILES[1]).is_file():
        raise CheckpointError(f"{path} holds pickled optimizer/scheduler state only ({', '.join(pickled)}): "
                              "flythinker never unpickles; resume from a checkpoint written by FlyThinkerTrainer")
    for name in RESUME_FILES:
        file = path / name
        if not file.is_file() or file.stat().st_size == 0:
            raise CheckpointError(f"{file} is {'empty' if file.is_file() else 'missing'}: {path} is not a complete "
                                  "training checkpoint (written by a run that was killed?)")
    try:
        json.loads((path / "trainer_state.json").read_text())["global_step"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / 'trainer_state.json'} is not a trainer state ({exc})") from None
    return path


def training_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` folders of a run, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest complete training checkpoint under `output_dir` and the newer ones skipped, with why.

    Raises CheckpointError if there is none."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(training_checkpoints(output_dir)):
        try:
            return check_resumable(path), skipped
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
    why = f"; skipped: {'; '.join(r for _, r in skipped)}" if skipped else ""
    raise CheckpointError(f"no complete checkpoint-<step> folder to resume from in {output_dir}{why}")
