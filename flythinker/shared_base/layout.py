"""Shared-base layout and conversions: building a pair of one base with two adapters (`from_shared_base`,
`build_halves`), telling whether two halves are one base (`same_base`), and converting between the shared-base
layout and two independent copies (`share_pair`, `unshare_pair`).

Layout. `model.generator` and `model.reasoner` stay two full HF causal LMs (every existing path, training and
`generate` included, runs on them unchanged), but every base parameter of the reasoner *is* the generator's
parameter object, held as a plain attribute (not registered), so `parameters()`, `state_dict()` and
`save_pretrained` see it once: a checkpoint holds the base once plus both adapters. Each targeted `nn.Linear` of
both halves is wrapped in a `SharedLoRALinear` (its own rank-r adapter, peft's formula
`base(x) + B(A(dropout(x))) * alpha / r`).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from flythinker.options import FUSION_FIELDS, LORA_TARGETS
from flythinker.shared_base.lora_layer import (
    SharedBaseSpec,
    SharedLoRALinear,
    StepContext,
    adapters,
    fold_lora,
    group_same_input,
)
from flythinker.shared_base.peft_io import load_peft_adapter, peft_lora_weights, unwrap_peft_lora


def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
             and ".layers." in f".{n}"]
    if not names:
        leaf = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no LoRA target {list(targets)} found in the base's decoder layers; its linear layers "
                         f"are {leaf}")
    return names


def _wrap(model: nn.Module, names: list[str], spec: SharedBaseSpec, ctx: StepContext) -> list[SharedLoRALinear]:
    out = []
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = SharedLoRALinear(getattr(parent, leaf), spec.r, spec.lora_alpha, spec.lora_dropout, ctx)
        setattr(parent, leaf, lora)
        out.append(lora)
    group_same_input(dict(zip(names, out, strict=True)))
    ctx.groups += dict.fromkeys(m._group for m in out)
    return out


def build_halves(base: PreTrainedModel, spec: SharedBaseSpec) -> tuple[PreTrainedModel, PreTrainedModel]:
    """(generator, reasoner) over one copy of `base`'s weights, each with its own fresh LoRA adapter (A random,
    B zero: both start as the base). `base` itself becomes the generator (modified in place)."""
    for p in base.parameters():
        p.requires_grad_(False)
    rsn = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})  # same parameter objects, own modules
    ctx = StepContext()
    # r = 0: no adapters, both halves are the base itself (a model paired with itself)
    names = _targets(base, tuple(spec.target_modules)) if spec.r else []
    for g, r in zip(_wrap(base, names, spec, ctx), _wrap(rsn, names, spec, ctx), strict=True):
        object.__setattr__(g, "_twin", r)
        object.__setattr__(r, "_twin", g)
    _unregister_shared(base, rsn)
    return base, rsn


def _unregister_shared(gen: nn.Module, rsn: nn.Module) -> None:
    """Make every non-adapter parameter of `rsn` a plain attribute pointing at `gen`'s parameter at the same path
    (re-run after loading: a loader may have replaced the generator's parameter objects)."""
    for name, m in rsn.named_modules():
        g = gen.get_submodule(name)
        shared = set(getattr(m, "_shared_names", ()))
        shared |= {k for k in m._parameters if not (isinstance(m, SharedLoRALinear) and k.startswith("lora_"))}
        for k in shared:
            m._parameters.pop(k, None)
            src = g._parameters.get(k)
            if src is None:
                src = getattr(g, k, None)
            object.__setattr__(m, k, src)
        m._shared_names = tuple(sorted(shared))


def is_shared_base(model: nn.Module) -> bool:
    """Whether `model` is a FlyThinker pair built by `from_shared_base` (or loaded from one)."""
    return getattr(getattr(model, "config", None), "shared_base", None) is not None


def retie(model: nn.Module) -> None:
    """Point the reasoner's base weights at the generator's again (after `from_pretrained` / `tie_weights`)."""
    if is_shared_base(model):
        _unregister_shared(model.generator, model.reasoner)


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A (possibly peft-LoRA'd) model's base weights under the plain model's names."""
    return {n.replace(".base_layer.", "."): p for n, p in model.named_parameters(remove_duplicate=False)
            if "lora_" not in n}


def same_base(generator: nn.Module, reasoner: nn.Module) -> bool:
    """Whether two (possibly peft-LoRA'd) causal LMs are one base: same config and bit-identical base weights."""
    gc, rc = generator.config.to_dict(), reasoner.config.to_dict()
    if {k: v for k, v in gc.items() if not k.startswith("_")} != {k: v for k, v in rc.items() if not k.startswith("_")}:
        return False
    g, r = _base_state(generator), _base_state(reasoner)
    return g.keys() == r.keys() and all(g[k].shape == r[k].shape and torch.equal(g[k], r[k]) for k in g)


def share_pair(pair: nn.Module) -> nn.Module | None:
    """The shared-base equivalent of a two-copy FlyThinker pair whose halves are one base (`same_base`), plain or
    with peft LoRA adapters of one rank on either half (flythinker.training.trainable.apply_lora): the base held
    once, both adapters carried over, the same fusion config. Returns None when the halves differ (or the adapters
    do not fit: different ranks, DoRA). The input pair is consumed (its generator becomes the shared base)."""
    if is_shared_base(pair) or not same_base(pair.generator, pair.reasoner):
        return None
    try:
        weights = {h: peft_lora_weights(getattr(pair, h)) for h in ("generator", "reasoner")}
    except ValueError:
        return None
    ranks = {a.shape[0] for w in weights.values() for a, _, _ in w.values()}
    if len(ranks) > 1:
        return None
    targets = sorted({n.rsplit(".", 1)[-1] for w in weights.values() for n in w})
    fusion = {k: getattr(pair.config, k) for k in FUSION_FIELDS}
    fusion_state = {k: v.clone() for k, v in pair.fusion_state_dict().items()}  # a trained projection, statistics
    base = pair.generator
    unwrap_peft_lora(base)
    if hasattr(pair, "_flythinker_lora"):  # apply_lora's record of the peft wrappers: gone with the unwrap
        del pair._flythinker_lora
    cls = type(pair)
    model = from_shared_base(cls, base, r=next(iter(ranks), 0), target_modules=targets or None, **fusion)
    for half in ("generator", "reasoner"):
        if weights[half]:
            load_peft_adapter(getattr(model, half), weights[half])
        else:
            with torch.no_grad():
                for a in adapters(getattr(model, half)).values():
                    a.lora_B.zero_()
    model.load_fusion_state_dict(fusion_state)
    model.generation_config = copy.deepcopy(pair.generation_config)
    return model.train(pair.training)


def _merged_half(model: nn.Module, half: str) -> PreTrainedModel:
    """An independent plain copy of one half of shared-base pair `model`: the base's weights cloned, each adapted
    linear's weight replaced by `W + scaling * B @ A` (computed in fp32), no adapter modules."""
    from transformers import AutoModelForCausalLM

    part = getattr(model, half)
    mine = adapters(part)
    state = {}
    for name, p in model.generator.named_parameters(remove_duplicate=False):  # the base, registered once
        if ".lora_" in name:
            continue
        path, wrapped, leaf = name.rpartition(".base.")  # an adapted linear's `<path>.base.weight` -> `<path>.weight`
        state[f"{path}.{leaf}" if wrapped and path in mine else name] = p.detach().clone()
    for path, m in mine.items():
        fold_lora(state[f"{path}.weight"], m.lora_A, m.lora_B, m.scaling)
    ref = next(iter(state.values()))
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(part.config), dtype=ref.dtype).to(ref.device)
    plain.load_state_dict(state, strict=True)  # every parameter, tied ones under each name
    plain.tie_weights()
    if getattr(part, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(part.generation_config)
    return plain


def unshare_pair(model: nn.Module) -> nn.Module:
    """The two-copy equivalent of shared-base pair `model` (the inverse of `share_pair`): two independent plain
    copies of the base, each with its own half's adapter merged into its weights, the same fusion config and
    tensors. It computes what `model` computes (up to the rounding of the merged weights) with plain linear
    layers: the layout vLLM serving loads (`flythinker serve`), or for training the halves apart. Costs a second
    copy of the base in memory; `model` is not modified."""
    if not is_shared_base(model):
        raise ValueError("unshare_pair takes a shared-base pair (FlyThinkerForCausalLM.from_shared_base or a saved "
                         "one); this pair already holds two models")
    fusion = {k: getattr(model.config, k) for k in FUSION_FIELDS}
    pair = type(model).from_pair(_merged_half(model, "generator"), _merged_half(model, "reasoner"), **fusion)
    pair.load_fusion_state_dict(model.fusion_state_dict())
    pair.generation_config = copy.deepcopy(model.generation_config)
    return pair.train(model.training)


def from_shared_base(cls: type, base: PreTrainedModel | str, *, r: int = 8, lora_alpha: float = 16,
                     target_modules: tuple[str, ...] | list[str] | None = None, lora_dropout: float = 0.0,
                     generator_adapter: Any = None, reasoner_adapter: Any = None,
                     dtype: torch.dtype | str | None = None, **fusion: Any):
    """Build a shared-base pair (see `FlyThinkerForCausalLM.from_shared_base`)."""
    if "reasoner_device" in fusion:
        raise ValueError("a shared-base pair holds one copy of the base: reasoner_device cannot differ")
    if isinstance(base, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True,
                                                    **({} if dtype is None else {"dtype": dtype}))
    spec = SharedBaseSpec(r, lora_alpha, tuple(target_modules or LORA_TARGETS), lora_dropout)
    gen, rsn = build_halves(base, spec)
    for half, adapter in ((gen, generator_adapter), (rsn, reasoner_adapter)):
        if adapter is not None:
            load_peft_adapter(half, adapter)
    model = cls.from_pair(gen, rsn, **fusion)
    model.config.shared_base = spec.to_dict()
    retie(model)
    return model


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameter storages reachable from `model`, registered or held as shared attributes."""
    seen: dict[int, int] = {}
    for m in model.modules():
        tensors = list(m._parameters.values()) + [getattr(m, k, None) for k in getattr(m, "_shared_names", ())]
        for p in tensors:
            if isinstance(p, torch.Tensor):
                seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


__all__ = ["build_halves", "from_shared_base", "is_shared_base", "parameter_bytes", "retie", "same_base",
           "share_pair", "unshare_pair"]
