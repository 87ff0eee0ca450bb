"""Serving a FlyThinker pair with vLLM (docs/serving.md).

vLLM finds the plugin through the entry point group `vllm.general_plugins` (pyproject.toml) and calls `register()`
in every vLLM process (API server, engine core, workers). It registers the `flythinker` config type with
transformers' AutoConfig and the architecture `FlyThinkerForCausalLM` with vLLM's ModelRegistry (lazily: the model
module is imported only when a flythinker checkpoint is loaded).

`register()` also makes vLLM's input processor check every request with
`flythinker.serving.requests.check_admitted` on the prompt ids the engine will run (after templating and
truncation): a request that could not run is answered 400 (vLLM's VLLMValidationError) and never reaches the
engine, where one bad request would stop the engine for all.

Nothing here is imported by `import flythinker`: vLLM lives in its own virtualenv (`make install-vllm`).
"""

from __future__ import annotations

ARCHITECTURE = "FlyThinkerForCausalLM"
MODEL_CLASS = "flythinker.serving.model:FlyThinkerForCausalLM"


def register() -> None:
    """vLLM general-plugin hook: make flythinker checkpoints loadable by vLLM (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from flythinker.configuration import FlyThinkerConfig

    AutoConfig.register("flythinker", FlyThinkerConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    install_admission_check()


def install_admission_check() -> None:
    """Wrap vLLM's `InputProcessor.process_inputs` (idempotent) so that the request it builds is checked by
    `check_admitted` before it is queued; the ValueError becomes the client's 400."""
    import functools

    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_flythinker_checked", False):
        return

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        from flythinker.serving.requests import check_admitted

        request = original(self, *args, **kwargs)
        if request.sampling_params is not None:
            try:
                check_admitted(request.prompt_token_ids, request.sampling_params)
            except ValueError as exc:  # a client error (400): vLLM answers a plain ValueError here with a bare 500
                raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None
        return request

    process_inputs._flythinker_checked = True
    InputProcessor.process_inputs = process_inputs


__all__ = ["register", "install_admission_check", "ARCHITECTURE", "MODEL_CLASS"]
