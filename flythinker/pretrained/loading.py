"""Building a shipped pair from its offline base model and its trained deltas (`FlyThinkerForCausalLM.from_pretrained`
of a shipped name calls :func:`load_shipped`: this module registers it with the model on import).

Two layouts, one set of weights:
- **shared base** (the default where both halves are the whole base): the base held once, the deltas' LoRA factors
  as the halves' adapters (`flythinker.shared_base`; a half without factors gets a zero adapter, exactly the base).
  Decoding runs both halves' rows as one batched forward, so the base weights stream once per token: faster than
  the two-copy layout on the shipped pair, with the same tokens (benchmarks/results/shipped_pair_decode.json).
- **two copies** (`shared_base=False`, and always for a truncated reasoner): two independent models, the factors
  merged into the weights (`W + scaling * B @ A`), plain linear layers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from flythinker.modeling import FlyThinkerForCausalLM, register_named_pair_factory
from flythinker.pretrained import DELTAS, deltas_path, pair_info, shipped_name

Factors = dict[str, dict[str, torch.Tensor]]  # "<half>.<module path>" -> {"A": [r, in], "B": [out, r]}


def read_deltas(name: str, folder: str | os.PathLike | None) -> tuple[dict, dict[str, torch.Tensor], Factors]:
    """(pair.json, the named tensors, the LoRA factors) of shipped pair `name`, or of the retrained copy in
    `folder` (`flythinker demo --retrain`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = check_manifest(name, pair_info(name) if folder is None else _read_manifest(name, Path(folder)))
    path = deltas_path(name) if folder is None else Path(folder) / DELTAS
    named: dict[str, torch.Tensor] = {}
    factors: Factors = {}
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"shipped pair {name!r}: cannot read {path} ({type(exc).__name__}: {exc})") from None
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"shipped pair {name!r}: {path.name} holds non-finite values (NaN/inf) in "
                         f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    for key, value in tensors.items():
        if key.endswith((".lora_A", ".lora_B")):
            factors.setdefault(key[: -len(".lora_A")], {})[key[-1]] = value
        else:
            named[key] = value
    for module, ab in factors.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise ValueError(f"shipped pair {name!r}: LoRA factors of {module} ({sorted(ab)}) are not an A/B pair "
                             "of one rank")
    if factors and "scaling" not in info.get("lora", {}):
        raise ValueError(f"shipped pair {name!r} has LoRA factors but its pair.json gives no lora.scaling")
    return info, named, factors


def _read_manifest(name: str, folder: Path) -> dict:
    path = folder / "pair.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"shipped pair {name!r}: {folder} has no pair.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"shipped pair {name!r}: {path} is not valid JSON ({exc})") from None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_manifest(name: str, info: Any) -> dict:
    """pair.json's fields that decide how the pair is built, checked (ValueError naming the field): `base` a
    string, `fusion` an object, `reasoner_layers` a positive integer or absent, `lora` (when present) an object
    whose `scaling` is a finite positive number, `rank` a positive integer and `targets` / `part` well formed."""
    def bad(field: str, what: str):
        return ValueError(f"shipped pair {name!r}: pair.json {field} must be {what}")

    if not isinstance(info, dict):
        raise bad("", "a JSON object")
    if not isinstance(info.get("base"), str) or not info["base"]:
        raise bad("'base'", "the name of its base model")
    if not isinstance(info.get("fusion"), dict):
        raise bad("'fusion'", "an object of fusion options")
    k = info.get("reasoner_layers")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise bad("'reasoner_layers'", "a positive integer")
    lora = info.get("lora")
    if lora is None:
        return info
    if not isinstance(lora, dict):
        raise bad("'lora'", "an object")
    if "scaling" in lora and not (_finite_number(lora["scaling"]) and lora["scaling"] > 0):
        raise bad("lora.scaling", f"a finite positive number, got {lora['scaling']!r}")
    if "rank" in lora and (isinstance(lora["rank"], bool) or not isinstance(lora["rank"], int) or lora["rank"] < 1):
        raise bad("lora.rank", f"a positive integer, got {lora['rank']!r}")
    targets = lora.get("targets")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise bad("lora.targets", "a list of module names")
    if lora.get("part") not in (None, *LORA_PARTS):
        raise bad("lora.part", f"one of {', '.join(LORA_PARTS)}")
    return info


LORA_PARTS = ("generator", "reasoner", "both")


def check_lora_layers(name: str, info: dict, factors: Factors, model: torch.nn.Module) -> None:
    """Every layer of each trained half (pair.json's `lora.part`) has factors for every `lora.targets` module: a
    missing one would load as no change to that layer, a silently different model. ValueError naming them."""
    lora = info.get("lora") or {}
    targets, part = lora.get("targets"), lora.get("part")
    if not targets or not part:
        return
    missing = []
    for half in ("generator", "reasoner") if part == "both" else (part,):
        n = getattr(getattr(model, half).config, "num_hidden_layers", 0)
        for target in targets:
            have = {int(m.split(".layers.", 1)[1].split(".", 1)[0]) for m in factors
                    if m.startswith(f"{half}.") and ".layers." in m and m.endswith(f".{target}")}
            lost = sorted(set(range(n)) - have)
            if lost:
                missing.append(f"{half} {target} of layers {lost[:6]}{' ...' if len(lost) > 6 else ''}")
    if missing:
        raise ValueError(f"shipped pair {name!r}: its deltas lack the LoRA factors pair.json lists: "
                         f"{'; '.join(missing)}")


def copy_named(model: torch.nn.Module, named: dict[str, torch.Tensor], name: str) -> None:
    """Copy tensors named like a parameter or buffer of `model` (the projection, the latent statistics) into it.
    Every saved tensor of the pair's own (the projection, the latent statistics: anything outside the two halves)
    must be given: a missing one would stay at its initial value (a zero projection: no personalisation)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    own = {k for k in model.state_dict() if not k.startswith(("generator.", "reasoner."))}
    if own - set(named):
        raise ValueError(f"shipped pair {name!r}: its deltas lack {', '.join(sorted(own - set(named)))} (the "
                         "pair's own trained tensors)")
    for key, value in named.items():
        if key not in tensors or tuple(tensors[key].shape) != tuple(value.shape):
            raise ValueError(f"shipped pair {name!r}: delta {key} {tuple(value.shape)} matches no parameter")
        with torch.no_grad():
            tensors[key].copy_(value.to(tensors[key].dtype))


def merge_factors(model: torch.nn.Module, factors: Factors, scaling: float, name: str) -> None:
    """Two-copy layout: fold each module's factors into its weight, `W += scaling * B @ A` (`fold_lora`)."""
    from flythinker.shared_base import fold_lora

    params = dict(model.named_parameters())
    for module, ab in factors.items():
        w = params.get(f"{module}.weight")
        if w is None or (ab["B"].shape[0], ab["A"].shape[1]) != tuple(w.shape):
            raise ValueError(f"shipped pair {name!r}: LoRA factors of {module} do not fit a weight of this pair")
        fold_lora(w, ab["A"], ab["B"], scaling)


def set_adapters(model: torch.nn.Module, factors: Factors, scaling: float, name: str) -> None:
    """Shared-base layout: each module's factors become its half's adapter, every other adapter zero
    (`flythinker.shared_base.load_peft_adapter`, per half)."""
    from flythinker.shared_base import load_peft_adapter

    by_half: dict[str, dict] = {"generator": {}, "reasoner": {}}
    for module, ab in factors.items():
        half, _, path = module.partition(".")
        if half not in by_half:
            raise ValueError(f"shipped pair {name!r}: LoRA factors of {module} do not fit an adapter of this pair")
        by_half[half][path] = (ab["A"], ab["B"], scaling)
    for half, weights in by_half.items():
        try:
            load_peft_adapter(getattr(model, half), weights)
        except ValueError as exc:
            raise ValueError(f"shipped pair {name!r}: LoRA factors do not fit an adapter of this pair's {half} "
                             f"({exc})") from None


def _uses_shared_base(info: dict, factors: Factors, shared_base: bool | None) -> bool:
    ranks = {ab["A"].shape[0] for ab in factors.values()}
    possible = info.get("reasoner_layers") is None and len(ranks) <= 1
    if shared_base and not possible:
        raise ValueError("a shipped pair with a truncated reasoner or LoRA factors of several ranks loads as two "
                         "copies only (shared_base=False)")
    return possible if shared_base is None else shared_base


def load_shipped(cls: type[FlyThinkerForCausalLM], name: str, folder: str | os.PathLike | None = None, *,
                 dtype: torch.dtype | str | None = None, shared_base: bool | None = None,
                 **kwargs: Any) -> FlyThinkerForCausalLM:
    """Shipped pair `name` (or the copy in `folder`) in eval mode: its offline base model as generator and reasoner
    (pair.json's optional `reasoner_layers: k`: a reasoner of the base's first k layers and final norm,
    flythinker.truncate), its fusion options and its trained tensors. `shared_base`: None = the shared-base layout
    where it applies, else as asked (see the module docstring). `dtype=` and `shared_base=` are the only options."""
    from flythinker.hub import load_pretrained

    kwargs.pop("use_safetensors", None)
    if shared_base is not None and not isinstance(shared_base, bool):
        raise TypeError(f"shared_base must be True, False or None, got {shared_base!r}")
    if kwargs:
        raise TypeError(f"shipped pair {name!r} is loaded with dtype= / shared_base= only, got {sorted(kwargs)}")
    info, named, factors = read_deltas(name, folder)
    scaling = float(info["lora"]["scaling"]) if factors else 0.0
    dtype = torch.float32 if dtype is None else dtype
    gen, _ = load_pretrained(info["base"], dtype=dtype, with_tokenizer=False)
    if _uses_shared_base(info, factors, shared_base):
        r = next(iter(factors.values()))["A"].shape[0] if factors else 1
        targets = sorted({m.rsplit(".", 1)[-1] for m in factors}) or None
        model = cls.from_shared_base(gen, r=r, lora_alpha=scaling * r, target_modules=targets, **info["fusion"])
        set_adapters(model.model, factors, scaling, name)
    else:
        k = info.get("reasoner_layers")
        if k is None:
            rsn, _ = load_pretrained(info["base"], dtype=dtype, with_tokenizer=False)
        else:
            from flythinker.truncate import truncated_reasoner

            rsn = truncated_reasoner(gen, k)
        model = cls.from_pair(gen, rsn, **info["fusion"])
        merge_factors(model.model, factors, scaling, name)
    check_lora_layers(name, info, factors, model.model)
    copy_named(model.model, named, name)  # the deltas are keyed like the fused pair's (checkpoint) names
    return model.eval()


def from_shipped(name: str, folder: str | os.PathLike | None = None, **kwargs: Any) -> FlyThinkerForCausalLM:
    """Shipped pair `name` (case-insensitive) as a FlyThinkerForCausalLM: `load_shipped`. `folder`: read pair.json
    and the deltas from there instead (a retrained copy of the pair, `flythinker demo --retrain`)."""
    return load_shipped(FlyThinkerForCausalLM, name.lower(), folder, **kwargs)


def _names_shipped_pair(name_or_path: Any) -> bool:
    return shipped_name(name_or_path) is not None  # an existing path of that name is that path


def _shipped_factory(cls: type[FlyThinkerForCausalLM], name: str, **kwargs: Any) -> FlyThinkerForCausalLM:
    return load_shipped(cls, shipped_name(name), **kwargs)


# `FlyThinkerForCausalLM.from_pretrained("<shipped name>")` builds the pair here
register_named_pair_factory(_names_shipped_pair, _shipped_factory)

__all__ = ["check_lora_layers", "check_manifest", "copy_named", "from_shipped", "load_shipped", "merge_factors",
           "read_deltas", "set_adapters"]
