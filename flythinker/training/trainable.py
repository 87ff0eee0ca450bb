"""What trains: part selection, peft LoRA on either model, gradient checkpointing on both, mixed precision.

Parts of a `FlyThinkerForCausalLM` (any module with `.generator` and `.reasoner` works):
``"generator"`` (parameters under ``generator.``), ``"reasoner"`` (under ``reasoner.``) and ``"projection"``
(everything else: the learned ``"linear"`` projection; ``"pad"`` has no parameters). ``"both"`` (the paper's
setting, default) trains all three. A frozen part has ``requires_grad=False``, so autograd gives it no gradient
and HF Trainer/`torch.optim` built over ``requires_grad`` parameters give it no optimizer state; a frozen reasoner
also builds no autograd graph at all (its inputs are token ids).

LoRA is injected *in place* with ``peft.get_peft_model(model.generator, ...)``: ``model.generator`` stays the same
HF model object (its q/k/v/o projections become ``lora.Linear``), so the FlyThinker forward is unchanged. The peft
wrappers live in ``model._flythinker_lora`` (a plain dict, not registered as submodules). Save with
:func:`merged_state_dict` / :func:`save_merged` (a plain checkpoint, LoRA folded in, that ``from_pretrained``
loads) or :func:`save_lora_adapters` (adapter weights only, safetensors).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

PARTS = ("generator", "reasoner", "projection")
ALIASES = {"both": PARTS, "all": PARTS}
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_LORA_ATTR = "_flythinker_lora"


def parse_parts(train: str | Iterable[str]) -> frozenset[str]:
    """``"both"`` / ``"generator"`` / ``"reasoner,projection"`` / ``{"generator", "projection"}`` -> a set of parts."""
    items = train.replace("+", ",").split(",") if isinstance(train, str) else list(train)
    out: set[str] = set()
    for item in items:
        key = str(item).strip().lower()
        if key in ALIASES:
            out.update(ALIASES[key])
        elif key in PARTS:
            out.add(key)
        else:
            raise ValueError(f"unknown trainable part {item!r}: expected 'both' or a combination of {list(PARTS)}")
    if not out:
        raise ValueError("nothing selected to train")
    return frozenset(out)


def part_of(param_name: str) -> str:
    """The part a parameter belongs to, from its qualified name in the FlyThinker model (`model.generator.*`,
    or the checkpoint's `generator.*`)."""
    param_name = param_name.removeprefix("model.")
    for part in ("generator", "reasoner"):
        if param_name.startswith(part + "."):
            return part
    return "projection"


def lora_parts(model: nn.Module) -> tuple[str, ...]:
    """The parts that carry LoRA adapters (via :func:`apply_lora`)."""
    return tuple(getattr(model, _LORA_ATTR, {}))


def set_trainable(model: nn.Module, train: str | Iterable[str] = "both") -> dict[str, int]:
    """Freeze everything outside `train`; inside a LoRA'd part only the adapters train.

    Returns the number of trainable parameters per part (raises ValueError if the selection trains nothing).
    """
    parts = parse_parts(train)
    adapted = set(lora_parts(model))
    counts = dict.fromkeys(PARTS, 0)
    never_used = set()
    reasoner = getattr(model, "reasoner", None)
    if reasoner is not None and reasoner.get_output_embeddings() is not None:
        # Only the reasoner's base model runs (its latents are the input of its LM head), so an *untied*
        # reasoner LM head can never get a gradient: training it would only waste optimizer state, and DDP
        # without find_unused_parameters would fail on it.
        head = reasoner.get_output_embeddings().weight
        if head is not reasoner.get_input_embeddings().weight:
            never_used.add(id(head))
    for name, p in model.named_parameters():
        part = part_of(name)
        on = part in parts and (part not in adapted or "lora_" in name) and id(p) not in never_used
        p.requires_grad_(on)
        if on:
            counts[part] += p.numel()
    if not any(counts.values()):
        raise ValueError(f"selection {sorted(parts)} has no parameters to train (e.g. projection='pad' has none)")
    return counts


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that require grad (what an optimizer should get)."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters that require grad: what a fine-tune changes, e.g. to cache it
    (``safetensors.torch.save_file``). The tensors are detached views of the parameters (no copy: ``.clone()``
    them to keep a snapshot). Load it back with ``model.load_state_dict(state, strict=False)``."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


# ---- LoRA --------------------------------------------------------------------------------------------------
def apply_lora(
    model: nn.Module,
    parts: str | Iterable[str] = ("generator", "reasoner"),
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Iterable[str] | None = None,
    layers: Iterable[int] | None = None,
) -> dict:
    """Inject peft LoRA adapters (in place) into `model.generator` and/or `model.reasoner`.

    target_modules default: the Llama-style attention projections ``q_proj, k_proj, v_proj, o_proj``.
    layers: indices of the decoder layers that get adapters (peft ``layers_to_transform``; default: all). Call
    once per part to give the two models different layers (the demo adapts only the reasoner's top layers).
    Returns ``{part: PeftModel}``. Afterwards call :func:`set_trainable` (LoRA'd parts train adapters only).
    """
    from peft import LoraConfig, get_peft_model

    selected = parse_parts(parts) - {"projection"}
    if not selected:
        raise ValueError("LoRA applies to 'generator' and/or 'reasoner'")
    targets = list(target_modules or LLAMA_ATTENTION)
    wrappers = dict(getattr(model, _LORA_ATTR, {}))
    for part in sorted(selected):
        if part in wrappers:
            raise ValueError(f"LoRA is already applied to the {part}")
        sub = getattr(model, part)
        leaf_names = {n.rsplit(".", 1)[-1] for n, m in sub.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in targets if t not in leaf_names]
        if missing:
            raise ValueError(f"LoRA target modules {missing} not found in the {part}; its linear layers are "
                             f"{sorted(leaf_names)}")
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                            layers_to_transform=None if layers is None else list(layers))
        wrapper = get_peft_model(sub, config)
        # get_peft_model injected the adapters into `sub` itself; the wrapper must not replace model.<part>
        # (state-dict keys and the generator's `.model` attribute would change under the FlyThinker forward).
        assert wrapper.base_model.model is sub
        wrappers[part] = wrapper
    setattr(model, _LORA_ATTR, wrappers)  # a dict: nn.Module does not register it as a submodule
    return wrappers


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every LoRA adapter folded into its base weight and the peft key names undone.

    The model itself is not modified (no merge/unmerge round trip, so no rounding drift on the base weights).
    """
    sd = model.state_dict()
    if not lora_parts(model):
        return sd
    merged: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key:
            continue
        merged[key.replace(".base_layer.", ".")] = value
    from flythinker.shared_base import peft_lora_layers

    for name, layer in peft_lora_layers(model):
        base = layer.get_base_layer().weight
        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
        merged[f"{name}.weight"] = (base + delta).detach().to(base.dtype)
    return merged


def save_merged(model: nn.Module, path: str | os.PathLike, tokenizer=None, **kwargs) -> Path:
    """`model.save_pretrained(path)` (safetensors) with LoRA folded in; also saves `tokenizer` if given."""
    path = Path(path)
    if lora_parts(model):
        kwargs.setdefault("state_dict", merged_state_dict(model))
    model.save_pretrained(path, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def save_lora_adapters(model: nn.Module, path: str | os.PathLike) -> list[Path]:
    """Adapters only: `path/<part>/adapter_model.safetensors` + `adapter_config.json` for each LoRA'd part."""
    out = []
    for part, wrapper in getattr(model, _LORA_ATTR, {}).items():
        folder = Path(path) / part
        wrapper.save_pretrained(folder, safe_serialization=True)
        out.append(folder)
    return out


def load_lora_adapters(model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False) -> dict:
    """Inject adapters saved by :func:`save_lora_adapters` into `model` (in place); returns `{part: PeftModel}`."""
    from peft import PeftModel

    root = Path(path)
    folders = {p: root / p for p in ("generator", "reasoner") if (root / p / "adapter_config.json").is_file()}
    if not folders:
        raise ValueError(f"no LoRA adapters (generator/ or reasoner/ with adapter_config.json) under {path}")
    for folder in folders.values():
        if not (folder / "adapter_model.safetensors").is_file():  # peft would fall back to an unpickled .bin
            raise ValueError(f"no adapter_model.safetensors in {folder} (flythinker loads safetensors only)")
    wrappers = dict(getattr(model, _LORA_ATTR, {}))
    for part, folder in folders.items():
        sub = getattr(model, part)
        wrappers[part] = PeftModel.from_pretrained(sub, folder, is_trainable=is_trainable)
    setattr(model, _LORA_ATTR, wrappers)
    return wrappers


def merge_lora(model: nn.Module) -> None:
    """Fold the adapters into the base weights in place and remove the LoRA layers (then save as usual)."""
    for wrapper in getattr(model, _LORA_ATTR, {}).values():
        wrapper.merge_and_unload()
    setattr(model, _LORA_ATTR, {})


# ---- gradient checkpointing and precision ------------------------------------------------------------------
def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing on every decoder layer of *both* models (non-reentrant: frozen embeddings and
    LoRA need no `enable_input_require_grads` hook, and the reasoner's latents keep their graph).

    `FlyThinkerForCausalLM.gradient_checkpointing_enable()` (what `TrainingArguments(gradient_checkpointing=True)`
    calls) reaches both models too: HF walks `self.modules()`, which include both models' decoder layers.
    The FlyThinker forward runs without a KV cache in training mode, so nothing else needs switching off."""
    for part in ("generator", "reasoner"):
        sub = getattr(model, part)
        enable = getattr(sub, "activation_checkpointing_enable", None) or sub.gradient_checkpointing_enable
        kwargs = {"use_reentrant": False}
        if enable.__name__ == "activation_checkpointing_enable":
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            enable(gradient_checkpointing_kwargs=kwargs)


def resolve_precision(precision: str = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """``"auto" | "fp32" | "bf16" | "fp16"`` -> the autocast dtype for `device` (fp32 means no autocast).

    auto: bf16 on CUDA devices that support it, else fp16 on CUDA, and **fp32 on CPU**: CPU autocast exists in
    torch but bf16 matmuls on CPUs without AMX are slower than fp32 and change the numerics, so CPU training stays
    fp32 unless bf16 is asked for explicitly. fp16 on CPU is refused (no CPU fp16 autocast for most ops).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in table:
        raise ValueError(f"precision must be one of {['auto', *table]}, got {precision!r}")
    if precision == "fp16" and dev.type == "cpu":
        raise ValueError("fp16 autocast is not supported on CPU; use bf16 or fp32")
    return table[precision]


def autocast(precision: str = "auto", device: torch.device | str | None = None):
    """A `torch.autocast` context for `precision` on `device` (a no-op context for fp32)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision(precision, dev)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)
