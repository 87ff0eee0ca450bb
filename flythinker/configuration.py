"""FlyThinkerConfig: the generator and reasoner configs as sub-configs plus the fusion fields (docs/design.md).

Naming the generator sub-config `generator` makes `config.get_text_config(decoder=True)` resolve to it, so HF's
generation plumbing (eos/pad ids, default cache config, ...) sees the generator.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.utils import logging

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.24 (vLLM's pin, .venv-vllm): sub-configs are declared with `sub_configs`
    SubConfigSpec = None

from flythinker.options import (  # the option names and choices live in one light module (the CLI reads them)
    FUSION_FIELDS,
    IGNORE_INDEX,
    LATENT_NORMS,
    LOSS_IMPLS,
    NORM_TARGETS,
    PARALLEL_MODES,
    PROJECTIONS,
    SPECIAL_TOKENS,
)

logger = logging.get_logger(__name__)


class FlyThinkerConfig(PreTrainedConfig):
    r"""Configuration of a [`FlyThinkerForCausalLM`].

    Args:
        generator, reasoner: the two causal LMs' configs (config objects or dicts with a `model_type`).
        fusion_lambda: weight of the fused latent (0 reproduces the generator exactly). Finite, in [0, 100].
        norm_target: `"vocab_mean"` (mean row norm of the generator's input embedding table), `"token"` (the norm
            of the current token's embedding) or a positive float (fixed).
        projection: `"pad"` (add into the first H_r channels; needs H_r <= H_g), `"linear"` (learned H_r -> H_g,
            initialised to the pad map) or `"zero"` (learned H_r -> H_g, initialised to zero: an untrained pair
            computes exactly what its generator alone computes, at any lambda; docs/fusion.md). The config's
            default stays `"pad"` (a saved config without the field keeps its meaning); `from_pair` defaults to
            `"zero"`.
        detach_norm: treat the latent norms as constants in backward (authors' choice).
        fuse_prompt: shared context only. True (paper): fuse at every position. False: fuse only on the
            response side, i.e. the generator's last prompt position and every later one. "Response" is defined
            by `labels` in training (first position whose label is not IGNORE_INDEX) and, without labels, by the cache:
            in a forward on an empty cache (prefill) only the last position is fused, decode steps always are.
        parallel: `"auto" | "off" | "threads" | "streams"`: how a decode step runs the two models. A runtime
            default, not part of the model: see below.
        loss_impl: `"fused"` (memory-lean linear + cross-entropy, no logits materialised when labels are given)
            or `"naive"` (lm_head + cross_entropy). A runtime default, not part of the model: see below.
        latent_eps: clamp of the latent norm in the rescaling.
        latent_norm: `"none"` (the paper) or `"standardize"`: each latent is centred and scaled per channel,
            `(h - latent_mean) * latent_inv_std`, before the rescale and projection. The statistics are buffers saved
            with the model, identity until `flythinker.latent_norm.calibrate_latent_norm` sets them from the latents
            the pair fuses on training data. A pretrained reasoner's final hidden state is almost all its mean, so
            without this a learned projection sees the person only in a small residual (docs/fusion.md).

    What config.json holds defines the model; `parallel` and `loss_impl` choose how it runs (the same numbers
    either way), so they are the defaults of the call arguments `generate(parallel=...)` / `forward(parallel=...)`
    and `forward(loss_impl=...)`: settable here (constructor, `from_pair`, `config.parallel = ...`) for this
    process, never written to config.json (`to_dict`), and ignored when a config.json saved before still has them
    (a warning names a non-default value), so the loaded pair runs with the defaults.
    """

    model_type = "flythinker"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "generator": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
            "reasoner": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        }
    else:
        sub_configs = {"generator": AutoConfig, "reasoner": AutoConfig}

    generator: dict | PreTrainedConfig | None = None
    reasoner: dict | PreTrainedConfig | None = None
    fusion_lambda: float = 0.5
    norm_target: str | float = "vocab_mean"
    projection: str = "pad"
    detach_norm: bool = True
    fuse_prompt: bool = True
    parallel: str = "auto"
    loss_impl: str = "fused"
    latent_eps: float = 1e-6
    latent_norm: str = "none"
    tie_word_embeddings: bool = False  # the generator sub-config decides its own tying

    def __post_init__(self, **kwargs: Any):
        # HF configs accept arbitrary extra keys (hub BC); we reject the ones that look like a fusion option (a
        # misspelling, or a key naming one of its words such as `lam`), which would otherwise be silently ignored,
        # and warn about the rest.
        for key in kwargs:
            if _looks_like_fusion_option(key):
                raise _unknown_option(key)
            if key not in _KNOWN_EXTRA_KEYS:
                logger.warning("FlyThinkerConfig: unknown key %r kept but not used by FlyThinker (fusion options: "
                               "%s)", key, list(FUSION_FIELDS))
        if SubConfigSpec is None:
            _resolve_sub_configs(self)
        super().__post_init__(**kwargs)
        self.check_fusion()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> FlyThinkerConfig:
        """`PreTrainedConfig.from_dict`, minus the runtime defaults an older config.json may hold (`RUNTIME_FIELDS`:
        ignored, a warning names a non-default value). Passing them as keyword arguments still sets them."""
        config_dict = dict(config_dict)
        for name in RUNTIME_FIELDS:
            if name in config_dict and config_dict.pop(name) != getattr(cls, name):
                logger.warning("FlyThinkerConfig: the saved %s is ignored (a runtime choice, not part of the model: "
                               "pass %s= to the call, or set config.%s)", name, name, name)
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The serialisable config (what config.json holds): every field but the runtime defaults
        (`RUNTIME_FIELDS`)."""
        out = super().to_dict()
        for name in RUNTIME_FIELDS:
            out.pop(name, None)
        return out

    def check_fusion(self) -> None:
        """Raise ValueError/TypeError naming the problem if a fusion field is invalid (also re-run by the model)."""
        lam = self.fusion_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise TypeError(f"fusion_lambda must be a float, got {type(lam).__name__}")
        if not math.isfinite(lam) or not 0.0 <= lam <= 100.0:
            raise ValueError(f"fusion_lambda must be finite and in [0, 100], got {lam}")
        nt = self.norm_target
        if isinstance(nt, str):
            if nt not in NORM_TARGETS:
                raise ValueError(f"norm_target must be one of {NORM_TARGETS} or a positive float, got {nt!r}")
        elif isinstance(nt, bool) or not isinstance(nt, (int, float)) or not math.isfinite(nt) or nt <= 0:
            raise ValueError(f"norm_target must be one of {NORM_TARGETS} or a positive finite float, got {nt!r}")
        for name, allowed in (("projection", PROJECTIONS), ("parallel", PARALLEL_MODES), ("loss_impl", LOSS_IMPLS),
                              ("latent_norm", LATENT_NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("detach_norm", "fuse_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not (isinstance(self.latent_eps, (int, float)) and self.latent_eps > 0):
            raise ValueError(f"latent_eps must be a positive float, got {self.latent_eps!r}")
        self.check_pair()

    def check_pair(self) -> None:
        """The two models must share one vocabulary; "pad" needs H_r <= H_g."""
        g, r = self.generator, self.reasoner
        if g is None or r is None:
            return
        gv, rv = getattr(g, "vocab_size", None), getattr(r, "vocab_size", None)
        if gv != rv:
            raise ValueError(
                f"generator and reasoner must share one vocabulary: vocab_size {gv} (generator) != {rv} (reasoner)")
        for tok in SPECIAL_TOKENS:
            a, b = getattr(g, tok, None), getattr(r, tok, None)
            if a is not None and b is not None and a != b:
                raise ValueError(f"generator and reasoner disagree on special token {tok}: {a} vs {b} "
                                 "(they must share one tokenizer)")
        if self.projection == "pad" and r.hidden_size > g.hidden_size:
            raise ValueError(
                f'projection="pad" needs reasoner hidden size <= generator hidden size, got H_r={r.hidden_size} > '
                f'H_g={g.hidden_size}; use projection="linear"')


def _resolve_sub_configs(config: FlyThinkerConfig) -> None:
    """transformers < 5.24: build the sub-config objects from dicts (or defaults), as `sub_configs_defaults` does."""
    from transformers import CONFIG_MAPPING

    for key in ("generator", "reasoner"):
        value = getattr(config, key)
        if value is None or isinstance(value, dict):
            value = dict(value or {})
            setattr(config, key, CONFIG_MAPPING[value.pop("model_type", "llama")](**value))


def fusion_kwargs_check(kwargs: dict[str, Any]) -> None:
    """Reject unknown fusion options by name (from_pair and friends)."""
    for key in sorted(set(kwargs) - set(FUSION_FIELDS)):
        raise _unknown_option(key)


# Fields that choose how the model runs, not what it computes: kept on the config object as the defaults of the call
# arguments of the same name, never saved (to_dict), ignored in a saved config (from_dict).
RUNTIME_FIELDS = ("parallel", "loss_impl")
# Extra keys that reach __post_init__ legitimately: HF's own (model_type from config.json, the attn/experts
# implementation setters) and flythinker's shared-base description (flythinker.shared_base).
_KNOWN_EXTRA_KEYS = frozenset({"model_type", "attn_implementation", "experts_implementation", "shared_base"})
# words of the fusion fields' names, and the abbreviations users type for them: a key made of one of these
# (`lam`, `lambda_weight`, `Fusion_Lambda`) names a fusion option that does not exist
_FUSION_WORDS = {"lam": "fusion_lambda", "lambda": "fusion_lambda", "fusion": "fusion_lambda",
                 "latent": "latent_eps", "proj": "projection", "projection": "projection"}


def _looks_like_fusion_option(key: str) -> bool:
    """Whether an unknown config key `key` was meant as a fusion option (rejected, not ignored)."""
    low = key.lower()
    if low in FUSION_FIELDS or difflib.get_close_matches(low, FUSION_FIELDS, n=1, cutoff=0.75):
        return True
    return any(word in _FUSION_WORDS for word in low.replace("-", "_").split("_"))


def _unknown_option(key: str) -> ValueError:
    low = key.lower()
    near = difflib.get_close_matches(low, FUSION_FIELDS, n=1, cutoff=0.75) or [
        _FUSION_WORDS[w] for w in low.replace("-", "_").split("_") if w in _FUSION_WORDS][:1]
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ValueError(f"unknown FlyThinker option {key!r}{hint}; known: {list(FUSION_FIELDS)}")


__all__ = ["FlyThinkerConfig", "IGNORE_INDEX", "LOSS_IMPLS", "NORM_TARGETS", "PARALLEL_MODES", "PROJECTIONS",
           "RUNTIME_FIELDS"]
