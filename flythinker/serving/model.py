"""`FlyThinkerForCausalLM` for vLLM: two vLLM decoder stacks, the latent fusion, and a paged latent cache.

One engine step (all scheduled tokens of all requests, flattened, `[N]`):

1. the reasoner's decoder stack (no LM head) turns the tokens into latents `h [N, H_r]` (its last norm's output);
2. `PagedLatentCache.exchange` stores `h` at each token's KV slot and returns, for each token at position p, the
   latent of position p - 1 of its own request (this step's or an earlier step's);
3. `flythinker.kernels.latent_fuse` (the library's op: the same rescaling, projection, lambda and mask rules as
   `flythinker.FlyThinkerForCausalLM`) builds the generator's input embeddings; position 0 gets no latent;
4. the generator's stack + LM head give the logits.

Both stacks are vLLM's own model classes (Llama, Qwen2, Mistral families), so both KV caches are vLLM's paged
caches and the model runs under vLLM's continuous batching, chunked prefill and preemption unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from flythinker.configuration import FlyThinkerConfig
from flythinker.latent_norm import BUFFERS as LATENT_NORM_BUFFERS
from flythinker.latent_norm import standardize_latent

# vLLM model classes a generator or reasoner may use (HF architectures of the sub-configs); others are refused.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def sub_architecture(config, role: str) -> str:
    """The vLLM class name for a sub-config (`role` names it in errors); ValueError for an unsupported family."""
    arch = SUPPORTED_ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        raise ValueError(f"flythinker serving: the {role} is a {getattr(config, 'model_type', None)!r} model; "
                         f"supported families: {sorted(SUPPORTED_ARCHITECTURES)}")
    return arch


def check_servable(config: FlyThinkerConfig) -> None:
    """Raise for a FlyThinker config the vLLM plugin cannot serve with the library's semantics."""
    if not isinstance(config, FlyThinkerConfig):
        raise TypeError(f"expected a FlyThinkerConfig, got {type(config).__name__}")
    config.check_fusion()
    sub_architecture(config.generator, "generator")
    sub_architecture(config.reasoner, "reasoner")
    if not config.fuse_prompt:
        # fuse_prompt=False fuses only from the last prompt position on, which needs each request's prompt length
        # inside the forward; vLLM's model interface does not carry it (docs/serving.md, "Limits").
        raise NotImplementedError("flythinker serving: fuse_prompt=False is not supported (the model forward "
                                  "does not see where a request's prompt ends); serve a fuse_prompt=True model")


class FlyThinkerForCausalLM(nn.Module):
    """vLLM model for a flythinker `save_pretrained` checkpoint (config `model_type="flythinker"`)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

        from flythinker.serving.latent_cache import PagedLatentCache

        config = vllm_config.model_config.hf_config
        check_servable(config)
        self.config = config
        self.generator = init_vllm_registered_model(
            vllm_config, hf_config=config.generator, prefix=maybe_prefix(prefix, "generator"),
            architectures=[sub_architecture(config.generator, "generator")])
        self.reasoner = init_vllm_registered_model(
            vllm_config, hf_config=config.reasoner, prefix=maybe_prefix(prefix, "reasoner"),
            architectures=[sub_architecture(config.reasoner, "reasoner")])
        H_g, H_r = config.generator.hidden_size, config.reasoner.hidden_size
        dtype = vllm_config.model_config.dtype
        self.latent_proj = (nn.Parameter(torch.zeros(H_g, H_r, dtype=dtype), requires_grad=False)
                            if config.projection in ("linear", "zero") else None)  # LEARNED_PROJECTIONS
        # latent_norm="standardize": the saved per-channel statistics (buffers in the HF model; parameters here so
        # that vLLM's loaded-weights check sees them)
        self.latent_stats = ({name: nn.Parameter(torch.zeros(H_r) if name == "latent_mean" else torch.ones(H_r),
                                                 requires_grad=False) for name in LATENT_NORM_BUFFERS}
                             if config.latent_norm == "standardize" else {})
        for name, p in self.latent_stats.items():
            self.register_parameter(name, p)
        self.latents = PagedLatentCache(H_r, cache_config=vllm_config.cache_config,
                                        # vLLM orders KV layers by the one integer in their name
                                        prefix=maybe_prefix(prefix, "latent_cache.0"))
        self.vocab_size = config.generator.vocab_size
        self._dtype = dtype
        self._norm_target: float | str | None = None  # resolved after the weights are loaded
        self.make_empty_intermediate_tensors = self.generator.make_empty_intermediate_tensors

    # ------------------------------------------------------------------ forward
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain generator embeddings `[N, H_g]` (vLLM calls this for prompt-embedding inputs only)."""
        return self.generator.embed_input_ids(input_ids)

    def _embedding_table(self) -> torch.Tensor:
        # vLLM pads the vocabulary of its embedding table (to a multiple of 64): the real rows come first
        return self.generator.model.embed_tokens.weight[: self.vocab_size]

    def _resolve_norm_target(self) -> float | str:
        if self._norm_target is None:
            from flythinker.kernels import vocab_mean_norm

            nt = self.config.norm_target
            # "vocab_mean" is a constant of the table: computed once (after loading), like the HF model's cache
            self._norm_target = float(vocab_mean_norm(self._embedding_table())) if nt == "vocab_mean" else nt
        return self._norm_target

    def fuse(self, input_ids: torch.Tensor, prev: torch.Tensor, has_prev: torch.Tensor) -> torch.Tensor:
        """Generator input embeddings `[N, H_g]`: E[x] + lam * m * c / max(||h_prev||, eps) * P(h_prev).

        input_ids `[N]`, prev `[N, H_r]` (the previous position's latent), has_prev `[N]` bool (the mask m).
        """
        from flythinker.kernels import latent_fuse

        cfg = self.config
        # latent_fuse's layout is [B, T]: one row per token with T = 1, the previous latent as `prev_latent`
        # (a zeroed row contributes exactly 0: its norm clamps to eps and it is multiplied by 0).
        src = prev * has_prev[:, None].to(prev.dtype)
        if self.latent_stats:  # zeroed rows (no previous latent) stay zero
            src = standardize_latent(src, self.latent_mean, self.latent_inv_std)
        emb = latent_fuse(input_ids[:, None], self._embedding_table(), src.new_zeros(src.shape[0], 1, src.shape[1]),
                          None, lam=float(cfg.fusion_lambda), norm_target=self._resolve_norm_target(),
                          projection=self.latent_proj, prev_latent=src, eps=float(cfg.latent_eps),
                          detach_norm=cfg.detach_norm, check_inputs=False, backend=self._fuse_backend(input_ids))
        return emb[:, 0]

    @staticmethod
    def _fuse_backend(input_ids: torch.Tensor) -> str | None:
        # On CPU the PyTorch twin: the C++ op is built on first use into torch's extension folder, which .venv and
        # .venv-vllm share under one name with different include paths, so each venv's first call rebuilt it
        # (docs/results.md, "Measurements behind design choices"); the fusion is a few elementwise ops per token
        # next to two decoder stacks. Elsewhere the dispatcher's choice (Triton on CUDA).
        return "torch" if input_ids.device.type == "cpu" else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """input_ids, positions: `[N]` (all scheduled tokens). Returns the generator's hidden states `[N, H_g]`."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("flythinker serving needs token ids: both models read them (prompt embeddings are "
                             "not supported)")
        if intermediate_tensors is not None:
            raise NotImplementedError("flythinker serving: pipeline parallelism is not supported")
        split = self._split_plan(input_ids, positions)
        if split is not None:
            return self._split_forward(input_ids, positions, split)
        h = self.reasoner.model(input_ids, positions, None)
        prev, has_prev = self.latents.exchange(h, positions)
        emb = self.fuse(input_ids, prev, has_prev)
        return self.generator.model(None, positions, None, inputs_embeds=emb)

    # ------------------------------------------------------------------ split context (flythinker/serving/split.py)
    def _split_plan(self, input_ids: torch.Tensor, positions: torch.Tensor):
        from flythinker.serving import split
        from flythinker.serving.requests import ROWS

        md = self.latents.metadata() if ROWS else None
        if md is None:
            return None
        n = int(md.num_actual_tokens)
        return split.plan(positions[:n], input_ids[:n], md.query_start_loc, ROWS)

    def _split_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, plan) -> torch.Tensor:
        """Each stack on its own tokens and positions (split.plan), latents stored by reasoner position."""
        from flythinker.serving.latent_cache import block_table
        from flythinker.serving.split import slots_of

        md = self.latents.metadata()
        table, block = block_table(md), self.latents._pages().shape[2]
        r, g = plan.reasoner, plan.generator
        if r.take.numel():
            with self._stack_metadata(self.reasoner, r):
                h = self.reasoner.model(input_ids[r.take], r.positions.to(positions), None)  # its own positions
            self.latents.write(h, slots_of(table, r.rows, r.positions, block))
        out = torch.zeros(input_ids.shape[0], self.config.generator.hidden_size, dtype=self._dtype,
                          device=input_ids.device)
        if g.take.numel():
            valid = plan.src_valid
            prev = self.latents.read(slots_of(table, g.rows, plan.src_positions.clamp_min(0), block), self._dtype)
            emb = self.fuse(input_ids[g.take], prev * valid[:, None].to(prev.dtype), valid)
            with self._stack_metadata(self.generator, g):
                out[g.take] = self.generator.model(None, g.positions.to(positions), None, inputs_embeds=emb)
        return out

    @contextlib.contextmanager
    def _stack_metadata(self, stack: nn.Module, tokens):
        """Hand one stack's attention layers metadata re-described for its tokens; restore the rest after."""
        from vllm.forward_context import get_forward_context
        from vllm.model_executor.layers.attention.attention import Attention

        from flythinker.serving.split import stack_metadata

        ctx = get_forward_context()
        mds, sms = ctx.attn_metadata, ctx.slot_mapping  # the layers read both (KV writes use slot_mapping)
        block = self.latents._pages().shape[2]
        saved, saved_slots, built = {}, {}, {}
        for mod in stack.modules():
            if isinstance(mod, Attention):
                name, md = mod.layer_name, mds[mod.layer_name]
                key = (id(md), mod.num_heads, mod.num_kv_heads, mod.head_size)
                if key not in built:
                    built[key] = stack_metadata(md, mod, tokens, block, self._dtype)
                saved[name], mds[name] = md, built[key]
                if name in sms:
                    saved_slots[name], sms[name] = sms[name], built[key].slot_mapping
        try:
            yield
        finally:
            mds.update(saved)
            sms.update(saved_slots)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.generator.compute_logits(hidden_states)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Route a flythinker checkpoint's tensors by prefix: `generator.*`, `reasoner.*`, `latent_proj.weight`."""
        parts: dict[str, list[tuple[str, torch.Tensor]]] = {"generator": [], "reasoner": []}
        loaded: set[str] = set()
        for name, tensor in weights:
            head, _, rest = name.partition(".")
            if head in parts:
                parts[head].append((rest, tensor))
            elif name == "latent_proj.weight" and self.latent_proj is not None:
                if tuple(tensor.shape) != tuple(self.latent_proj.shape):
                    raise ValueError(f"latent_proj.weight has shape {tuple(tensor.shape)}, expected "
                                     f"{tuple(self.latent_proj.shape)}")
                self.latent_proj.data.copy_(tensor)
                loaded.add("latent_proj")  # the parameter's own name (vLLM compares with named_parameters)
            elif name in self.latent_stats:
                self.latent_stats[name].data.copy_(tensor.reshape(self.latent_stats[name].shape))
                loaded.add(name)
            else:
                raise ValueError(f"flythinker serving: unexpected tensor {name!r} in the checkpoint")
        for role, items in parts.items():
            sub = getattr(self, role)
            loaded |= {f"{role}.{n}" for n in sub.load_weights(items)}
        self._norm_target = None
        return loaded


__all__ = ["FlyThinkerForCausalLM", "SUPPORTED_ARCHITECTURES", "check_servable", "sub_architecture"]
