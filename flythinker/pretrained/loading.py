"""Building a shipped pair from its offline base model and its trained deltas (`FlyThinkerForCausalLM.from_pretrained`
of a shipped name calls :func:`load_shipped`).

Two layouts, one set of weights:
- **shared base** (the default where both halves are the whole base): the base held once, the deltas' LoRA factors
  as the halves' adapters (`flythinker.shared_base`; a half without factors gets a zero adapter, exactly the base).
  Decoding runs both halves' rows as one batched forward, so the base weights stream once per token. Measured on
  the shipped SmolLM2 pair (2-core CPU, batch 1, greedy; benchmarks/results/shipped_pair_decode.json): about 24
  tokens/s after the first token against 15 for the two-copy layout, with the same tokens on every reply checked.
- **two copies** (`shared_base=False`, and always for a truncated reasoner): two independent models, the factors
  merged into the weights (`W + scaling * B @ A`), plain linear layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flythinker.pretrained import DELTAS, deltas_path, pair_info

if TYPE_CHECKING:
    from flythinker.modeling import FlyThinkerForCausalLM

Factors = dict[str, dict[str, torch.Tensor]]  # "<half>.<module path>" -> {"A": [r, in], "B": [out, r]}


def read_deltas(name: str, folder: str | os.PathLike | None) -> tuple[dict, dict[str, torch.Tensor], Factors]:
    """(pair.json, the named tensors, the LoRA factors) of shipped pair `name`, or of the retrained copy in
    `folder` (`flythinker demo --retrain`)."""
    from safetensors.torch import load_file

    info = pair_info(name) if folder is None else json.loads((Path(folder) / "pair.json").read_text())
    path = deltas_path(name) if folder is None else Path(folder) / DELTAS
    named: dict[str, torch.Tensor] = {}
    factors: Factors = {}
    for key, value in load_file(path).items():
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


def copy_named(model: torch.nn.Module, named: dict[str, torch.Tensor], name: str) -> None:
    """Copy tensors named like a parameter or buffer of `model` (the projection, the latent statistics) into it."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, value in named.items():
        if key not in tensors or tuple(tensors[key].shape) != tuple(value.shape):
            raise ValueError(f"shipped pair {name!r}: delta {key} {tuple(value.shape)} matches no parameter")
        with torch.no_grad():
            tensors[key].copy_(value.to(tensors[key].dtype))


def merge_factors(model: torch.nn.Module, factors: Factors, scaling: float, name: str) -> None:
    """Two-copy layout: fold each module's factors into its weight, `W += scaling * B @ A`."""
    params = dict(model.named_parameters())
    for module, ab in factors.items():
        w = params.get(f"{module}.weight")
        if w is None or (ab["B"].shape[0], ab["A"].shape[1]) != tuple(w.shape):
            raise ValueError(f"shipped pair {name!r}: LoRA factors of {module} do not fit a weight of this pair")
        with torch.no_grad():
            w += (scaling * (ab["B"].float() @ ab["A"].float())).to(w.dtype)


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
    copy_named(model.model, named, name)  # the deltas are keyed like the fused pair's (checkpoint) names
    return model.eval()


__all__ = ["copy_named", "load_shipped", "merge_factors", "read_deltas", "set_adapters"]
