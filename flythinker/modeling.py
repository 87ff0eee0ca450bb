"""FlyThinkerForCausalLM: a drop-in HF causal LM whose generator reads the reasoner's latent thoughts.

Per step (DESIGN.md 1): the reasoner's base model turns tokens into latents h [B, T, H_r] (its LM head never runs),
`latent_fuse` adds h_{t-1} to the generator's embedding of x_t, and the generator's base model + LM head produce the
logits. Thanks to the one-position lag, a one-token decode step needs only the *pending* latent from the previous
step, so the generator and the reasoner of that step are independent: `_run_pair` is the hook where they can run
concurrently (config.parallel); the sequential path is the default and the oracle.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

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
from flythinker.concurrency import (
    InlineWorker,
    StreamWorker,
    pipelined_shared_prefill,
    pipelined_split_prefill,
    worker_for,
)
from flythinker.configuration import IGNORE_INDEX, FlyThinkerConfig, fusion_kwargs_check
from flythinker.kernels import latent_fuse, vocab_mean_norm


class FlyThinkerForCausalLM(PreTrainedModel, GenerationMixin):
    """Generator + reasoner pair. `.generator` and `.reasoner` are full HF causal LMs (save/load/peft work on them);
    only the reasoner's base model runs."""

    config_class = FlyThinkerConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _no_split_modules: list[str] = []

    def __init__(self, config: FlyThinkerConfig, generator: PreTrainedModel | None = None,
                 reasoner: PreTrainedModel | None = None):
        super().__init__(config)
        config.check_fusion()
        self.generator = generator if generator is not None else AutoModelForCausalLM.from_config(config.generator)
        self.reasoner = reasoner if reasoner is not None else AutoModelForCausalLM.from_config(config.reasoner)
        emb = self.generator.get_input_embeddings()
        if not isinstance(getattr(emb, "weight", None), torch.Tensor) or emb.weight.dim() != 2:
            raise TypeError(f"the generator's input embeddings must be an embedding table, got {type(emb).__name__}")
        H_g, H_r = config.generator.hidden_size, config.reasoner.hidden_size
        # "linear": a learned [H_g, H_r] map, initialised to the "pad" map (so both start from the same fusion).
        self.latent_proj = nn.Linear(H_r, H_g, bias=False) if config.projection == "linear" else None
        self._vocab_mean: tuple[tuple, float] | None = None  # (weight key, c): see _norm_target
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.latent_proj:
            with torch.no_grad():
                module.weight.zero_()
                n = min(module.weight.shape)
                module.weight[:n, :n] = torch.eye(n, dtype=module.weight.dtype, device=module.weight.device)
        else:
            super()._init_weights(module)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pair(cls, generator: PreTrainedModel | str, reasoner: PreTrainedModel | str, *,
                  dtype: torch.dtype | str | None = None, attn_implementation: str | dict | None = None,
                  reasoner_device: torch.device | str | None = None, **fusion: Any) -> FlyThinkerForCausalLM:
        """Pair two causal LMs sharing one vocabulary (model objects or local paths), e.g.
        `from_pair(gen, rsn, fusion_lambda=0.5, norm_target="vocab_mean", projection="pad")`.

        Model objects are used as they are (not copied). `reasoner_device` places the reasoner on another device.
        """
        fusion_kwargs_check(fusion)
        load_kw: dict[str, Any] = {"use_safetensors": True}  # never unpickle a checkpoint
        if dtype is not None:
            load_kw["dtype"] = dtype
        if isinstance(attn_implementation, str):
            load_kw["attn_implementation"] = attn_implementation
        models = []
        for name, m in (("generator", generator), ("reasoner", reasoner)):
            if isinstance(m, (str, bytes)) or hasattr(m, "__fspath__"):
                kw = dict(load_kw)
                if isinstance(attn_implementation, dict) and name in attn_implementation:
                    kw["attn_implementation"] = attn_implementation[name]
                m = AutoModelForCausalLM.from_pretrained(m, **kw)
            elif not isinstance(m, PreTrainedModel):
                raise TypeError(f"{name} must be a transformers PreTrainedModel or a local path, got {type(m)}")
            models.append(m)
        gen, rsn = models
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
        if getattr(gen, "generation_config", None) is not None:
            model.generation_config = copy.deepcopy(gen.generation_config)
        if attn_implementation is not None and not all(isinstance(m, (str, bytes)) for m in (generator, reasoner)):
            model.set_attn_implementation(attn_implementation)
        if reasoner_device is not None:
            model.reasoner.to(reasoner_device)
        return model

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> FlyThinkerForCausalLM:
        """`PreTrainedModel.from_pretrained`, safetensors only: flythinker never unpickles a checkpoint (a folder
        with only `pytorch_model.bin` is refused)."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("FlyThinkerForCausalLM loads safetensors checkpoints only (use_safetensors=False given)")
        kwargs["use_safetensors"] = True
        return super().from_pretrained(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.generator.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.generator.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.generator.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.generator.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.generator.get_decoder()

    # ------------------------------------------------------------------ the two halves of a step
    def _reasoner_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          position_ids: torch.Tensor | None, cache: FlyThinkerCache | None,
                          use_cache: bool) -> torch.Tensor:
        """Reasoner base model only (no LM head): latents `[B, T, H_r]` on the generator's device."""
        base = self.reasoner.get_decoder()
        dev = base.get_input_embeddings().weight.device
        out = base(input_ids=input_ids.to(dev),
                   attention_mask=None if attention_mask is None else attention_mask.to(dev),
                   position_ids=None if position_ids is None else position_ids.to(dev),
                   cache=cache.reasoner if cache is not None else None, use_cache=use_cache)
        return out.last_hidden_state.to(input_ids.device)

    def _generator_forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                           position_ids: torch.Tensor | None, cache: FlyThinkerCache | None, use_cache: bool,
                           **kwargs: Any):
        """Generator base model on fused embeddings: its model output (last_hidden_state [B, T, H_g], ...)."""
        return self.generator.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache.generator if cache is not None else None, use_cache=use_cache, **kwargs)

    def _run_pair(self, gen_fn: Callable[[], Any], rsn_fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """Run a decode step's generator and reasoner halves (independent) as config.parallel says: "off" one
        after the other; "threads" (CPU) the reasoner on a persistent worker thread, one core each; "streams" (CUDA)
        the reasoner launched on side streams (also when it lives on another device). See flythinker.concurrency."""
        return worker_for(self).run_pair(gen_fn, rsn_fn)

    def _prefill_worker(self, B: int, T: int, use_cache: bool, labels: torch.Tensor | None, gen_kwargs: dict):
        """The worker for an overlapped prefill, or None for the plain sequential one (parallel="off", training,
        no cache, a 1-token prompt, or extra generator outputs requested; "auto" on CPU with one row)."""
        if (T < 2 or not use_cache or labels is not None or gen_kwargs or self.config.parallel == "off"
                or (self.training and torch.is_grad_enabled())):
            return None
        worker = worker_for(self)
        if isinstance(worker, InlineWorker):
            return None
        if self.config.parallel == "auto" and B == 1 and not isinstance(worker, StreamWorker):
            # Prefill is compute-bound: on CPU, chunks at one thread per model lost to two threads per model run
            # one after the other at batch 1 (SmolLM2 pair, 256 tokens: 1662 vs 1307 ms) and won at batch 4
            # (5161 vs 6094 ms; benchmarks/results/decode.json). "threads" still forces the overlap.
            return None
        return worker

    # ------------------------------------------------------------------ fusion
    def _norm_target(self) -> str | float:
        """norm_target for latent_fuse. "vocab_mean" at inference is a cached float, recomputed only when the
        embedding table changes (keyed on data_ptr and the in-place version counter), so a decode step does not
        re-read the V x H table (49152 x 576 fp32 = 113 MB for SmolLM2-135M) just to rescale one latent."""
        nt = self.config.norm_target
        if nt != "vocab_mean" or (self.training and torch.is_grad_enabled()):
            return nt
        w = self.generator.get_input_embeddings().weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._vocab_mean is None or self._vocab_mean[0] != key:
            self._vocab_mean = (key, float(vocab_mean_norm(w)))
        return self._vocab_mean[1]

    def _fuse(self, input_ids: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None,
              prev: torch.Tensor | None, check_inputs: bool = True) -> torch.Tensor:
        """Generator input embeddings `[B, T, H_g]`: E[x_t] + lam * (latent of slot t-1, rescaled, projected).
        `check_inputs=False` skips latent_fuse's value checks (one host sync), for the lean decode loop."""
        E = self.generator.get_input_embeddings()
        cfg = self.config
        proj = self.latent_proj.weight if self.latent_proj is not None else None
        emb = latent_fuse(input_ids, E.weight, latent, mask, lam=float(cfg.fusion_lambda),
                          norm_target=self._norm_target(), projection=proj, prev_latent=prev,
                          eps=float(cfg.latent_eps), detach_norm=cfg.detach_norm, check_inputs=check_inputs)
        scale = getattr(E, "embed_scale", None)
        if scale is not None:
            # Scaled embedding modules (Gemma3): E(x) = scale * W[x]; scale the fused term like the embedding so the
            # latent stays relative to the table. At lam = 0 the difference is exactly 0 and E(x) is reproduced.
            plain = E.weight[input_ids]
            emb = E(input_ids) + (emb - plain) * scale
        return emb

    # ------------------------------------------------------------------ logits and loss
    def _logits(self, hidden: torch.Tensor, logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.generator.get_output_embeddings()(hidden)
        cap = getattr(self.config.generator, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor,
                 num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Causal LM loss of the generator on `hidden [B, T, H_g]` and unshifted `labels [B, T]` (shift inside,
        ignore_index IGNORE_INDEX): mean over labelled tokens, or sum / num_items_in_batch (gradient accumulation); an
        all-ignored batch gives 0, not NaN. config.loss_impl "fused": `linear_cross_entropy` on the final hidden
        states and the LM head weight, never materialising the [B, T, V] logits; "naive": logits + cross_entropy.
        """
        from flythinker.kernels import linear_cross_entropy
        from flythinker.kernels.linear_cross_entropy_naive import loss_denominator

        B, T, H = hidden.shape
        # shift by padding: position t predicts labels[t + 1], the last position gets IGNORE_INDEX. `hidden` stays a
        # free [B*T, H] view (slicing hidden[:, :-1] would copy it) and the ignored row costs one row of work.
        shift_labels = F.pad(labels.to(hidden.device), (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)  # [B*T]
        head = self.generator.get_output_embeddings()
        cap = getattr(self.config.generator, "final_logit_softcapping", None)
        # the fused op needs a plain bias-free Linear head; anything else (a peft LoRA-wrapped head, a bias)
        # falls back to the logits path so that its own forward runs
        plain_head = isinstance(head, nn.Linear) and head.bias is None and type(head).forward is nn.Linear.forward
        if self.config.loss_impl == "fused" and plain_head:
            return linear_cross_entropy(hidden.reshape(B * T, H), head.weight, shift_labels, ignore_index=IGNORE_INDEX,
                                        num_items_in_batch=num_items_in_batch, softcap=cap)
        logits = self._logits(hidden).float()  # [B, T, V]
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
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Fused forward.

        input_ids `[B, T]` (new tokens when `cache` holds a prefix), attention_mask `[B, past + T]` (2-D),
        labels `[B, T]` (unshifted, IGNORE_INDEX = ignore). Split context: `reasoner_input_ids [B, Q]` (and its mask)
        give the reasoner its own prompt; read only on an empty cache (later, both models consume the same new tokens),
        and with labels the response is the part from the first labelled position on (DESIGN.md 2).
        `past_key_values` is an alias of `cache` (transformers 5.x renamed it).
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported by FlyThinkerForCausalLM: both models need input_ids "
                             "(the generator's embeddings are built by fusing the reasoner's latents)")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise ValueError("pass either cache or past_key_values, not both")
            cache = past_key_values
        if cache is not None and not isinstance(cache, FlyThinkerCache):
            raise TypeError(f"FlyThinkerForCausalLM needs a FlyThinkerCache, got {type(cache).__name__}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [B, past + T], got shape {tuple(attention_mask.shape)}")
        if use_cache is None:
            use_cache = cache is not None or (getattr(self.config.generator, "use_cache", True) and not self.training)
        if not use_cache:
            cache = None  # a cache passed with use_cache=False is neither read nor written
        elif cache is None:
            cache = FlyThinkerCache(generator_config=self.config.generator, reasoner_config=self.config.reasoner)
        cache_for_step = cache

        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        prefill = past == 0
        local_mask = (attention_mask[:, -T:] if attention_mask is not None
                      else torch.ones(B, T, dtype=torch.long, device=input_ids.device))
        if position_ids is None:
            position_ids = (positions_from_mask(attention_mask)[:, -T:] if attention_mask is not None
                            else torch.arange(past, past + T, device=input_ids.device).expand(B, T))
        split = reasoner_input_ids is not None if prefill else (cache is not None and cache.split)
        gen_kwargs = {k: v for k, v in kwargs.items() if k in ("output_attentions", "output_hidden_states")}

        if split and prefill:
            r_ids = reasoner_input_ids.to(input_ids.device)
            if r_ids.dim() != 2 or r_ids.shape[0] != B:
                raise ValueError(f"reasoner_input_ids must be [B={B}, Q], got {tuple(r_ids.shape)}")
            r_mask = (torch.ones_like(r_ids) if reasoner_attention_mask is None
                      else reasoner_attention_mask.to(input_ids.device))
            if r_mask.shape != r_ids.shape:
                raise ValueError(f"reasoner_attention_mask {tuple(r_mask.shape)} != reasoner_input_ids "
                                 f"{tuple(r_ids.shape)}")
            if cache_for_step is not None:
                cache_for_step.split = True
                cache_for_step.extend_reasoner_mask(r_mask)
            worker = self._prefill_worker(B, T, use_cache, labels, gen_kwargs)
            if worker is not None and bool(local_mask[:, -1].all()):
                # Only the last prompt position needs a latent: the rest of G's prompt overlaps R's prefill.
                h, g_out = pipelined_split_prefill(self, worker, input_ids, attention_mask, position_ids,
                                                   local_mask, r_ids, r_mask, positions_from_mask(r_mask),
                                                   cache_for_step)
            else:
                h = self._reasoner_forward(r_ids, r_mask, positions_from_mask(r_mask), cache_for_step, use_cache)
                n_fused = (torch.ones(B, dtype=torch.long, device=input_ids.device) if labels is None
                           else self._split_fused_count(local_mask, labels))
                latent, lmask, prev = split_latents(h, *split_alignment(local_mask, r_mask, n_fused))
                emb = self._fuse(input_ids, latent, lmask, prev)
                g_out = self._generator_forward(emb, attention_mask, position_ids, cache_for_step, use_cache,
                                                **gen_kwargs)
            # pending latent: the reasoner's last *real* prompt position (its prompt may be right-padded)
            last = last_real_index(r_mask)  # [B], -1 for an all-pad row
            new_latents = (h[torch.arange(B, device=h.device), last.clamp_min(0)]
                           * (last >= 0)[:, None].to(h.dtype))[:, None]  # [B, 1, H_r]
        else:
            if split:  # decode chunk in split context: the reasoner's own mask/positions live in the cache
                r_mask = cache.extend_reasoner_mask(local_mask)
                r_pos = positions_from_mask(r_mask)[:, -T:]
            else:
                r_mask, r_pos = attention_mask, position_ids
            targets = None
            if prefill and not self.config.fuse_prompt:
                targets = (response_targets(labels) if labels is not None
                           else torch.arange(T, device=input_ids.device)[None, :].expand(B, T) == T - 1)
            src_mask = shared_source_mask(local_mask, targets)
            prev = None if prefill else cache.pending
            if not prefill and prev is None:
                raise ValueError("the cache holds generator states but no pending reasoner latent: build it with "
                                 "FlyThinkerForCausalLM (a FlyThinkerCache filled by its forward)")
            if prev is not None and targets is not None:
                prev = prev * targets[:, :1].to(prev.dtype)

            def rsn_fn() -> torch.Tensor:
                return self._reasoner_forward(input_ids, r_mask, r_pos, cache_for_step, use_cache)

            if not prefill and T == 1:
                # Decode step: position 0 only needs the pending latent, so fuse first and run both halves.
                H_r = self.config.reasoner.hidden_size
                # value checks cost a host sync per step on CUDA (it would stall the overlap): CPU only there
                emb = self._fuse(input_ids, prev.new_zeros(B, 1, H_r), None, prev,
                                 check_inputs=input_ids.device.type == "cpu")
                g_out, h = self._run_pair(
                    lambda: self._generator_forward(emb, attention_mask, position_ids, cache_for_step, use_cache,
                                                    **gen_kwargs), rsn_fn)
            elif prefill and (worker := self._prefill_worker(B, T, use_cache, labels, gen_kwargs)) is not None:
                # Shared context: R on chunk k+1 while G consumes chunk k (DESIGN.md 1; flythinker.concurrency).
                h, g_out = pipelined_shared_prefill(self, worker, input_ids, attention_mask, position_ids, src_mask,
                                                    prev, cache_for_step)
            else:
                h = rsn_fn()
                emb = self._fuse(input_ids, h, src_mask, prev)
                g_out = self._generator_forward(emb, attention_mask, position_ids, cache_for_step, use_cache,
                                                **gen_kwargs)
            new_latents = h * local_mask[..., None].to(h.dtype)  # history for crop; last = pending

        if cache_for_step is not None:
            cache_for_step.append_latents(new_latents)

        hidden = g_out.last_hidden_state
        loss = None
        logits = None
        if labels is not None:
            loss = self._lm_loss(hidden, labels, num_items_in_batch)
        if labels is None or self.config.loss_impl != "fused":
            logits = self._logits(hidden, logits_to_keep)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None,
                                     hidden_states=getattr(g_out, "hidden_states", None),
                                     attentions=getattr(g_out, "attentions", None))
        if return_dict is False:
            return out.to_tuple()
        return out

    @staticmethod
    def _split_fused_count(gen_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Split context, training: fused generator positions per row = from the one before the first labelled
        position to the last real one (at least 1: the last prompt position)."""
        n = last_real_index(gen_mask) - response_start(labels.to(gen_mask.device)) + 2
        return n.clamp_min(1)

    # ------------------------------------------------------------------ generate integration
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
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"FlyThinkerForCausalLM supports only the dynamic cache, got cache_implementation="
                             f"{generation_config.cache_implementation!r}")
        model_kwargs["cache"] = FlyThinkerCache(generator_config=self.config.generator,
                                                reasoner_config=self.config.reasoner)
        if generation_config.is_assistant:
            model_kwargs["cache"].activate_past_recording()


AutoConfig.register("flythinker", FlyThinkerConfig, exist_ok=True)
AutoModelForCausalLM.register(FlyThinkerConfig, FlyThinkerForCausalLM, exist_ok=True)

__all__ = ["FlyThinkerForCausalLM"]
