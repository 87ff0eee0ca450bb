"""peft interop for shared-base pairs: read a peft LoRA adapter (a `PeftModel`, a model with peft LoRA layers,
or an adapter folder) into a half's `SharedLoRALinear`s, and write a half's adapter out as a peft model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from flythinker.shared_base.lora_layer import SharedBaseSpec, adapters


def load_peft_adapter(half: nn.Module, adapter: Any) -> int:
    """Copy a peft LoRA adapter into a half's `SharedLoRALinear`s: `adapter` is a `PeftModel` (its active
    adapter), a model with peft LoRA layers injected, or a peft adapter folder (adapter_config.json +
    adapter_model.safetensors). Returns the number of layers loaded. Modules the adapter does not cover get a zero
    adapter (exactly the base there); a module it adapts that the half has no adapter for, or another rank, is a
    ValueError."""
    weights = _peft_weights(adapter)
    mine = adapters(half)
    extra = sorted(set(weights) - set(mine))
    if extra:
        raise ValueError(f"peft adapter does not match the shared base's targets: it adapts {extra[:3]} "
                         f"({len(extra)} modules in all) that the shared base has no adapter for")
    with torch.no_grad():
        for name, m in mine.items():
            if name not in weights:  # not adapted by this peft adapter (e.g. layers_to_transform): exactly 0
                m.lora_B.zero_()
                continue
            A, B, scaling = weights[name]
            if A.shape != m.lora_A.shape or B.shape != m.lora_B.shape:
                raise ValueError(f"{name}: peft adapter shapes {tuple(A.shape)}/{tuple(B.shape)} != "
                                 f"{tuple(m.lora_A.shape)}/{tuple(m.lora_B.shape)} (rank differs?)")
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
            m.scaling = scaling
    return sum(name in weights for name in mine)


_Weights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> (A [r, in], B [out, r], scaling)


def _peft_weights(adapter: Any) -> _Weights:
    if isinstance(adapter, dict):  # already read (share_pair)
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        return _peft_folder_weights(os.fspath(adapter))
    tree = adapter.base_model.model if hasattr(adapter, "active_adapter") and hasattr(adapter, "base_model") \
        else adapter
    found = peft_lora_weights(tree)
    if not found:
        raise ValueError("the peft model holds no LoRA layers")
    return found


def peft_lora_layers(tree: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`(module path, layer)` of every peft `LoraLayer` in `tree`."""
    from peft.tuners.lora import LoraLayer

    for n, m in tree.named_modules():
        if isinstance(m, LoraLayer):
            yield n, m


def peft_lora_weights(tree: nn.Module) -> _Weights:
    """The active LoRA adapter of every peft LoraLayer in `tree`, by module path."""
    found = {}
    for n, m in peft_lora_layers(tree):
        for name in m.active_adapters:
            if name in m.lora_A:
                if m.use_dora.get(name, False):
                    raise ValueError("DoRA adapters are not supported by shared-base pairs (plain LoRA only)")
                found[n] = (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach(), float(m.scaling[name]))
    return found


def _peft_folder_weights(folder: str) -> _Weights:
    from safetensors.torch import load_file

    cfg_path, w_path = (os.path.join(folder, f) for f in ("adapter_config.json", "adapter_model.safetensors"))
    if not os.path.isfile(cfg_path) or not os.path.isfile(w_path):
        raise FileNotFoundError(f"{folder} is not a peft adapter folder (adapter_config.json + "
                                "adapter_model.safetensors; pickled adapters are refused)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{folder}: only plain LoRA adapters (one r / lora_alpha, no DoRA/rsLoRA) are supported")
    scaling = float(cfg["lora_alpha"]) / int(cfg["r"])
    out: dict[str, list] = {}
    for k, v in load_file(w_path).items():
        k = k.removeprefix("base_model.model.")
        for part, i in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if k.endswith(part):
                out.setdefault(k[: -len(part)], [None, None])[i] = v
    return {k: (a, b, scaling) for k, (a, b) in out.items()}


def unwrap_peft_lora(model: nn.Module) -> None:
    """Replace every peft LoraLayer in `model` by its base layer (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, m.get_base_layer())


def to_peft(half: nn.Module, base_copy: PreTrainedModel, spec: SharedBaseSpec):
    """A peft `PeftModel` over `base_copy` (an independent copy of the base) carrying this half's adapter, e.g.
    to build the two-copy pair with the same adapters."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                     target_modules=list(spec.target_modules), bias="none")
    peft_model = get_peft_model(base_copy, cfg)
    mine = adapters(half)
    with torch.no_grad():
        for n, m in peft_model.base_model.model.named_modules():
            if n in mine:
                m.lora_A["default"].weight.copy_(mine[n].lora_A)
                m.lora_B["default"].weight.copy_(mine[n].lora_B)
    return peft_model


__all__ = ["load_peft_adapter", "peft_lora_layers", "peft_lora_weights", "to_peft", "unwrap_peft_lora"]
