"""The shared-base LoRA layer: a (shared, frozen) `nn.Linear` plus one rank-r adapter per half, and its lean
batched step.

In a batched decode step (`flythinker.shared_base.decode_step.SharedStep`) the generator's row(s) and the
reasoner's row(s) run as ONE forward of 2B rows through the generator's decoder: rows [:B] take the generator's
adapter, rows [B:] the reasoner's (the twin module's), so the base weights stream once per token, which is what a
batch-1 decode step is bound by. In that step (no autograd) each adapted linear runs lean: the base's one linear
over all 2B rows plus ONE `baddbmm_` of the two halves' scaled B matrices (stacked `[2, r, out]`) into its output,
reading `x @ A^T` from ONE `bmm` per group of sibling linears that read one input tensor (q/k/v, gate/up), against
the halves' A matrices stacked `[2, in, G*r]`; the stacked weights are cached per group and rebuilt when an adapter
parameter is replaced or changed in place (`_LeanGroup`; checked once per decode call, when its `SharedStep` is
built). Training and every other path keep peft's formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flythinker.options import LORA_TARGETS

# sibling linears of one layer that read one input tensor (HF's Llama-family attention and MLP): one A-matmul each
_SAME_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class StepContext:
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

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, ctx: StepContext) -> None:
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
        object.__setattr__(self, "_group", _LeanGroup([self]))  # joined to its same-input siblings later
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


def group_same_input(loras: dict[str, SharedLoRALinear]) -> None:
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


def adapters(half: nn.Module) -> dict[str, SharedLoRALinear]:
    """A half's adapters by module path."""
    return {n: m for n, m in half.named_modules() if isinstance(m, SharedLoRALinear)}


def fold_lora(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
    """Merge one LoRA adapter into its weight in place: `W += scaling * B @ A`, the product in fp32, cast to W's
    dtype. The one merge of flythinker's own layouts (shared-base halves, shipped deltas): their adapters are not
    peft layers, so peft's merge cannot take them, and peft computes `B @ A` in the weight's dtype (bf16 on GPU)
    where this product is fp32. A peft model merges with peft (`flythinker.training.merge_lora`).

    Args:
        weight: `[out, in]` the linear's weight (modified).
        lora_A: `[r, in]`; lora_B: `[out, r]`.
        scaling: lora_alpha / r.
    """
    with torch.no_grad():
        weight += (scaling * (lora_B.float() @ lora_A.float())).to(weight.dtype)


__all__ = ["SharedBaseSpec", "SharedLoRALinear", "StepContext", "adapters", "fold_lora", "group_same_input"]
