"""A reasoner smaller than the generator, made offline from the generator itself.

The paper pairs a 1.5B reasoner with a 7B generator. With one checkpoint at hand, the natural small reasoner is a
layer-truncated copy: the generator's first k decoder layers and its final norm (the latent is the output of the
last normalisation layer, docs/design.md, so the final norm stays). It shares the vocabulary and the hidden size, so
`projection="pad"` works, and it is an ordinary HF causal LM (LoRA-trainable with peft like any model; its LM head
never runs in a pair). Per decode step it streams k/L of the weights of a layer stack.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import PreTrainedModel


def truncated_reasoner(model: PreTrainedModel, k: int, *, share_weights: bool = False) -> PreTrainedModel:
    """A causal LM made of `model`'s embeddings, its first `k` decoder layers and its final norm (and LM head).

    Args:
        model: a decoder-only HF causal LM whose decoder keeps its layers in `.layers` (Llama, Qwen2, Mistral,
            Gemma, ...).
        k: layers to keep, 1 <= k <= num_hidden_layers.
        share_weights: reuse `model`'s parameter objects (no copy; training the result then trains `model` too),
            else an independent copy (the default: train it with its own LoRA).

    Returns:
        A model in the same mode with `config.num_hidden_layers = k` (and `layer_types` cut to match).
    """
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}'s decoder has no `.layers` ModuleList to truncate")
    n = len(layers)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the model has {n} layers), got {k!r}")
    # copy everything except the dropped layers (memo maps them to None: never copied); shared weights: memo
    # maps every parameter to itself
    memo: dict[int, object] = {id(layer): None for layer in layers[k:]}
    if share_weights:
        memo.update({id(p): p for p in model.parameters()})
    out = copy.deepcopy(model, memo)
    out_decoder = out.get_decoder()
    out_decoder.layers = nn.ModuleList(list(out_decoder.layers)[:k])
    for cfg in {id(c): c for c in (out.config, out_decoder.config)}.values():
        cfg.num_hidden_layers = k
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = list(cfg.layer_types)[:k]
    return out


__all__ = ["truncated_reasoner"]
