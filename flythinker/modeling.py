"""FlyThinker as a transformers composite model (the shape of LLaVA's LlavaModel / LlavaForConditionalGeneration):

- `FlyThinkerModel`: the fused pair up to the generator's final hidden state (`last_hidden_state` with the
  reasoner's latents fused in): what `base_model` / `get_decoder()` return, and what tools that take hidden
  states from the base model (TRL's fused LM head) read;
- `FlyThinkerForCausalLM`: a drop-in HF causal LM, `.model` plus the generator's LM head, the loss and `generate`.

Per step (docs/design.md): the reasoner's base model turns tokens into latents h [B, T, H_r] (its LM head never runs),
`latent_fuse` adds h_{t-1} to the generator's embedding of x_t, and the generator's base model + LM head produce the
logits. Thanks to the one-position lag, a one-token decode step needs only the *pending* latent from the previous
step, so the generator and the reasoner of that step are independent and can run concurrently (config.parallel,
flythinker.workers); the sequential path is the default and the oracle.

`FlyThinkerModel.forward` normalises its inputs (`StepInputs`), then takes one of three paths, each returning the
generator's output and the latents to append to the cache:
- `_split_prefill`: split context on an empty cache (the reasoner reads its own prompt);
- `_decode_step`: one new token per row on a filled cache (the two halves run side by side);
- `_shared_forward`: everything else (both models read the same tokens: shared-context prefill / training, or a
  multi-token chunk on a filled cache).
The overlapped prefill schedules (a building block of the forward) live in flythinker.prefill. Layers above the model
plug in through registries: the lean static-cache loop (flythinker.decode registers it as generate's fast path) and
the factories of named pairs (flythinker.pretrained.loading registers the shipped pairs' one for from_pretrained).
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PreTrainedModel,
    StaticCache,
)
from transformers.cache_utils import Cache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from flythinker.alignment import (
    last_real_index,
    positions_from_mask,
    response_start,
    response_targets,
    shared_source_mask,
    split_alignment,
    split_latents,
)
from flythinker.cache import FlyThinkerCache
from flythinker.configuration import IGNORE_INDEX, LOSS_IMPLS, PARALLEL_MODES, FlyThinkerConfig, fusion_kwargs_check
from flythinker.kernels import latent_fuse, linear_cross_entropy, vocab_mean_norm
from flythinker.kernels.linear_cross_entropy_naive import loss_denominator
from flythinker.latent_norm import BUFFERS as LATENT_NORM_BUFFERS
from flythinker.latent_norm import standardize_latent
from flythinker.options import LEARNED_PROJECTIONS
from flythinker.prefill import StepInputs, shared_prefill, split_prefill
from flythinker.workers import InlineWorker, ReasonerWorker, StreamWorker, worker_for


class FlyThinkerPreTrainedModel(PreTrainedModel):
    """What `FlyThinkerModel` and `FlyThinkerForCausalLM` share: the config class, the attention/compile flags,
    the fusion projection's initialisation and the reasoner head's freezing after weight tying."""

    config_class = FlyThinkerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _no_split_modules: list[str] = []

    def _init_weights(self, module: nn.Module) -> None:
        if module is not None and module is getattr(self, "latent_proj", None):
            with torch.no_grad():
                module.weight.zero_()
                if self.config.projection == "zero":
                    return
                n = min(module.weight.shape)
                module.weight[:n, :n] = torch.eye(n, dtype=module.weight.dtype, device=module.weight.device)
        else:
            super()._init_weights(module)


    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """transformers' tying, then the reasoner's unused head frozen again: loading (which ends here) builds
        new Parameters, trainable by default."""
        super().tie_weights(*args, **kwargs)
        self._freeze_reasoner_head()


class FlyThinkerModel(FlyThinkerPreTrainedModel):
    """The fused pair up to the generator's final hidden state: `.generator` and `.reasoner` are full HF causal LMs
    (save/load/peft work on them), but only their base models run here; `forward` returns the generator's last
    hidden state `[B, T, H_g]` computed from the fused embeddings (no LM head). `FlyThinkerForCausalLM` adds the
    generator's LM head and the loss."""

    def __init__(self, config: FlyThinkerConfig, generator: PreTrainedModel | None = None,
                 reasoner: PreTrainedModel | None = None):
        super().__init__(config)
        config.check_fusion()
        if generator is None and reasoner is None and getattr(config, "shared_base", None) is not None:
            # a saved shared-base pair (flythinker.shared_base): one base, two adapters
            from flythinker.shared_base import SharedBaseSpec, build_halves

            generator, reasoner = build_halves(AutoModelForCausalLM.from_config(config.generator),
                                               SharedBaseSpec.from_dict(config.shared_base))
        self.generator = generator if generator is not None else AutoModelForCausalLM.from_config(config.generator)
        self.reasoner = reasoner if reasoner is not None else AutoModelForCausalLM.from_config(config.reasoner)
        emb = self.generator.get_input_embeddings()
        if not isinstance(getattr(emb, "weight", None), torch.Tensor) or emb.weight.dim() != 2:
            raise TypeError(f"the generator's input embeddings must be an embedding table, got {type(emb).__name__}")
        H_g, H_r = config.generator.hidden_size, config.reasoner.hidden_size
        # "linear": a learned [H_g, H_r] map, initialised to the "pad" map (so both start from the same fusion);
        # "zero": the same map initialised to zero, so that the untrained pair is exactly its generator.
        self.latent_proj = nn.Linear(H_r, H_g, bias=False) if config.projection in LEARNED_PROJECTIONS else None
        if config.latent_norm == "standardize":  # identity until flythinker.latent_norm.calibrate_latent_norm
            self.register_buffer("latent_mean", torch.zeros(H_r))
            self.register_buffer("latent_inv_std", torch.ones(H_r))
        self._latent_capture = None  # calibrate_latent_norm's hook into fuse
        self._vocab_mean: tuple[nn.Parameter, int, torch.Tensor] | None = None  # (weight, version, c): _norm_target
        self.reasoner_prefix_cache = None  # enable_reasoner_prefix_cache
        self.reasoner_prompt_reuse = None  # flythinker.reasoner_prefix_cache.reusing_prompts
        self.post_init()
        self._freeze_reasoner_head()

    def get_input_embeddings(self) -> nn.Module:
        return self.generator.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.generator.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.generator.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.generator.set_output_embeddings(value)

    def get_decoder(self) -> FlyThinkerModel:
        """This fused stack itself: its outputs are the generator's hidden states with the latents fused (the
        generator's own decoder, `self.generator.get_decoder()`, would give unfused ones)."""
        return self

    @property
    def vocab_size(self) -> int:
        """The shared vocabulary's size (rows of the generator's input embedding)."""
        return self.generator.get_input_embeddings().weight.shape[0]

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the shared vocabulary: both models' embeddings and LM heads (and both sub-configs' vocab_size),
        so new token ids reach the reasoner too and a saved pair still passes the pair check. Returns the
        generator's new input embedding."""
        shared = self.reasoner.get_input_embeddings().weight is self.generator.get_input_embeddings().weight
        emb = self.generator.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        if shared:  # a shared-base pair: the reasoner's base parameters are the generator's
            from flythinker.shared_base import retie

            retie(self)
        else:
            self.reasoner.resize_token_embeddings(emb.weight.shape[0], None, mean_resizing)
        for part, cfg in ((self.generator, self.config.generator), (self.reasoner, self.config.reasoner)):
            cfg.vocab_size = part.config.vocab_size = emb.weight.shape[0]
        self._vocab_mean = None
        self._freeze_reasoner_head()
        return emb

    def _freeze_reasoner_head(self) -> None:
        """The reasoner's LM head never runs (only its base model does): as a trainable parameter it would never get
        a gradient (plain DDP, transformers' gradient checks). Frozen, unless it is a parameter that does run (tied
        to the reasoner's input embedding, or shared with the generator)."""
        head = self.reasoner.get_output_embeddings()
        if head is None:
            return
        running = {id(p) for p in self.generator.parameters()}
        running |= {id(p) for p in self.reasoner.get_decoder().parameters()}
        for p in head.parameters():
            if id(p) not in running:
                p.requires_grad_(False)


    # ------------------------------------------------------------------ devices and workers
    @property
    def generator_device(self) -> torch.device:
        return self.generator.get_input_embeddings().weight.device

    @property
    def reasoner_device(self) -> torch.device:
        return self.reasoner.get_input_embeddings().weight.device

    def reasoner_worker(self, parallel: str | None = None) -> ReasonerWorker:
        """This thread's worker for `parallel` (None: config.parallel): "off" runs the two halves one after the
        other; "threads" (CPU) the reasoner on a persistent worker thread, one core each; "streams" (CUDA) the
        reasoner on side streams (also when it lives on another device). See flythinker.workers."""
        return worker_for(self, check_parallel_mode(parallel) or self.config.parallel, self.generator_device,
                          self.reasoner_device, decide_auto=_measured_parallel_mode)

    # ------------------------------------------------------------------ the building blocks of a step
    def reasoner_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         position_ids: torch.Tensor | None, cache: FlyThinkerCache | None,
                         use_cache: bool) -> torch.Tensor:
        """Reasoner base model only (no LM head) on `input_ids [B, T]`: latents `[B, T, H_r]` on the inputs'
        device (the reasoner may live on another one)."""
        dev = self.reasoner_device
        out = self.reasoner.get_decoder()(
            input_ids=input_ids.to(dev), attention_mask=None if attention_mask is None else attention_mask.to(dev),
            position_ids=None if position_ids is None else position_ids.to(dev),
            cache=cache.reasoner if cache is not None else None, use_cache=use_cache)
        return out.last_hidden_state.to(input_ids.device)

    def reasoner_prompt_forward(self, r_ids: torch.Tensor, r_mask: torch.Tensor, r_pos: torch.Tensor,
                                cache: FlyThinkerCache | None, use_cache: bool) -> torch.Tensor:
        """The reasoner on its own prompt `r_ids [B, Q]` (split-context prefill): latents `[B, Q, H_r]`, through
        the reasoner prefix cache when one is enabled and applies (flythinker.reasoner_prefix_cache)."""
        from flythinker import reasoner_prefix_cache as rpc

        if self.reasoner_prompt_reuse is not None:  # a batch's shared prompts, each computed once (PromptReuse)
            h = self.reasoner_prompt_reuse.prompt_forward(self, r_ids, r_mask, r_pos, cache, use_cache)
            if h is not None:
                return h
        if use_cache and rpc.usable(self, r_mask, cache):
            return rpc.cached_reasoner_prefill(self, r_ids, r_mask, r_pos, cache)
        return self.reasoner_forward(r_ids, r_mask, r_pos, cache, use_cache)

    def enable_reasoner_prefix_cache(self, max_bytes: int | None = None, min_reuse: int = 1) -> Any:
        """Cache the reasoner's split-context prefills for returning users (`ReasonerPrefixCache`: exact token
        prefixes, LRU under `max_bytes`, default 512 MiB) and return the cache; `disable_reasoner_prefix_cache()`
        drops it. A later `generate` whose reasoner view starts with a stored one computes only the new tokens
        (batch 1, unpadded reasoner view); the tokens are the same as without the cache."""
        from flythinker.reasoner_prefix_cache import DEFAULT_MAX_BYTES, ReasonerPrefixCache

        self.reasoner_prefix_cache = ReasonerPrefixCache(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes,
                                                         min_reuse)
        return self.reasoner_prefix_cache

    def disable_reasoner_prefix_cache(self) -> None:
        self.reasoner_prefix_cache = None

    def generator_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                          position_ids: torch.Tensor | None, cache: FlyThinkerCache | None, use_cache: bool,
                          **kwargs: Any) -> BaseModelOutputWithPast:
        """Generator base model on (fused) embeddings `[B, T, H_g]`: last_hidden_state `[B, T, H_g]`, ..."""
        return self.generator.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache.generator if cache is not None else None, use_cache=use_cache, **kwargs)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The generator's plain input embeddings `[B, T, H_g]` (positions that receive no latent)."""
        return self.generator.get_input_embeddings()(input_ids)

    def fuse(self, input_ids: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None,
             prev: torch.Tensor | None, check_inputs: bool = True, lam: float | None = None) -> torch.Tensor:
        """Generator input embeddings `[B, T, H_g]`: E[x_t] + lam * (latent of slot t-1, rescaled, projected).
        latent `[B, T, H_r]` (slot t is fused into position t + 1 where `mask [B, T]` allows), prev `[B, H_r]`
        (fused into position 0). `check_inputs=False` skips latent_fuse's value checks (one host sync). `lam`: this
        call's fusion weight (None: config.fusion_lambda)."""
        E = self.generator.get_input_embeddings()
        cfg = self.config
        if self._latent_capture is not None:
            self._latent_capture(latent, mask, prev)
        if cfg.latent_norm == "standardize":
            latent = standardize_latent(latent, self.latent_mean, self.latent_inv_std)
            prev = standardize_latent(prev, self.latent_mean, self.latent_inv_std) if prev is not None else None
        proj = self.latent_proj.weight if self.latent_proj is not None else None
        if check_inputs and proj is not None and not bool(torch.isfinite(proj).all()):
            raise ValueError(f"the latent projection (projection={cfg.projection!r}, latent_proj.weight) holds NaN or "
                             "inf values: every fused embedding would be NaN")
        # while torch.compile/export traces: the PyTorch twin (traceable; the compiler fuses it), not the custom op
        # (its CPU path reads a tensor norm target with float(), a data-dependent host sync export refuses)
        backend = "torch" if torch.compiler.is_compiling() else None
        emb = latent_fuse(input_ids, E.weight, latent, mask, lam=float(cfg.fusion_lambda if lam is None else lam),
                          norm_target=self._norm_target(), projection=proj, prev_latent=prev,
                          eps=float(cfg.latent_eps), detach_norm=cfg.detach_norm, check_inputs=check_inputs,
                          backend=backend)
        scale = getattr(E, "embed_scale", None)
        if scale is not None:
            # Scaled embedding modules (Gemma3): E(x) = scale * W[x]; scale the fused term like the embedding so the
            # latent stays relative to the table. At lam = 0 the difference is exactly 0 and E(x) is reproduced.
            emb = E(input_ids) + (emb - E.weight[input_ids]) * scale
        return emb

    def fusion_state_dict(self) -> dict[str, torch.Tensor]:
        """The fusion's own tensors (the learned projection, the latent statistics), keyed as in `state_dict()`:
        what a pair carries besides its two models (shared-base conversion and shipped pairs copy exactly these)."""
        out = {"latent_proj.weight": self.latent_proj.weight} if self.latent_proj is not None else {}
        out.update({k: getattr(self, k) for k in LATENT_NORM_BUFFERS if hasattr(self, k)})
        return {k: v.detach() for k, v in out.items()}

    def load_fusion_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy `fusion_state_dict()`-style tensors in; a key this pair does not have, or a wrong shape, raises."""
        mine = self.fusion_state_dict()
        for key, value in state.items():
            if key not in mine or tuple(mine[key].shape) != tuple(value.shape):
                have = {k: tuple(v.shape) for k, v in mine.items()}
                raise ValueError(f"fusion tensor {key} {tuple(value.shape)} matches none of this pair's {have} "
                                 f"(projection={self.config.projection!r}, latent_norm={self.config.latent_norm!r})")
            with torch.no_grad():
                mine[key].copy_(value.to(mine[key].dtype))

    def fuse_pending(self, input_ids: torch.Tensor, pending: torch.Tensor, check_inputs: bool = True,
                     lam: float | None = None) -> torch.Tensor:
        """Embeddings `[B, 1, H_g]` of one new token `input_ids [B, 1]` fused with the pending latent `[B, H_r]`."""
        no_slot = pending.new_zeros(pending.shape[0], 1, pending.shape[-1])  # slot 0 would feed position 1: none
        return self.fuse(input_ids, no_slot, None, pending, check_inputs=check_inputs, lam=lam)

    def _norm_target(self) -> str | float | torch.Tensor:
        """norm_target for latent_fuse. "vocab_mean" at inference is a cached 0-dim tensor on the table's device
        (no host sync: CUDA-graph capture and torch.export see no float()), recomputed when the embedding table is
        replaced or changed in place (keyed on the Parameter object and its version counter, not on data_ptr(),
        which fake tensors under torch.export do not have), so a decode step does not re-read the V x H table
        (49152 x 576 fp32 = 113 MB for SmolLM2-135M) just to rescale one latent. While torch.compile/export traces,
        the reduction is part of the graph instead (a cache is Python state the graph could not see change).
        Changes that bypass the version counter (`weight.data.copy_(...)`) are not seen: call
        `model._vocab_mean = None` after one."""
        nt = self.config.norm_target
        if nt != "vocab_mean" or (self.training and torch.is_grad_enabled()):
            return nt
        w = self.generator.get_input_embeddings().weight
        if torch.compiler.is_compiling():
            return vocab_mean_norm(w.detach())
        cached = self._vocab_mean
        if cached is None or cached[0] is not w or cached[1] != w._version:
            cached = (w, w._version, vocab_mean_norm(w.detach()))
            self._vocab_mean = cached
        return cached[2]


    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: FlyThinkerCache | None = None,
        past_key_values: FlyThinkerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        reasoner_input_ids: torch.LongTensor | None = None,
        reasoner_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        fusion_lambda: float | None = None,
        parallel: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast | tuple:
        """The fused pair's forward: the generator's final hidden state `[B, T, H_g]` (no LM head).

        Args:
            input_ids: `[B, T]` new tokens (the continuation when `cache` holds a prefix); both models read them.
            attention_mask: `[B, past + T]` (2-D), or None (no padding; packed rows through `position_ids`).
            position_ids: `[B, T]`; positions restarting inside a row without a mask mark packed sequences (as
                DataCollatorWithFlattening makes them): no latent crosses a sequence boundary.
            cache / past_key_values: a `FlyThinkerCache` (aliases; transformers 5.x renamed the argument).
            inputs_embeds: `[B, T, H_g]` the generator's embeddings; the reasoner still reads `input_ids`, the
                latents are added to these embeddings instead of E[x].
            use_cache: None = the generator config's `use_cache` outside training.
            reasoner_input_ids / reasoner_attention_mask: `[B, Q]` split context, the reasoner's own prompt (read
                on an empty cache only).
            labels: `[B, T]` unshifted (IGNORE_INDEX = ignore); used only to place the fusion (the response
                start: split context, `fuse_prompt=False`), no loss is computed here.
            fusion_lambda: this call's fusion weight (None: the saved `config.fusion_lambda`); the config is not
                changed.
            parallel: how this call runs the two halves ("off", "auto", "threads", "streams"; None:
                `config.parallel`, the pair's runtime default, never saved); the same numbers either way.

        Returns:
            `BaseModelOutputWithPast`: `last_hidden_state [B, T, H_g]`, the cache (latents appended), and the
            generator's `hidden_states` / `attentions` when asked for.
        """
        if reasoner_attention_mask is not None and reasoner_input_ids is None:
            raise ValueError("reasoner_attention_mask was given without reasoner_input_ids (it is the mask of the "
                             "reasoner's own prompt in split context)")
        step = self._normalise(input_ids, attention_mask, position_ids, self._step_cache(cache, past_key_values,
                                                                                          use_cache), kwargs)
        self._check_step_inputs(step, inputs_embeds, reasoner_input_ids)
        step.fusion_lambda = check_fusion_lambda(fusion_lambda)
        step.parallel = check_parallel_mode(parallel)
        if step.prefill and reasoner_input_ids is not None:
            g_out, latents = self._split_prefill(step, reasoner_input_ids, reasoner_attention_mask, labels)
        elif not step.prefill and step.input_ids.shape[1] == 1:
            g_out, latents = self._decode_step(step)
        else:
            g_out, latents = self._shared_forward(step, labels)
        if step.cache is not None:
            step.cache.append_latents(latents)
        out = BaseModelOutputWithPast(last_hidden_state=g_out.last_hidden_state, cache=step.cache,
                                      hidden_states=getattr(g_out, "hidden_states", None),
                                      attentions=getattr(g_out, "attentions", None))
        return out.to_tuple() if return_dict is False else out

    def _check_step_inputs(self, step: StepInputs, inputs_embeds: torch.Tensor | None,
                           reasoner_input_ids: torch.Tensor | None) -> None:
        """Value checks before either model runs: token ids inside the shared vocabulary (an out-of-range id would
        reach the reasoner's embedding first: a device assert on CUDA) and the given embeddings' shape. The id
        check costs a host sync, so a CUDA decode step skips it (like latent_fuse's checks)."""
        if inputs_embeds is not None:
            B, T = step.input_ids.shape
            H = self.config.generator.hidden_size
            if inputs_embeds.dim() != 3 or tuple(inputs_embeds.shape) != (B, T, H):
                raise ValueError(f"inputs_embeds must be [B={B}, T={T}, H_g={H}] like input_ids, got "
                                 f"{tuple(inputs_embeds.shape)}")
            step.inputs_embeds = inputs_embeds
        decode = not step.prefill and step.input_ids.shape[1] == 1
        if decode and step.input_ids.device.type != "cpu":
            return
        V = self.generator.get_input_embeddings().weight.shape[0]
        for name, ids in (("input_ids", step.input_ids), ("reasoner_input_ids", reasoner_input_ids)):
            if ids is not None and ids.numel() and bool(((ids < 0) | (ids >= V)).any()):
                bad = ids[(ids < 0) | (ids >= V)][0].item()
                raise ValueError(f"{name} holds token id {bad}, out of range for the shared vocabulary of {V}")

    def _step_cache(self, cache: FlyThinkerCache | None, past_key_values: FlyThinkerCache | None,
                    use_cache: bool | None) -> FlyThinkerCache | None:
        """The cache this forward reads and writes: None without use_cache (a cache passed with use_cache=False is
        neither read nor written), a fresh one when none is given."""
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise ValueError("pass either cache or past_key_values, not both")
            cache = past_key_values
        if cache is not None and not isinstance(cache, FlyThinkerCache):
            raise TypeError(f"FlyThinkerForCausalLM needs a FlyThinkerCache, got {type(cache).__name__}")
        if use_cache is None:
            use_cache = cache is not None or (getattr(self.config.generator, "use_cache", True) and not self.training)
        if not use_cache:
            return None
        return cache if cache is not None else FlyThinkerCache(generator_config=self.config.generator,
                                                                reasoner_config=self.config.reasoner)

    @staticmethod
    def _normalise(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None, cache: FlyThinkerCache | None,
                   kwargs: dict[str, Any]) -> StepInputs:
        if input_ids is None:
            raise ValueError("input_ids is required (also with inputs_embeds: the reasoner reads the ids)")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [B, T] batch, got shape {tuple(input_ids.shape)} (an "
                             "empty prompt: start it with at least one token, e.g. BOS)")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [B, past + T], got shape {tuple(attention_mask.shape)}")
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            local_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        else:
            local_mask = attention_mask[:, -T:]
        continues = None
        if position_ids is None:
            position_ids = (torch.arange(past, past + T, device=input_ids.device).expand(B, T)
                            if attention_mask is None else positions_from_mask(attention_mask)[:, -T:])
        elif attention_mask is None and T > 1:
            # packed rows (HF's padding-free format): a position that does not follow its predecessor's starts a
            # new sequence; like HF's find_packed_sequence_indices
            continues = F.pad(position_ids[:, 1:] - position_ids[:, :-1] == 1, (1, 0), value=True)
        gen_kwargs = {k: v for k, v in kwargs.items() if k in ("output_attentions", "output_hidden_states")}
        return StepInputs(input_ids, attention_mask, local_mask, position_ids, cache, past, gen_kwargs,
                          continues=continues)

    def _generator(self, step: StepInputs, embeds: torch.Tensor) -> BaseModelOutputWithPast:
        """The generator on this step's (fused) embeddings `[B, T, H_g]`. With given `inputs_embeds`, the fused
        term is moved onto them: given + (fused - E[x]) (exactly `fused` when given == E[x])."""
        if step.inputs_embeds is not None:
            embeds = embeds + (step.inputs_embeds.to(embeds.dtype) - self.embed(step.input_ids))
        return self.generator_forward(embeds, step.attention_mask, step.position_ids, step.cache, step.use_cache,
                                      **step.gen_kwargs)

    def _split_prefill(self, step: StepInputs, r_ids: torch.Tensor, r_mask: torch.Tensor | None,
                       labels: torch.Tensor | None) -> tuple[BaseModelOutputWithPast, torch.Tensor]:
        """Split context on an empty cache: the reasoner reads its own prompt `r_ids [B, Q]`, aligned with the
        generator's at the response boundary (alignment.split_alignment). Returns (generator output, the pending
        latent `[B, 1, H_r]`: the reasoner's last *real* prompt position, its prompt may be right-padded)."""
        r_ids, r_mask = _check_reasoner_prompt(step.input_ids, r_ids, r_mask)
        r_pos = positions_from_mask(r_mask)
        if step.cache is not None:
            step.cache.start_split(r_mask)
        worker = self._prefill_worker(step, labels)
        if worker is not None and bool(step.local_mask[:, -1].all()):
            h, g_out = split_prefill(self, worker, step, r_ids, r_mask, r_pos)
        else:
            h = self.reasoner_prompt_forward(r_ids, r_mask, r_pos, step.cache, step.use_cache)  # [B, Q, H_r]
            n_fused = (torch.ones_like(step.local_mask[:, 0], dtype=torch.long) if labels is None
                       else _split_fused_count(step.local_mask, labels))
            latent, lmask, prev = split_latents(h, *split_alignment(step.local_mask, r_mask, n_fused))
            g_out = self._generator(step, self.fuse(step.input_ids, latent, lmask, prev, lam=step.fusion_lambda))
        return g_out, _emitted_latents(h, r_mask, last_only=True)

    def _shared_forward(self, step: StepInputs, labels: torch.Tensor | None
                        ) -> tuple[BaseModelOutputWithPast, torch.Tensor]:
        """Both models read the same tokens (shared context, or a multi-token chunk after a split prefill): slot t
        of the reasoner's latents is fused into position t + 1, the pending latent into position 0. Returns
        (generator output, the latents `[B, T, H_r]` for the cache, masked: the last one is the new pending)."""
        targets = None  # generator positions that receive a latent (None: all)
        if step.prefill and not self.config.fuse_prompt:
            T = step.input_ids.shape[1]
            targets = (response_targets(labels) if labels is not None
                       else (torch.arange(T, device=step.input_ids.device) == T - 1).expand_as(step.input_ids))
        src_mask = shared_source_mask(step.local_mask, targets)  # [B, T]
        if step.continues is not None:
            # slot t feeds position t + 1: not across a packed sequence boundary (as position 0 of a padded row)
            src_mask = src_mask * F.pad(step.continues[:, 1:], (0, 1), value=True).to(src_mask.dtype)
        worker = self._prefill_worker(step, labels)
        if worker is not None:
            h, g_out = shared_prefill(self, worker, step, src_mask)
        else:
            h = self.reasoner_forward(step.input_ids, *self._reasoner_view(step), step.cache, step.use_cache)
            g_out = self._generator(step, self.fuse(step.input_ids, h, src_mask, self._pending_latent(step),
                                                      lam=step.fusion_lambda))
        return g_out, _emitted_latents(h, step.local_mask)

    def _decode_step(self, step: StepInputs) -> tuple[BaseModelOutputWithPast, torch.Tensor]:
        """One new token per row on a filled cache: the generator's position needs only the pending latent, so the
        two models' halves are independent and run as config.parallel says. Returns (generator output, the new
        latent `[B, 1, H_r]`)."""
        r_mask, r_pos = self._reasoner_view(step)
        # value checks cost a host sync per step on CUDA (it would stall the overlap): CPU only there
        emb = self.fuse_pending(step.input_ids, self._pending_latent(step),
                                check_inputs=step.input_ids.device.type == "cpu", lam=step.fusion_lambda)
        g_out, h = self.reasoner_worker(step.parallel).run_pair(
            lambda: self._generator(step, emb),
            lambda: self.reasoner_forward(step.input_ids, r_mask, r_pos, step.cache, True))
        return g_out, _emitted_latents(h, step.local_mask)

    def _reasoner_view(self, step: StepInputs) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The reasoner's (attention mask, position ids `[B, T]`) for this step's tokens: the generator's own, or
        after a split prefill the reasoner's, kept in the cache (O(T) bookkeeping per step)."""
        if step.cache is not None and step.cache.split and not step.prefill:
            return step.cache.extend_reasoner(step.local_mask)
        return step.attention_mask, step.position_ids

    @staticmethod
    def _pending_latent(step: StepInputs) -> torch.Tensor | None:
        """The latent `[B, H_r]` fused into this step's first position: the cache's pending one (None on prefill)."""
        if step.prefill:
            return None
        if step.cache.pending is None:
            raise ValueError("the cache holds generator states but no pending reasoner latent: build it with "
                             "FlyThinkerForCausalLM (a FlyThinkerCache filled by its forward)")
        return step.cache.pending

    def _prefill_worker(self, step: StepInputs, labels: torch.Tensor | None) -> ReasonerWorker | None:
        """The worker for an overlapped prefill, or None for the plain sequential one (not a prefill, parallel="off",
        training, no cache, a 1-token prompt, or extra generator outputs requested; "auto" on CPU with one row)."""
        B, T = step.input_ids.shape
        if (not step.prefill or T < 2 or step.cache is None or labels is not None or step.gen_kwargs
                or step.inputs_embeds is not None or (step.parallel or self.config.parallel) == "off"
                or (self.training and torch.is_grad_enabled())):
            return None
        worker = self.reasoner_worker(step.parallel)
        if isinstance(worker, InlineWorker):
            return None
        if (step.parallel or self.config.parallel) == "auto" and B == 1 and not isinstance(worker, StreamWorker):
            # Prefill is compute-bound: on CPU, chunks at one thread per model lost to two threads per model run
            # one after the other at batch 1 and won at batch 4 (benchmarks/results/decode.json; docs/results.md).
            # "threads" still forces the overlap.
            return None
        return worker


class FlyThinkerForCausalLM(FlyThinkerPreTrainedModel, GenerationMixin):
    """A drop-in HF causal LM: `.model` (a `FlyThinkerModel`, the fused pair) plus the generator's LM head and the
    loss. `.generator`, `.reasoner` and the fusion's building blocks are reachable here too (they live on
    `.model`). State-dict keys sit under `model.`; checkpoints keep the flat layout (`generator.*`, `reasoner.*`,
    `latent_proj.weight`, ...), renamed on load and back on save (`CHECKPOINT_CONVERSION`)."""

    def __init__(self, config: FlyThinkerConfig, generator: PreTrainedModel | None = None,
                 reasoner: PreTrainedModel | None = None):
        super().__init__(config)
        self.model = FlyThinkerModel(config, generator=generator, reasoner=reasoner)
        self.post_init()

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """`nn.Module.load_state_dict` that also takes the checkpoint layout (the flat `generator.*`,
        `reasoner.*`, `latent_proj.*` names `save_pretrained` writes): those are renamed to module names as
        `CHECKPOINT_CONVERSION` does on `from_pretrained`. Trainer's resume and best-model loads hand the saved
        file's tensors straight to this method, non-strict: without the renaming nothing would load, silently."""
        renamed = {_CHECKPOINT_KEY.sub(r"model.\1", k): v for k, v in state_dict.items()}
        return super().load_state_dict(renamed, strict=strict, assign=assign)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pair(cls, generator: PreTrainedModel | str, reasoner: PreTrainedModel | str, *,
                  dtype: torch.dtype | str | None = None, attn_implementation: str | dict | None = None,
                  reasoner_device: torch.device | str | None = None, **fusion: Any) -> FlyThinkerForCausalLM:
        """Pair two causal LMs sharing one vocabulary (model objects or local paths), e.g.
        `from_pair(gen, rsn, fusion_lambda=1.0, latent_norm="standardize")`.

        The projection defaults to `"zero"`: a learned [H_g, H_r] map initialised at zero, so a new pair of two
        pretrained models computes exactly what its generator computes and training moves it from there (on a
        pretrained SmolLM2 pair the paper's parameter-free `"pad"` adds latents the generator never saw, and
        training from it stayed at chance: docs/fusion.md). `projection="pad"` keeps the paper's rule by name.

        Args:
            generator: the model that writes the reply: a transformers causal LM object (used as it is, not
                copied) or a local folder (safetensors only).
            reasoner: the model whose final hidden states are fused into the generator's input embeddings; same
                forms as `generator`, same vocabulary.
            dtype: dtype of models loaded from folders (model objects keep theirs).
            attn_implementation: attention implementation of both models, or a dict with `"generator"` /
                `"reasoner"` keys.
            reasoner_device: place the reasoner on another device than the generator.
            **fusion: the fusion options of :class:`FlyThinkerConfig` (`fusion_lambda`, `norm_target`,
                `projection` (default `"zero"` here), `detach_norm`, `fuse_prompt`, `parallel`, `loss_impl`,
                `latent_eps`, `latent_norm`); an unknown name is an error. `parallel` and `loss_impl` are this pair's
                defaults for the call arguments of the same name: accepted here and kept on `config` for this
                process (every caller that sets them keeps working), but not saved with the pair (config.json holds
                what defines the model; see :class:`FlyThinkerConfig`).

        Returns:
            The pair, with the generator's generation config.
        """
        fusion_kwargs_check(fusion)
        fusion.setdefault("projection", "zero")
        gen, rsn = (_load_lm(name, m, dtype, attn_implementation)
                    for name, m in (("generator", generator), ("reasoner", reasoner)))
        for m in (gen, rsn):
            for mod in m.modules():  # already initialised: post_init must not re-initialise them
                mod._is_hf_initialized = True
        # The config's attn/experts setters recurse into the sub-configs (the models' own config objects): hand
        # each sub-config its current value back instead of letting a top-level None overwrite it.
        impl = {k: {"": getattr(m.config, a, None), "generator": getattr(gen.config, a, None),
                    "reasoner": getattr(rsn.config, a, None)}
                for k, a, m in (("attn_implementation", "_attn_implementation", gen),
                                ("experts_implementation", "_experts_implementation", gen))}
        config = FlyThinkerConfig(generator=gen.config, reasoner=rsn.config, **impl, **fusion)
        model = cls(config, generator=gen, reasoner=rsn)
        if model.latent_proj is not None:
            model.latent_proj.to(device=gen.device, dtype=gen.dtype)
        for name in LATENT_NORM_BUFFERS:  # fp32 statistics, on the generator's device (where the fusion runs)
            if hasattr(model.model, name):
                setattr(model.model, name, getattr(model.model, name).to(gen.device))
        if getattr(gen, "generation_config", None) is not None:
            model.generation_config = copy.deepcopy(gen.generation_config)
        if attn_implementation is not None and not all(isinstance(m, (str, bytes)) for m in (generator, reasoner)):
            model.set_attn_implementation(attn_implementation)
        if reasoner_device is not None:
            model.reasoner.to(reasoner_device)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        strict: bool | None = None, **kwargs: Any) -> FlyThinkerForCausalLM:
        """`PreTrainedModel.from_pretrained` of a local folder, safetensors only (flythinker never unpickles a
        checkpoint: a folder with only `pytorch_model.bin` is refused), strict (`flythinker.checkpoint`): a
        missing path, a half-written or corrupt folder, tensors that do not match config.json (missing or
        extra) and a `projection=` override of a saved projection raise CheckpointError naming the problem.

        Args:
            pretrained_model_name_or_path: a folder written by `save_pretrained`, or the name of a pair shipped
                in the package (`"smollm2-135m-persona-empathy"`: built offline from its base model and its trained
                deltas; it takes only `dtype=` and `shared_base=`, False for two copies with the LoRA merged).
            *args: passed to `PreTrainedModel.from_pretrained`.
            strict: True (default) refuses a checkpoint whose tensors do not match its config; False loads it
                anyway (missing tensors randomly initialised). Default with `output_loading_info=True`: False (the
                caller gets the report to judge).
            **kwargs: `PreTrainedModel.from_pretrained` options (`dtype`, `device_map`, config overrides, ...);
                `use_safetensors=False` is refused.

        Returns:
            The pair (with transformers' loading report when `output_loading_info=True`).
        """
        from flythinker.checkpoint import load_strict
        from flythinker.shared_base import retie

        if kwargs.get("use_safetensors") is False:
            raise ValueError("FlyThinkerForCausalLM loads safetensors checkpoints only (use_safetensors=False given)")
        kwargs["use_safetensors"] = True
        for accepts, factory in NAMED_PAIR_FACTORIES:  # e.g. a trained pair shipped as deltas in the package
            if accepts(pretrained_model_name_or_path):
                return factory(cls, pretrained_model_name_or_path, **kwargs)
        _refuse_unregistered_shipped(pretrained_model_name_or_path)
        want_info = bool(kwargs.pop("output_loading_info", False))
        strict = not want_info if strict is None else strict
        hf_load, raw = super().from_pretrained, {}

        def load(*a: Any, **kw: Any) -> tuple[FlyThinkerForCausalLM, dict]:  # errors name checkpoint tensors
            model, raw["info"] = hf_load(*a, **kw)
            return model, _checkpoint_names(raw["info"])

        model, _ = load_strict(load, pretrained_model_name_or_path, *args, strict=strict,
                               output_loading_info=True, **kwargs)
        info = raw["info"]  # transformers' report, in the model's parameter names
        retie(model)  # a shared-base pair: the loader may have replaced the base parameter objects
        return (model, info) if want_info else model

    @classmethod
    def from_shared_base(cls, base: PreTrainedModel | str, *, r: int = 8, lora_alpha: float = 16,
                         target_modules: list[str] | None = None, lora_dropout: float = 0.0,
                         generator_adapter: Any = None, reasoner_adapter: Any = None, **fusion: Any
                         ) -> FlyThinkerForCausalLM:
        """A pair of one base model with two LoRA adapters, the base weights held once (flythinker.shared_base):
        `base` becomes the generator (a model object is modified in place), the reasoner shares its weights.
        Decoding runs both halves' rows as one batched forward through the base.

        Args:
            base: a transformers causal LM object or a local folder (safetensors only).
            r, lora_alpha, lora_dropout: the fresh adapters' rank, scale (`alpha / r`) and dropout.
            target_modules: names of the linear layers that get adapters (default: the seven linear maps of a
                Llama-style layer).
            generator_adapter, reasoner_adapter: None for a fresh rank-`r` adapter (B = 0: the half starts as the
                base), or a peft `PeftModel` / adapter folder to load.
            **fusion: fusion options as in :meth:`from_pair` (no `reasoner_device`: the base is held once), and
                `dtype` for a base loaded from a folder.
        """
        from flythinker.shared_base import from_shared_base

        return from_shared_base(cls, base, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                lora_dropout=lora_dropout, generator_adapter=generator_adapter,
                                reasoner_adapter=reasoner_adapter, **fusion)

    def to_two_copies(self) -> FlyThinkerForCausalLM:
        """The two-copy equivalent of this shared-base pair (`flythinker.shared_base.unshare_pair`): two independent
        copies of the base, each half's adapter merged into its weights, the same fusion. What `flythinker serve`
        (vLLM) loads: `pair.to_two_copies().save_pretrained(folder)`. This pair is not modified."""
        from flythinker.shared_base import unshare_pair

        return unshare_pair(self)


    # ------------------------------------------------------------------ the fused pair's parts (they live on .model)
    @property
    def generator(self) -> PreTrainedModel:
        """The generator, a full HF causal LM (its LM head is this model's)."""
        return self.model.generator

    @property
    def reasoner(self) -> PreTrainedModel:
        """The reasoner, a full HF causal LM (only its base model runs)."""
        return self.model.reasoner

    @property
    def latent_proj(self) -> nn.Linear | None:
        """The learned fusion projection `[H_g, H_r]` (projection "linear" / "zero"), else None."""
        return self.model.latent_proj

    @property
    def latent_mean(self) -> torch.Tensor:
        """latent_norm="standardize": the reasoner latents' mean `[H_r]` (AttributeError otherwise)."""
        return self.model.latent_mean

    @property
    def latent_inv_std(self) -> torch.Tensor:
        """latent_norm="standardize": the reasoner latents' inverse std `[H_r]` (AttributeError otherwise)."""
        return self.model.latent_inv_std

    @property
    def _latent_capture(self) -> Any:
        return self.model._latent_capture

    @_latent_capture.setter
    def _latent_capture(self, value: Any) -> None:
        self.model._latent_capture = value

    @property
    def _vocab_mean(self) -> Any:
        return self.model._vocab_mean

    @_vocab_mean.setter
    def _vocab_mean(self, value: Any) -> None:
        self.model._vocab_mean = value

    @property
    def generator_device(self) -> torch.device:
        return self.model.generator_device

    @property
    def reasoner_device(self) -> torch.device:
        return self.model.reasoner_device

    @property
    def vocab_size(self) -> int:
        """The shared vocabulary's size (rows of the generator's input embedding)."""
        return self.model.vocab_size

    def reasoner_worker(self, parallel: str | None = None) -> ReasonerWorker:
        return self.model.reasoner_worker(parallel)

    def reasoner_forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.reasoner_forward(*args, **kwargs)

    def generator_forward(self, *args: Any, **kwargs: Any) -> BaseModelOutputWithPast:
        return self.model.generator_forward(*args, **kwargs)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def enable_reasoner_prefix_cache(self, max_bytes: int | None = None, min_reuse: int = 1) -> Any:
        """`FlyThinkerModel.enable_reasoner_prefix_cache`: cache the reasoner's split-context prefills for
        returning users (flythinker.reasoner_prefix_cache); returns the cache."""
        return self.model.enable_reasoner_prefix_cache(max_bytes, min_reuse)

    def disable_reasoner_prefix_cache(self) -> None:
        self.model.disable_reasoner_prefix_cache()

    @property
    def reasoner_prefix_cache(self) -> Any:
        """The fused model's `ReasonerPrefixCache` (None: off)."""
        return self.model.reasoner_prefix_cache

    @reasoner_prefix_cache.setter
    def reasoner_prefix_cache(self, cache: Any) -> None:
        self.model.reasoner_prefix_cache = cache

    def fuse(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.fuse(*args, **kwargs)

    def fuse_pending(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.fuse_pending(*args, **kwargs)

    def fusion_state_dict(self) -> dict[str, torch.Tensor]:
        """`FlyThinkerModel.fusion_state_dict` (keyed as in the checkpoint: `latent_proj.weight`, ...)."""
        return self.model.fusion_state_dict()

    def load_fusion_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_fusion_state_dict(state)

    def _norm_target(self) -> str | float | torch.Tensor:
        return self.model._norm_target()

    def _freeze_reasoner_head(self) -> None:
        self.model._freeze_reasoner_head()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.set_output_embeddings(value)

    def get_decoder(self) -> FlyThinkerModel:
        """The fused pair (`.model`): its outputs are the generator's hidden states *with* the latents fused."""
        return self.model

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """`FlyThinkerModel.resize_token_embeddings`: both models' embeddings and LM heads."""
        return self.model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    # ------------------------------------------------------------------ logits and loss
    def logits_from_hidden(self, hidden: torch.Tensor, logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """The generator's LM head (and logit soft-capping) on `hidden [B, T, H_g]`: logits `[B, T', V]`."""
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.generator.get_output_embeddings()(hidden)
        cap = getattr(self.config.generator, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor | None,
                 num_items_in_batch: torch.Tensor | int | None = None,
                 shift_labels: torch.Tensor | None = None, loss_impl: str | None = None) -> torch.Tensor:
        """Causal LM loss of the generator on `hidden [B, T, H_g]` and unshifted `labels [B, T]` (shift inside,
        ignore_index IGNORE_INDEX): mean over labelled tokens, or sum / num_items_in_batch (gradient accumulation);
        an all-ignored batch gives 0, not NaN. `loss_impl` (None: config.loss_impl) "fused": `linear_cross_entropy`
        on the final hidden states and the LM head weight, never materialising the [B, T, V] logits; "naive":
        logits + cross_entropy.
        """
        B, T, H = hidden.shape
        # shift by padding: position t predicts labels[t + 1], the last position gets IGNORE_INDEX. `hidden` stays
        # a free [B*T, H] view (slicing hidden[:, :-1] would copy it) and the ignored row costs one row of work.
        if shift_labels is not None:  # already shifted (sequence parallelism): position t predicts shift_labels[t]
            if tuple(shift_labels.shape) != (B, T):
                raise ValueError(f"shift_labels must be [B={B}, T={T}], got {tuple(shift_labels.shape)}")
            shift_labels = shift_labels.to(hidden.device).reshape(-1)
        else:
            shift_labels = F.pad(labels.to(hidden.device), (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)  # [B*T]
        head = self.generator.get_output_embeddings()
        cap = getattr(self.config.generator, "final_logit_softcapping", None)
        # the fused op needs a plain bias-free Linear head; anything else (a peft LoRA-wrapped head, a bias)
        # falls back to the logits path so that its own forward runs
        plain_head = isinstance(head, nn.Linear) and head.bias is None and type(head).forward is nn.Linear.forward
        if (loss_impl or self.config.loss_impl) == "fused" and plain_head:
            return linear_cross_entropy(hidden.reshape(B * T, H), head.weight, shift_labels,
                                        ignore_index=IGNORE_INDEX, num_items_in_batch=num_items_in_batch, softcap=cap)
        logits = self.logits_from_hidden(hidden).float()  # [B, T, V]
        loss = F.cross_entropy(logits.reshape(B * T, -1), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss / loss_denominator(shift_labels, IGNORE_INDEX, num_items_in_batch)


    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: FlyThinkerCache | None = None,
        past_key_values: FlyThinkerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        reasoner_input_ids: torch.LongTensor | None = None,
        reasoner_attention_mask: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        return_dict: bool | None = None,
        shift_labels: torch.LongTensor | None = None,
        fusion_lambda: float | None = None,
        loss_impl: str | None = None,
        parallel: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast | tuple:
        """Fused forward: `FlyThinkerModel.forward`, then the generator's LM head and the loss.

        input_ids `[B, T]` (new tokens when `cache` holds a prefix), attention_mask `[B, past + T]` (2-D),
        labels `[B, T]` (unshifted, IGNORE_INDEX = ignore). Split context: `reasoner_input_ids [B, Q]` (and its
        mask) give the reasoner its own prompt; read only on an empty cache (later, both models consume the same new
        tokens), and with labels the response is the part from the first labelled position on.
        `past_key_values` is an alias of `cache` (transformers 5.x renamed it). `inputs_embeds [B, T, H_g]` with
        `input_ids`: the reasoner reads the ids, the latents are added to these embeddings instead of E[x].
        `shift_labels [B, T]`: labels already shifted (position t predicts shift_labels[t]; sequence parallelism),
        used instead of shifting `labels`. Packed rows (no attention_mask, position_ids restarting at each sequence,
        as DataCollatorWithFlattening makes them): no latent crosses a sequence boundary.
        Per call, without touching the saved config: `fusion_lambda` (the fusion weight), `loss_impl` ("fused":
        no logits when labels are given; "naive": logits + cross-entropy) and `parallel` (how the two halves run);
        None = the config's.
        """
        if loss_impl is not None and loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS} (or None: config.loss_impl), got {loss_impl!r}")
        if labels is None and shift_labels is not None and input_ids is not None:
            labels = _unshift(shift_labels, input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         reasoner_input_ids=reasoner_input_ids, reasoner_attention_mask=reasoner_attention_mask,
                         labels=labels, fusion_lambda=fusion_lambda, parallel=parallel, **kwargs)
        return self._output(out, out.cache, labels, logits_to_keep, num_items_in_batch, return_dict, shift_labels,
                            loss_impl or self.config.loss_impl)

    def _output(self, g_out: BaseModelOutputWithPast, cache: FlyThinkerCache | None, labels: torch.Tensor | None,
                logits_to_keep: int | torch.Tensor, num_items_in_batch: torch.Tensor | int | None,
                return_dict: bool | None, shift_labels: torch.Tensor | None = None, loss_impl: str = "fused"
                ) -> CausalLMOutputWithPast | tuple:
        """Loss (with labels) and logits (unless the fused loss made them unnecessary) from the generator output."""
        hidden = g_out.last_hidden_state  # [B, T, H_g]
        loss = (self._lm_loss(hidden, labels, num_items_in_batch, shift_labels, loss_impl)
                if labels is not None or shift_labels is not None else None)
        logits = None
        if labels is None or loss_impl != "fused":
            logits = self.logits_from_hidden(hidden, logits_to_keep)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache,
                                     hidden_states=getattr(g_out, "hidden_states", None),
                                     attentions=getattr(g_out, "attentions", None))
        return out.to_tuple() if return_dict is False else out


    # ------------------------------------------------------------------ generate integration
    _CACHE_IMPLEMENTATIONS = (None, "dynamic", "static", "offloaded")

    def _new_cache(self, generation_config: Any, model_kwargs: dict, max_cache_length: int) -> FlyThinkerCache:
        """The FlyThinkerCache generate() fills: both models' caches of generation_config.cache_implementation.
        A static reasoner cache also holds the reasoner's own prompt in split context (its length may differ)."""
        impl = generation_config.cache_implementation
        if impl not in self._CACHE_IMPLEMENTATIONS:
            raise ValueError(f"FlyThinkerForCausalLM supports cache_implementation in "
                             f"{[i for i in self._CACHE_IMPLEMENTATIONS if i]}, got {impl!r}")
        r_ids = model_kwargs.get("reasoner_input_ids")
        r_len = max_cache_length + (r_ids.shape[1] if r_ids is not None else 0)
        return FlyThinkerCache(_sub_cache(impl, self.config.generator, max_cache_length, self.generator_device),
                               _sub_cache(impl, self.config.reasoner, r_len, self.reasoner_device))

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache: FlyThinkerCache | None = None, attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, is_first_iteration: bool = False,
                                      **kwargs: Any) -> dict:
        """transformers' preparation, except that the first step with `inputs_embeds` keeps `input_ids` (the
        reasoner reads the ids; the given embeddings are the generator's)."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs)
        if inputs.get("inputs_embeds") is not None and inputs.get("input_ids") is None:
            inputs["input_ids"] = input_ids[:, -inputs["inputs_embeds"].shape[1]:].clone()
        return inputs

    # the lean static-cache loop: `(model, args, kwargs) -> ids | None` (None: transformers' loop), registered by
    # flythinker.decode on import (`register_lean_generate`); the model itself knows no decode loop
    lean_generate: Callable[..., torch.Tensor | None] | None = None

    @classmethod
    def register_lean_generate(cls, fn: Callable[[FlyThinkerForCausalLM, tuple, dict], torch.Tensor | None]
                               ) -> None:
        """Make `fn(model, args, kwargs)` generate's fast path (it returns the ids, or None for transformers' loop,
        and pops `fast_path` from kwargs)."""
        cls.lean_generate = fn

    def generate(self, *args: Any, fast_path: bool | str = "auto", **kwargs: Any):
        """`GenerationMixin.generate`, with the decode loop an explicit choice.

        Args:
            *args: `GenerationMixin.generate`'s positional arguments (`input_ids [B, P]`, a `GenerationConfig`).
            **kwargs: `GenerationMixin.generate`'s options (`attention_mask`, `max_new_tokens`, `do_sample`, ...),
                and in split context `reasoner_input_ids [B, Q]` and `reasoner_attention_mask [B, Q]`, the
                reasoner's own prompt.
            fast_path: "auto" (default): flythinker's lean static-cache loop (`flythinker.decode`) when it gives
                this call's tokens exactly (greedy or one seeded FusedSamplingLogitsProcessor; no beams, other
                processors, stopping criteria or extra outputs; the shared-base batched step for a shared-base
                pair), else transformers' loop. True: the lean loop, or a ValueError naming why it does not
                apply. False: transformers' loop. `flythinker.decode.generate_path(model, *args, **kwargs)` names
                the loop a call takes without running it.
            fusion_lambda, parallel (in kwargs): this call's fusion weight and overlap mode (None: the config's:
                the saved `fusion_lambda`, the runtime default `parallel`), in both loops; the config is not
                changed.

        Returns:
            What `GenerationMixin.generate` returns: `[B, P + n]` token ids, or its output object when asked.
        """
        lean = type(self).lean_generate
        if lean is None:  # flythinker.decode not imported: transformers' loop
            if not any(fast_path is c for c in ("auto", True, False)):
                raise ValueError(f"fast_path must be 'auto', True or False, got {fast_path!r}")
            if fast_path is True:
                raise ValueError("fast_path=True needs the lean loop: import flythinker.decode (importing "
                                 "FlyThinkerForCausalLM from the flythinker package does)")
            return super().generate(*args, **kwargs)
        kwargs["fast_path"] = fast_path
        out = lean(self, args, kwargs)  # removes fast_path from kwargs
        return out if out is not None else super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode,
                                      batch_size: int, max_cache_length: int) -> None:
        if getattr(generation_config, "prefill_chunk_size", None) is not None and (
                model_kwargs.get("reasoner_input_ids") is not None or not self.config.fuse_prompt):
            # a chunk boundary would look like the response boundary (split context / fuse_prompt=False)
            raise ValueError("prefill_chunk_size is not supported with split context (reasoner_input_ids) or "
                             "fuse_prompt=False")
        user_cache = model_kwargs.get("cache")
        if user_cache is not None:
            if not isinstance(user_cache, FlyThinkerCache):
                raise TypeError(f"FlyThinkerForCausalLM.generate needs a FlyThinkerCache, got "
                                f"{type(user_cache).__name__}")
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode,
                                                         batch_size, max_cache_length)
        if generation_config.use_cache is False:
            return
        model_kwargs["cache"] = self._new_cache(generation_config, model_kwargs, max_cache_length)
        if generation_config.is_assistant:
            model_kwargs["cache"].activate_past_recording()




# (accepts(name_or_path), factory(cls, name_or_path, **kwargs)) pairs that from_pretrained tries before a folder:
# layouts built by a layer above the model register here (flythinker.pretrained.loading: the shipped pairs)
NAMED_PAIR_FACTORIES: list[tuple[Callable[[Any], bool], Callable[..., FlyThinkerForCausalLM]]] = []


def register_named_pair_factory(accepts: Callable[[Any], bool], factory: Callable[..., FlyThinkerForCausalLM]
                                ) -> None:
    """Let `FlyThinkerForCausalLM.from_pretrained(x, **kw)` return `factory(cls, x, **kw)` when `accepts(x)`."""
    if all(f is not factory for _, f in NAMED_PAIR_FACTORIES):
        NAMED_PAIR_FACTORIES.append((accepts, factory))


def _refuse_unregistered_shipped(name: Any) -> None:
    from flythinker.pretrained import shipped_name  # data only: imports nothing from flythinker

    if shipped_name(name):
        raise ValueError(f"{name!r} is a shipped pair, built by flythinker.pretrained.loading: import it (or import "
                         "FlyThinkerForCausalLM from the flythinker package, which does)")


def check_fusion_lambda(lam: float | None) -> float | None:
    """A per-call fusion weight: None (the config's) or a finite real number; anything else raises."""
    if lam is None:
        return None
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"fusion_lambda must be a finite number (or None: config.fusion_lambda), got {lam!r}")
    return float(lam)


def check_parallel_mode(mode: str | None) -> str | None:
    """A per-call overlap mode: None (the config's) or one of PARALLEL_MODES; anything else raises."""
    if mode is not None and mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES} (or None: config.parallel), got {mode!r}")
    return mode


def _checkpoint_names(info: dict) -> dict:
    """transformers' loading report with the tensor names of the checkpoint (`generator.*`, not `model.generator.*`),
    the names a user finds in the folder."""
    def rename(keys: Any) -> Any:
        if isinstance(keys, (set, list)):
            return type(keys)(k.removeprefix("model.") if isinstance(k, str) else k for k in keys)
        return keys

    return {k: rename(v) if k in ("missing_keys", "unexpected_keys") else v for k, v in info.items()}


def _sub_cache(impl: str | None, config: Any, max_len: int, device: torch.device) -> Cache:
    """One model's KV cache for generate's cache_implementation: dynamic (default), "offloaded" (a dynamic cache
    whose layers wait on the CPU; a model on the CPU has them there already, so a plain dynamic one) or "static"
    (`max_len` preallocated slots)."""
    if impl == "static":
        return StaticCache(config=config, max_cache_len=max_len)
    return DynamicCache(config=config, offloading=impl == "offloaded" and device.type != "cpu")


def _load_lm(name: str, model: PreTrainedModel | str, dtype: torch.dtype | str | None,
             attn_implementation: str | dict | None) -> PreTrainedModel:
    """A model object as it is, or a causal LM loaded from a local path (safetensors only: never unpickle)."""
    if not (isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"{name} must be a transformers PreTrainedModel or a local path, got {type(model)}")
        return model
    kw: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        kw["dtype"] = dtype
    if isinstance(attn_implementation, dict):
        attn_implementation = attn_implementation.get(name)
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(model, **kw)


def _check_reasoner_prompt(input_ids: torch.Tensor, r_ids: torch.Tensor, r_mask: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reasoner's prompt `[B, Q]` and its mask (all ones when None) on the generator's inputs' device."""
    B = input_ids.shape[0]
    r_ids = r_ids.to(input_ids.device)
    if r_ids.dim() != 2 or r_ids.shape[0] != B:
        raise ValueError(f"reasoner_input_ids must be [B={B}, Q], got {tuple(r_ids.shape)}")
    r_mask = torch.ones_like(r_ids) if r_mask is None else r_mask.to(input_ids.device)
    if r_mask.shape != r_ids.shape:
        raise ValueError(f"reasoner_attention_mask {tuple(r_mask.shape)} != reasoner_input_ids {tuple(r_ids.shape)}")
    return r_ids, r_mask


def _split_fused_count(gen_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Split context, training: fused generator positions per row `[B]` = from the one before the first labelled
    position to the last real one (at least 1: the last prompt position)."""
    n = last_real_index(gen_mask) - response_start(labels.to(gen_mask.device)) + 2
    return n.clamp_min(1)


def _unshift(shift_labels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """`labels [B, T]` whose shift is `shift_labels [B, T]` (used only to find the response, e.g. fuse_prompt=False:
    label t + 1 = shift_labels[t]; position 0 is unlabelled)."""
    if tuple(shift_labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"shift_labels must be [B, T]={tuple(input_ids.shape)}, got {tuple(shift_labels.shape)}")
    return F.pad(shift_labels.to(input_ids.device), (1, 0), value=IGNORE_INDEX)[:, :-1]


def _emitted_latents(h: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """The latents a forward appends to the cache, `h [B, T, H_r]` times its validity `mask [B, T]`; the last one
    becomes the pending latent. `last_only`: just the latent of each row's last real position `[B, 1, H_r]`
    (zero for an all-pad row)."""
    if last_only:
        last = last_real_index(mask)  # [B], -1 for an all-pad row
        h = h[torch.arange(h.shape[0], device=h.device), last.clamp_min(0)][:, None]  # [B, 1, H_r]
        mask = (last >= 0)[:, None]  # [B, 1]
    return h * mask[..., None].to(h.dtype)


# a real annotation object, not the string `from __future__ import annotations` leaves: transformers reads
# kwargs.annotation.__args__ to see which output variants (output_attentions, ...) forward takes
FlyThinkerForCausalLM.forward.__annotations__["kwargs"] = Unpack[TransformersKwargs]

# Why `use_liger_kernel` (transformers' Trainer, TRL) is refused for a pair: what Liger would need is missing.
LIGER_REFUSAL = ("use_liger_kernel=True is not supported for a FlyThinker pair: Liger patches modules by model type "
                 "and has no entry for model_type 'flythinker' (its kernels would reach neither the latent fusion nor "
                 "the pair's loss); the pair's fused linear cross-entropy is built in (FlyThinkerConfig "
                 "loss_impl='fused')")

# Checkpoints keep the flat layout of the pair's parts (`generator.*`, `reasoner.*`, `latent_proj.weight`,
# `latent_mean`, `latent_inv_std`): renamed under `model.` on load, and back on save (transformers reverts a
# registered conversion in `save_pretrained`), so folders written before and after the base/head split are one format.
def _measured_parallel_mode(model: object) -> str:
    """What `parallel="auto"` runs on this CPU pair: "threads" or "off", measured once per machine and pair shape
    (flythinker.parallel_auto)."""
    from flythinker.parallel_auto import decide

    return decide(model).mode


_CHECKPOINT_PARTS = r"^(generator|reasoner|latent_proj|latent_mean|latent_inv_std)"
_CHECKPOINT_KEY = re.compile(_CHECKPOINT_PARTS)
CHECKPOINT_CONVERSION = [WeightRenaming(source_patterns=_CHECKPOINT_PARTS, target_patterns=r"model.\1")]
register_checkpoint_conversion_mapping("FlyThinkerForCausalLM", CHECKPOINT_CONVERSION, overwrite=True)
AutoConfig.register("flythinker", FlyThinkerConfig, exist_ok=True)
AutoModelForCausalLM.register(FlyThinkerConfig, FlyThinkerForCausalLM, exist_ok=True)

FlyThinkerModel.forward.__annotations__["kwargs"] = Unpack[TransformersKwargs]
AutoModel.register(FlyThinkerConfig, FlyThinkerModel, exist_ok=True)

__all__ = ["CHECKPOINT_CONVERSION", "LIGER_REFUSAL", "FlyThinkerForCausalLM", "FlyThinkerModel",
           "FlyThinkerPreTrainedModel"]
