"""Shared-base pairs (docs/design.md, "Shared base"): one base model, a generator LoRA adapter and a reasoner
LoRA adapter, the base weights held once.

Layout. `model.generator` and `model.reasoner` stay two full HF causal LMs (every existing path, training and
`generate` included, runs on them unchanged), but every base parameter of the reasoner *is* the generator's
parameter object, held as a plain attribute (not registered), so `parameters()`, `state_dict()` and
`save_pretrained` see it once: a checkpoint holds the base once plus both adapters. Each targeted `nn.Linear` of
both halves is wrapped in a `SharedLoRALinear` (its own rank-r adapter, peft's formula
`base(x) + B(A(dropout(x))) * alpha / r`).

The batched decode step (`SharedStep`, used by `flythinker.decode`): per token, the generator's row(s) and the
reasoner's row(s) run as ONE forward of 2B rows through the generator's decoder: rows [:B] take the generator's
adapter, rows [B:] the reasoner's (the twin module's), so the base weights stream once per token, which is what a
batch-1 decode step is bound by. In that step (no autograd) each adapted linear runs lean: the base's one linear
over all 2B rows plus ONE `baddbmm_` of the two halves' scaled B matrices (stacked `[2, r, out]`) into its output,
reading `x @ A^T` from ONE `bmm` per group of sibling linears that read one input tensor (q/k/v, gate/up), against
the halves' A matrices stacked `[2, in, G*r]`; the stacked weights are cached per group and rebuilt when an adapter
parameter is replaced or changed in place (`_LeanGroup`; checked once per decode call, when its `SharedStep` is
built). Training and every other path keep peft's formula.
The two halves have different prompt lengths in split context: after the prefill
(each half into its own static cache) both caches are copied into one static cache of 2B rows, each half
left-padded to the longer prompt; masks and position ids stay per row, so attention and RoPE see exactly what
each half saw alone.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, StaticCache

from flythinker.options import FUSION_FIELDS, LORA_TARGETS

# sibling linears of one layer that read one input tensor (HF's Llama-family attention and MLP): one A-matmul each
_SAME_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _StepContext:
    """Shared by all adapters of one pair: `split = B` while a batched step runs (rows [:B] generator); `stash`
    holds, per `_LeanGroup`, the running step's input and its A-products (cleared after every step); `groups`:
    every adapter group of the pair (both halves)."""

    def __init__(self) -> None:
        self.split: int | None = None
        self.stash: dict[_LeanGroup, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self.groups: list[_LeanGroup] = []

    def refresh(self) -> None:
        """Check every built group's stacked weights against its adapters, rebuild the stale ones."""
        for g in self.groups:
            if g.A is not None:
                g.refresh()

    @contextmanager
    def batched(self, B: int, refresh: bool = True) -> Iterator[None]:
        """One batched step of 2B rows (rows [:B] the generator's); the stash lives as long as it. `refresh`: check
        the stacked weights first (`SharedStep` does that once, when it is built for a decode call)."""
        if refresh:
            self.refresh()
        self.split = B
        try:
            yield
        finally:
            self.split = None
            self.stash.clear()


class _LeanGroup:
    """The adapters of one layer (one half's side) that read one input tensor, in a fixed order, and their batched
    step's weights: `A [2, in, G*r]` (`[0]`: these adapters' A^T side by side, `[1]`: their twins') and, per member,
    `B [2, r, out]` (scaled B^T, then the twin's). Built on first use under no_grad (only the no-autograd batched
    step reads them); `refresh` rebuilds them when any of the 4G adapter parameters is another object, has another
    version (an in-place change) or another storage (`module.to()` keeps the object and the version), or a scaling
    changed. The key holds ids, so the parameters it names are held (`_held`): an id is never reused meanwhile."""

    def __init__(self, members: list[SharedLoRALinear]) -> None:
        self.members = tuple(members)
        self.r = members[0].lora_A.shape[0]
        self.A: torch.Tensor | None = None
        self.B: tuple[torch.Tensor, ...] = ()
        self._key: list = []
        self._held: list[torch.Tensor] = []

    def refresh(self) -> None:
        params, key = [], []
        for m in self.members + tuple(m._twin for m in self.members):
            d = m._parameters  # not m.lora_A: nn.Module.__getattr__ is ~10x slower, and this runs per decode call
            for p in (d["lora_A"], d["lora_B"]):
                params.append(p)
                key += (id(p), p._version, p.data_ptr())
            key.append(m.scaling)
        if self.A is not None and key == self._key:
            return
        twins = [m._twin for m in self.members]
        with torch.no_grad():
            A = [torch.cat([m.lora_A for m in side]).t() for side in (self.members, twins)]  # 2 x [in, G*r]
            self.A = torch.stack(A).contiguous()
            self.B = tuple(torch.stack([(m.lora_B * m.scaling).t(), (t.lora_B * t.scaling).t()]).contiguous()
                           for m, t in zip(self.members, twins, strict=True))
        self._held, self._key = params, key


class SharedLoRALinear(nn.Module):
    """A (shared, frozen) `nn.Linear` plus one rank-r LoRA adapter.

    x `[..., in]` -> `base(x) + lora_B(lora_A(dropout(x))) * alpha / r` `[..., out]` (peft's LoRA formula). In a
    batched shared step (`ctx.split = B`) rows [:B] of x use this adapter and rows [B:] the twin's (the other
    half's adapter of the same base layer)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, ctx: _StepContext) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default init: the adapter starts at 0
        self.scaling = float(alpha) / r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        object.__setattr__(self, "_ctx", ctx)  # plain attributes: not submodules
        object.__setattr__(self, "_twin", None)
        object.__setattr__(self, "_group", _LeanGroup([self]))  # `_group_into` joins it to its same-input siblings
        object.__setattr__(self, "_slot", 0)  # its index in the group
        object.__setattr__(self, "_zero_key", None)  # (id, version, data_ptr) of lora_B when `_zero` was computed
        object.__setattr__(self, "_zero", False)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `linear.weight` (dtype/device probes) keeps working
        return self.base.weight

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution `[..., out]` for x `[..., in]`."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def adds_nothing(self) -> bool:
        """True when this adapter's B is all zero and no gradient is wanted, so it adds exactly 0 and its two matmuls
        can be skipped (the untrained half of a shipped pair; measured in docs/results.md, "Measurements behind
        design choices"). Rechecked only when B changes (its version counter)."""
        b = self._parameters["lora_B"]
        if torch.is_grad_enabled() and b.requires_grad:
            return False
        key = (id(b), b._version, b.data_ptr())
        if key != self._zero_key:
            object.__setattr__(self, "_zero", not bool(b.any()))
            object.__setattr__(self, "_zero_key", key)
        return self._zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = self._ctx.split
        if B is not None and x.shape[0] == 2 * B and not torch.is_grad_enabled() and not self._dropout_on():
            return self._batched(x)
        y = self.base(x)
        if B is None:
            return y if self.adds_nothing() else y + self.delta(x)
        return y + torch.cat([self.delta(x[:B]), self._twin.delta(x[B:])])

    def _dropout_on(self) -> bool:
        return isinstance(self.dropout, nn.Dropout) and self.dropout.p > 0 and (self.training or self._twin.training)

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        """The batched step without autograd, x `[2B, T, in]` -> `[2B, T, out]`: rows [:B] this adapter, rows [B:]
        the twin's. The group's first member to see x computes `x @ A^T` for the whole group (one bmm, kept in the
        step's stash for its siblings, which pass the very same tensor); each member adds its slice times its
        stacked, scaled B into the base's output (one baddbmm_)."""
        ctx, grp = self._ctx, self._group
        one = x.dim() == 3 and x.shape[0] == 2  # B = 1: x is [2, T, in] already, no view needed either side
        hit = ctx.stash.get(grp)
        if hit is None or hit[0] is not x:
            if grp.A is None:
                grp.refresh()
            z = torch.bmm(x if one else x.reshape(2, -1, x.shape[-1]), grp.A)  # [2, B*T, G*r]
            hit = ctx.stash[grp] = (x, z.split(grp.r, -1) if len(grp.members) > 1 else (z,))
        base = self._modules["base"]
        y = F.linear(x, base.weight, base.bias)  # [2B, T, out], contiguous
        (y if one else y.view(2, -1, y.shape[-1])).baddbmm_(hit[1][self._slot], grp.B[self._slot])
        return y


@dataclass
class SharedBaseSpec:
    """The adapters' shape, saved in the FlyThinker config as `shared_base` (a dict)."""

    r: int = 8
    lora_alpha: float = 16
    target_modules: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "lora_alpha": self.lora_alpha, "target_modules": list(self.target_modules),
                "lora_dropout": self.lora_dropout}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SharedBaseSpec:
        unknown = set(d) - {"r", "lora_alpha", "target_modules", "lora_dropout"}
        if unknown:
            raise ValueError(f"shared_base config has unknown keys {sorted(unknown)}")
        return cls(int(d.get("r", 8)), float(d.get("lora_alpha", 16)), tuple(d.get("target_modules", LORA_TARGETS)),
                   float(d.get("lora_dropout", 0.0)))


# ---------------------------------------------------------------------------------------------- building the halves
def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
             and ".layers." in f".{n}"]
    if not names:
        leaf = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no LoRA target {list(targets)} found in the base's decoder layers; its linear layers "
                         f"are {leaf}")
    return names


def _wrap(model: nn.Module, names: list[str], spec: SharedBaseSpec, ctx: _StepContext) -> list[SharedLoRALinear]:
    out = []
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = SharedLoRALinear(getattr(parent, leaf), spec.r, spec.lora_alpha, spec.lora_dropout, ctx)
        setattr(parent, leaf, lora)
        out.append(lora)
    _group_into(dict(zip(names, out, strict=True)))
    ctx.groups += dict.fromkeys(m._group for m in out)
    return out


def _group_into(loras: dict[str, SharedLoRALinear]) -> None:
    """Join the adapters of one parent module that read one input (`_SAME_INPUT`: q/k/v, gate/up) into one
    `_LeanGroup`; the rest stay alone. Members must share in_features (they read one tensor)."""
    for same in _SAME_INPUT:
        by_parent: dict[str, list[SharedLoRALinear]] = {}
        for name, m in loras.items():
            parent, _, leaf = name.rpartition(".")
            if leaf in same:
                by_parent.setdefault(parent, []).append(m)
        for members in by_parent.values():
            if len(members) > 1 and len({m.lora_A.shape[1] for m in members}) == 1:
                grp = _LeanGroup(members)
                for i, m in enumerate(members):
                    object.__setattr__(m, "_group", grp)
                    object.__setattr__(m, "_slot", i)


def build_halves(base: PreTrainedModel, spec: SharedBaseSpec) -> tuple[PreTrainedModel, PreTrainedModel]:
    """(generator, reasoner) over one copy of `base`'s weights, each with its own fresh LoRA adapter (A random,
    B zero: both start as the base). `base` itself becomes the generator (modified in place)."""
    for p in base.parameters():
        p.requires_grad_(False)
    rsn = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})  # same parameter objects, own modules
    ctx = _StepContext()
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


def adapters(half: nn.Module) -> dict[str, SharedLoRALinear]:
    """A half's adapters by module path."""
    return {n: m for n, m in half.named_modules() if isinstance(m, SharedLoRALinear)}


# ---------------------------------------------------------------------------------------------- peft interop
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
    found = _lora_layers(tree)
    if not found:
        raise ValueError("the peft model holds no LoRA layers")
    return found


def peft_lora_layers(tree: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`(module path, layer)` of every peft `LoraLayer` in `tree`."""
    from peft.tuners.lora import LoraLayer

    for n, m in tree.named_modules():
        if isinstance(m, LoraLayer):
            yield n, m


def _lora_layers(tree: nn.Module) -> _Weights:
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


# ---------------------------------------------------------------------------------------------- detection
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


def _unwrap_lora(model: nn.Module) -> None:
    """Replace every peft LoraLayer in `model` by its base layer (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, m.get_base_layer())


def share_pair(pair: nn.Module) -> nn.Module | None:
    """The shared-base equivalent of a two-copy FlyThinker pair whose halves are one base (`same_base`), plain or
    with peft LoRA adapters of one rank on either half (flythinker.training.trainable.apply_lora): the base held
    once, both adapters carried over, the same fusion config. Returns None when the halves differ (or the adapters
    do not fit: different ranks, DoRA). The input pair is consumed (its generator becomes the shared base)."""
    if is_shared_base(pair) or not same_base(pair.generator, pair.reasoner):
        return None
    try:
        weights = {h: _lora_layers(getattr(pair, h)) for h in ("generator", "reasoner")}
    except ValueError:
        return None
    ranks = {a.shape[0] for w in weights.values() for a, _, _ in w.values()}
    if len(ranks) > 1:
        return None
    targets = sorted({n.rsplit(".", 1)[-1] for w in weights.values() for n in w})
    fusion = {k: getattr(pair.config, k) for k in FUSION_FIELDS}
    fusion_state = {k: v.clone() for k, v in pair.fusion_state_dict().items()}  # a trained projection, statistics
    base = pair.generator
    _unwrap_lora(base)
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


def fold_lora(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
    """Merge one LoRA adapter into its weight in place: `W += scaling * B @ A`, the product in fp32, cast to W's
    dtype. The merge of flythinker's own layouts (shared-base halves, shipped deltas); a peft model merges with
    peft's `merge_and_unload` (`flythinker.training.merge_lora`).

    Args:
        weight: `[out, in]` the linear's weight (modified).
        lora_A: `[r, in]`; lora_B: `[out, r]`.
        scaling: lora_alpha / r.
    """
    with torch.no_grad():
        weight += (scaling * (lora_B.float() @ lora_A.float())).to(weight.dtype)


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


# ---------------------------------------------------------------------------------------------- the batched step
class SharedStep:
    """One decode step of a shared-base pair as ONE forward of 2B rows through the shared base.

    Built from the two halves' prefilled static caches (`flythinker.decode.prefill`): the combined static cache
    `[2B, heads, L + N, d]` holds the generator's prompt (rows :B) and the reasoner's (rows B:), each
    right-aligned at slot L = max(P, Q) with its own mask; step s writes slot L + s of every row. The adapters'
    stacked weights are checked (and rebuilt if changed) when the step is built: a change of the adapters in the
    middle of one decode call is not seen by that call."""

    def __init__(self, model: nn.Module, gen_cache, rsn_cache, gen_mask: torch.Tensor, rsn_mask: torch.Tensor,
                 P: int, Q: int, n: int) -> None:
        self.model = model
        self.decoder = model.generator.get_decoder()
        lora = next(iter(adapters(model.generator).values()), None)
        self.ctx = lora._ctx if lora is not None else _StepContext()  # r = 0: no adapters to route
        self.B = B = gen_mask.shape[0]
        self.L = L = max(P, Q)
        self.cache = StaticCache(config=model.config.generator, max_cache_len=L + n)
        for layer, g, r in zip(self.cache.layers, gen_cache.layers, rsn_cache.layers, strict=True):
            k = g.keys.new_zeros(2 * B, g.keys.shape[1], 1, g.keys.shape[3])
            v = g.values.new_zeros(2 * B, g.values.shape[1], 1, g.values.shape[3])
            layer.lazy_initialization(k, v)
            layer.keys[:B, :, L - P:L] = g.keys[:, :, :P]
            layer.values[:B, :, L - P:L] = g.values[:, :, :P]
            layer.keys[B:, :, L - Q:L] = r.keys[:, :, :Q]
            layer.values[B:, :, L - Q:L] = r.values[:, :, :Q]
            layer.cumulative_length.fill_(L)
        self.mask = torch.zeros(2 * B, L + n, dtype=gen_mask.dtype, device=gen_mask.device)  # [2B, L + n]
        self.mask[:B, L - P:L] = gen_mask[:, :P]
        self.mask[B:, L - Q:L] = rsn_mask[:, :Q]
        self.ctx.refresh()  # the adapters' stacked weights, checked once per decode call

    def __call__(self, gen_embeds: torch.Tensor, tok: torch.Tensor, gen_pos: torch.Tensor, rsn_pos: torch.Tensor,
                 s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step s: generator embeddings `[B, 1, H]` (fused), the token `tok [B, 1]`, positions `[B, 1]` ->
        (next logits `[B, V]`, the reasoner's new latent `[B, H]`)."""
        B = self.B
        x = torch.cat([gen_embeds, self.model.reasoner.get_input_embeddings()(tok).to(gen_embeds.dtype)])
        self.mask[:, self.L + s] = 1
        with self.ctx.batched(B, refresh=False):  # refreshed once, in __init__
            hidden = self.decoder(inputs_embeds=x, attention_mask=self.mask, position_ids=torch.cat([gen_pos, rsn_pos]),
                                  cache=self.cache, use_cache=True).last_hidden_state  # [2B, 1, H]
        return self.model.logits_from_hidden(hidden[:B], 1)[:, -1].float(), hidden[B:, -1]


__all__ = ["LORA_TARGETS", "SharedBaseSpec", "SharedLoRALinear", "SharedStep", "adapters", "build_halves",
           "fold_lora", "from_shared_base", "is_shared_base", "load_peft_adapter", "parameter_bytes",
           "peft_lora_layers", "retie", "same_base", "share_pair", "to_peft", "unshare_pair"]
