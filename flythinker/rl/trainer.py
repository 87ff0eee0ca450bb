"""GRPO on a FlyThinker pair through TRL's ``GRPOTrainer`` (pinned in the ``rl`` extra: ``trl==1.16.0``).

What the subclass changes, and why:

- **Split context.** A dataset column ``reasoner_prompt_ids`` (token ids of the reasoner's long view, one list per
  row) reaches ``generate`` (as ``reasoner_input_ids``/``reasoner_attention_mask``) and every log-prob forward (the
  policy's, the old policy's and the reference's). The log-probs come from the pair's split-context training
  forward (reasoner prompt + completion, generator prompt + completion, aligned at the response start), so the
  generator's positions receive the same reasoner latents as during sampling (docs/design.md).
  Without that column the pair runs in shared context (one ordinary forward).
- **Exact prompt ids.** With a ``prompt_ids`` column the trainer uses those ids (e.g. from
  :func:`flythinker.persona.build_views`) instead of re-tokenising the ``prompt`` text.
- **Log-probs through the fusion.** TRL 1.16 patches the model with a "fused LM head" that calls
  ``model.base_model(...).last_hidden_state`` and the LM head itself. ``base_model`` is the fused pair
  (``FlyThinkerModel``), so in shared context that head sees the fused states; but the patched head hands the
  backbone no labels, and a split-context forward needs them to find the response start (without them only the
  last prompt position is fused). So the log-probs come from the pair's own forward (``logits_to_keep``
  positions, then a log-softmax at the sampling temperature), one path for both contexts; the patched head is
  never used.
- **Refused** with a clear error: ``use_liger_kernel`` (its kernels patch modules by model type and would bypass or
  break the fusion), ``use_vllm`` and transformers continuous batching (neither knows the reasoner), tools and
  ``rollout_func`` (their prompts would not carry reasoner ids).
- **Checkpoints** (``save_strategy="steps"``) are flythinker's (:class:`flythinker.training.trainer.
  PickleFreeCheckpoints`): the pair reloads with ``from_pretrained``, optimizer / scheduler / RNG state are
  safetensors + JSON (never unpickled), each checkpoint appears atomically, and ``train(resume_from_checkpoint=
  True)`` continues from the newest complete one.
- **Reasoner prompt reuse** (``reuse_reasoner_prompts``, default: on where valid). The G completions of a
  group share one reasoner prompt, so with a frozen reasoner (e.g. :func:`train_only` ``["fusion"]``, or LoRA on
  the generator alone) its prefill is the same for all of them and for every forward of the batch. Each distinct
  reasoner prompt of a generation batch then runs through the reasoner once (per reasoner: the policy's, and the
  reference's when there is one), and ``generate`` and every log-prob forward copy its KV entries and latents
  (:class:`flythinker.reasoner_prefix_cache.PromptReuse`); the reasoner still reads each completion. Valid only
  in split context with a reasoner that has no trainable parameter, no active dropout and no sliding-window
  layers; otherwise off, with the reason in ``trainer.reasoner_reuse_reason`` (and a log line).
- **Reference model** for ``beta > 0`` without PEFT: a frozen copy of the policy taken at construction (TRL would
  rebuild it from ``config._name_or_path``, which an in-memory pair does not have). With PEFT TRL disables the
  adapter instead.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

try:  # the `rl` extra
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import unwrap_model_for_generation
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("flythinker.rl needs TRL: pip install 'flythinker[rl]' (trl==1.16.0)") from e

from flythinker.configuration import IGNORE_INDEX
from flythinker.decode import left_pad
from flythinker.modeling import LIGER_REFUSAL, FlyThinkerForCausalLM
from flythinker.reasoner_prefix_cache import PromptReuse, reusing_prompts
from flythinker.training.reasoner_cache import frozen_reasoner_problem
from flythinker.training.trainer import PickleFreeCheckpoints

logger = logging.getLogger(__name__)

REASONER_COLUMN = "reasoner_prompt_ids"
PROMPT_IDS_COLUMN = "prompt_ids"


def _pair_of(model: Any) -> FlyThinkerForCausalLM | None:
    """The FlyThinker pair inside ``model`` (itself, or under a PEFT / accelerate wrapper), else None."""
    seen = model
    for _ in range(4):
        if isinstance(seen, FlyThinkerForCausalLM):
            return seen
        nxt = getattr(seen, "get_base_model", None)
        seen = nxt() if callable(nxt) else getattr(seen, "module", None)
        if seen is None:
            return None
    return None


def completion_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                     temperature: float = 1.0, reasoner_input_ids: torch.Tensor | None = None,
                     reasoner_attention_mask: torch.Tensor | None = None, compute_entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``[B, K]`` (and entropies ``[B, K]``) of the last ``K = logits_to_keep`` tokens of
    ``input_ids [B, P + K]`` under ``model`` (a FlyThinker pair, possibly PEFT-wrapped), at ``temperature``.

    Split context (``reasoner_input_ids [B, Q]`` given, the reasoner's prompt; the completion is appended to it
    here): one forward of the pair's training path, where the labels mark the response start (docs/design.md:
    generator position P-1+k receives reasoner position Q-2+k), i.e. the same fused inputs as the decode steps
    that sampled the completion. That path needs labels, and with ``loss_impl="fused"`` it returns no logits, so
    the call asks for ``loss_impl="naive"`` (the one labelled token per row makes its loss nearly free; the logits
    cost one LM-head pass over the whole row).
    """
    K = int(logits_to_keep)
    P = input_ids.shape[1] - K
    if K <= 0 or P <= 0:
        raise ValueError(f"need a prompt and at least one completion token, got P={P}, K={K}")
    if reasoner_input_ids is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=K + 1,
                       use_cache=False).logits[:, :-1]
    else:
        pair = _pair_of(model)
        if pair is None:
            raise TypeError(f"split-context log-probs need a FlyThinker pair, got {type(model).__name__}")
        r_ids = torch.cat([reasoner_input_ids, input_ids[:, P:]], dim=1)
        r_mask = torch.cat([reasoner_attention_mask.to(attention_mask.dtype), attention_mask[:, P:]], dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, P] = torch.where(attention_mask[:, P].bool(), input_ids[:, P], IGNORE_INDEX)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, reasoner_input_ids=r_ids,
                       reasoner_attention_mask=r_mask, labels=labels, logits_to_keep=K + 1, use_cache=False,
                       loss_impl="naive").logits[:, :-1]
    logits = logits.float() / temperature
    logp = F.log_softmax(logits, dim=-1)
    tok = torch.gather(logp, -1, input_ids[:, P:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1) if compute_entropy else None
    return tok, ent


TRAINABLE_PARTS = ("fusion", "lora")


def train_only(model: Any, parts: tuple[str, ...] | list[str] = ("fusion",)) -> int:
    """Freeze every parameter of ``model`` (a pair, possibly with adapters) except ``parts``: ``"fusion"`` (the
    learned latent projection ``latent_proj``) and/or ``"lora"`` (every LoRA adapter tensor already on the
    model, e.g. a shipped pair's). Cheaper GRPO: no weight gradients or optimizer state for the frozen models,
    and no reasoner backward at all when only the fusion and the generator train. Returns the number of
    trainable parameters (an error when it is 0)."""
    unknown = set(parts) - set(TRAINABLE_PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {TRAINABLE_PARTS}, got {list(parts)}")
    n = 0
    for name, p in model.named_parameters():
        keep = ("fusion" in parts and "latent_proj" in name) or ("lora" in parts and "lora_" in name)
        p.requires_grad_(keep)
        n += p.numel() if keep else 0
    if n == 0:
        raise ValueError(f"no parameter of {type(model).__name__} belongs to {list(parts)} (a pair with "
                         "projection='pad' has no learned fusion; a pair without adapters has no LoRA)")
    return n


class FlyThinkerGRPOTrainer(PickleFreeCheckpoints, GRPOTrainer):
    """``GRPOTrainer`` for a :class:`FlyThinkerForCausalLM` policy (see the module docstring for what changes).

    Arguments are those of ``trl.GRPOTrainer``; ``model`` must be a pair object (not a hub name), and
    ``reuse_reasoner_prompts``: compute each distinct reasoner prompt of a generation batch once and reuse it in
    ``generate`` and every log-prob forward (module docstring). None (default): on where valid; True: on, or a
    ValueError saying why it is not valid; False: off. The decision: ``reasoner_reuse`` (bool) and
    ``reasoner_reuse_reason``; what it did: ``prompt_reuse.stats`` (None when off).
    """

    def __init__(self, model: FlyThinkerForCausalLM, reward_funcs: Any, args: GRPOConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 peft_config: Any = None, reuse_reasoner_prompts: bool | None = None, **kwargs: Any):
        if _pair_of(model) is None:
            raise TypeError(f"FlyThinkerGRPOTrainer needs a FlyThinkerForCausalLM policy, got {type(model).__name__}")
        args = args if args is not None else GRPOConfig(output_dir="grpo-out")
        self._check_args(args, kwargs)
        self._split = train_dataset is not None and REASONER_COLUMN in getattr(train_dataset, "column_names", [])
        beta = args.beta
        own_ref = beta != 0.0 and peft_config is None and not hasattr(model, "peft_config")
        ref = copy.deepcopy(model).eval().requires_grad_(False) if own_ref else None
        if own_ref:
            args.beta = 0.0  # keep TRL from rebuilding the reference from a hub name
        try:
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                             **kwargs)
        finally:
            args.beta = beta
        if own_ref:
            self.beta = beta
            self.ref_model = ref.to(self.accelerator.device)
        self._rows: list[dict] | None = None
        self._reasoner: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reasoner_reuse, self.reasoner_reuse_reason = self._decide_reuse(reuse_reasoner_prompts)
        self.prompt_reuse = PromptReuse() if self.reasoner_reuse else None
        logger.info("reasoner prompt reuse: %s (%s)", "on" if self.reasoner_reuse else "off",
                    self.reasoner_reuse_reason)

    def _decide_reuse(self, requested: bool | None) -> tuple[bool, str]:
        """(on, why) for ``reuse_reasoner_prompts=requested``; True where it is not valid is an error."""
        if requested is False:
            return False, "turned off (reuse_reasoner_prompts=False)"
        pair = _pair_of(self.model)
        problem = None
        if not self._split:
            problem = f"shared context (no '{REASONER_COLUMN}' column): the reasoner reads the generator's prompt"
        else:  # the policy trains in training mode: judge its dropout as there
            problem = frozen_reasoner_problem(pair.reasoner, training=True)
            layer_types = getattr(pair.config.reasoner, "layer_types", None) or ()
            if problem is None and "sliding_attention" in layer_types:
                problem = "sliding-window reasoner layers"
        if problem is not None:
            if requested:
                raise ValueError(f"reuse_reasoner_prompts=True is not valid here: {problem}")
            return False, problem
        return True, "split context, frozen reasoner without dropout: each distinct prompt runs once per batch"

    def _reusing(self, model: Any):
        """The context in which ``model``'s forwards reuse this batch's reasoner prompts (a no-op when off)."""
        pair = _pair_of(model)
        return reusing_prompts(pair, self.prompt_reuse) if self.prompt_reuse is not None and pair else nullcontext()

    @staticmethod
    def _check_args(args: GRPOConfig, kwargs: dict) -> None:
        refusals = {
            "use_liger_kernel": LIGER_REFUSAL.split(": ", 1)[1],
            "use_vllm": "vLLM generation does not know the reasoner (no latent fusion)",
            "use_transformers_continuous_batching": "continuous batching does not pass the reasoner prompt",
        }
        for name, why in refusals.items():
            if getattr(args, name, False):
                raise ValueError(f"{name}=True is not supported for a FlyThinker policy: {why}")
        for name in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(name):
                raise ValueError(f"{name} is not supported for a FlyThinker policy (its prompts would not carry "
                                 "the reasoner view)")

    # ------------------------------------------------------------------ rows -> prompts / reasoner ids
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._rows = inputs
        self._reasoner = None
        if self._split:
            missing = [i for i, x in enumerate(inputs) if not x.get(REASONER_COLUMN)]
            if missing:
                raise ValueError(f"rows {missing[:5]} have an empty '{REASONER_COLUMN}'")
            pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
            self._reasoner = left_pad([list(x[REASONER_COLUMN]) for x in inputs], pad, self.accelerator.device)
            if self.prompt_reuse is not None:  # this batch's prompts; the previous batch's prefills are dropped
                self.prompt_reuse.begin(x[REASONER_COLUMN] for x in inputs)
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._rows = None
        if self._reasoner is not None:
            out["reasoner_input_ids"], out["reasoner_attention_mask"] = self._reasoner
        self._reasoner = None
        return out

    def _tokenize_prompts(self, prompts: list):
        if self._rows is not None and PROMPT_IDS_COLUMN in self._rows[0]:
            if len(self._rows) != len(prompts):
                raise RuntimeError(f"{len(prompts)} prompts but {len(self._rows)} rows")
            return [list(x[PROMPT_IDS_COLUMN]) for x in self._rows], None, {}
        return super()._tokenize_prompts(prompts)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields:
            raise ValueError("multimodal inputs are not supported for a FlyThinker policy")
        device = self.accelerator.device
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        ids, mask = left_pad([list(p) for p in prompt_ids], pad, device)
        gen_inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self._reasoner is not None:
            gen_inputs["reasoner_input_ids"], gen_inputs["reasoner_attention_mask"] = self._reasoner
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          generation_kwargs=self.generation_kwargs) as unwrapped,
              torch.no_grad(), self._reusing(unwrapped)):
            out = unwrapped.generate(**gen_inputs, generation_config=self.generation_config)
        completion = out[:, ids.shape[1]:]
        is_eos = torch.isin(completion, torch.tensor(self.eos_token_ids, device=completion.device))
        eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=completion.device)
        has = is_eos.any(dim=1)
        eos_idx[has] = is_eos.int().argmax(dim=1)[has]
        keep = torch.arange(is_eos.size(1), device=completion.device)[None, :] <= eos_idx[:, None]
        return [c[m].tolist() for c, m in zip(completion.cpu(), keep.cpu())], None

    # ------------------------------------------------------------------ log-probs through the fusion
    def _compute_loss(self, model, inputs):
        self._reasoner = ((inputs["reasoner_input_ids"], inputs["reasoner_attention_mask"])
                          if "reasoner_input_ids" in inputs else None)
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._reasoner = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **unused):
        if any(v is not None for v in unused.values()):
            raise ValueError(f"multimodal inputs are not supported for a FlyThinker policy: {sorted(unused)}")
        if self._split and self._reasoner is None:
            raise RuntimeError("split-context log-probs requested without the batch's reasoner prompts")
        batch_size = batch_size or input_ids.size(0)
        logps, ents = [], []
        for s in range(0, input_ids.size(0), batch_size):
            e = min(s + batch_size, input_ids.size(0))
            r_ids = r_mask = None
            if self._reasoner is not None:
                r_ids, r_mask = self._reasoner[0][s:e], self._reasoner[1][s:e]
            with self.accelerator.autocast(), self._reusing(model):
                lp, ent = completion_logps(model, input_ids[s:e], attention_mask[s:e], logits_to_keep,
                                           self.temperature, r_ids, r_mask, compute_entropy)
            logps.append(lp)
            if compute_entropy:
                ents.append(ent)
        return torch.cat(logps), (torch.cat(ents) if compute_entropy else None), None


__all__ = ["FlyThinkerGRPOTrainer", "GRPOConfig", "PROMPT_IDS_COLUMN", "REASONER_COLUMN", "TRAINABLE_PARTS",
           "completion_logps", "train_only"]
