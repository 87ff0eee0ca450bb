"""Shared-base pairs (docs/design.md, "Shared base"): one base model, a generator LoRA adapter and a reasoner
LoRA adapter, the base weights held once.

- `lora_layer`: the LoRA layer (`SharedLoRALinear`), its lean batched step, the adapters' shape (`SharedBaseSpec`)
  and the one LoRA merge of flythinker's own layouts (`fold_lora`).
- `peft_io`: reading peft adapters into a half, writing a half out as a peft model.
- `layout`: building shared-base pairs and converting between the shared-base and the two-copy layout.
- `decode_step`: the batched decode step of both halves through the shared base (`SharedStep`).
"""

from flythinker.options import LORA_TARGETS
from flythinker.shared_base.decode_step import SharedStep
from flythinker.shared_base.layout import (
    build_halves,
    from_shared_base,
    is_shared_base,
    parameter_bytes,
    retie,
    same_base,
    share_pair,
    unshare_pair,
)
from flythinker.shared_base.lora_layer import SharedBaseSpec, SharedLoRALinear, adapters, fold_lora
from flythinker.shared_base.peft_io import load_peft_adapter, peft_lora_layers, to_peft

__all__ = ["LORA_TARGETS", "SharedBaseSpec", "SharedLoRALinear", "SharedStep", "adapters", "build_halves",
           "fold_lora", "from_shared_base", "is_shared_base", "load_peft_adapter", "parameter_bytes",
           "peft_lora_layers", "retie", "same_base", "share_pair", "to_peft", "unshare_pair"]
