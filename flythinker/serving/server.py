"""`flythinker serve CHECKPOINT`: vLLM's own OpenAI-compatible server with the flythinker plugin loaded.

The server is vLLM's (`vllm serve`: continuous batching, paged KV cache, /v1/chat/completions with streaming, 4xx
answers for malformed requests); flythinker adds the model (found through the plugin entry point in every vLLM
process) and one ASGI middleware, `ReasonerViewMiddleware`, for split context: a chat request's reasoner view
(`reasoner_messages` / `reasoner_prompt`) becomes vLLM's split form (both views in one prompt, the reasoner view's
length in `vllm_xargs`), and a malformed reasoner view gets a clear 400 instead of being dropped silently as an
unknown field (docs/serving.md).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

# Split context through the API (docs/serving.md):
#   chat:        {"messages": [...generator view...], "reasoner_messages": [...]} (or "reasoner_prompt": "text",
#                one user turn); the middleware renders both views with the checkpoint's chat template, sends vLLM
#                the reasoner view followed by the generator view and the view's token count in vllm_xargs
#   completions: {"prompt": reasoner_ids + generator_ids, "vllm_xargs": {"flythinker_reasoner_tokens": Q}}
CHAT_FIELDS = ("reasoner_messages", "reasoner_prompt")
OTHER_FIELDS = ("reasoner_prompt_ids", "reasoner_view", "persona_record")
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
CHECKPOINT_ENV = "FLYTHINKER_SERVE_CHECKPOINT"
# the reasoner view (rendered here by the model's own template) first, then the generator view (rendered by vLLM
# with the same template). Not a template that reassigns `messages` around two copies of the original: vLLM's API
# server hung on that one (seen in testing; its template analysis follows variable assignments).
_JOIN = "{{ flythinker_reasoner_text }}{TEMPLATE}"


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and this message."""


class ServeError(ValueError):
    """A bad `flythinker serve` invocation (missing checkpoint, not a flythinker folder, no vLLM here)."""


def check_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder, checked: a `config.json` with `model_type: "flythinker"` and a tokenizer."""
    folder = Path(path)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ServeError(f"{folder} is not a model folder (no config.json)")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ServeError(f"{cfg} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ServeError(f"{cfg} is not a JSON object")
    model_type = config.get("model_type")
    if model_type != "flythinker":
        raise ServeError(f"{folder} holds a {model_type!r} model, not a flythinker pair (save one with "
                         "FlyThinkerForCausalLM.save_pretrained; a plain model can be served with `vllm serve`)")
    if config.get("shared_base"):  # base weights once + per-half adapters: the vLLM model loads two plain halves
        raise ServeError(f"{folder} is a shared-base pair (one base, two LoRA adapters); vLLM serving takes a "
                         "two-copy pair: save one with each half's adapter merged, "
                         "FlyThinkerForCausalLM.from_pretrained(folder).to_two_copies().save_pretrained(out) "
                         "(and the tokenizer beside it)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ServeError(f"{folder} has no tokenizer: save the pair's tokenizer into it (tokenizer.save_pretrained)")
    from flythinker.checkpoint import CheckpointError, check_folder

    try:  # the weights before vLLM starts: a truncated or corrupt safetensors file is named here, not in an engine
        check_folder(folder)
    except CheckpointError as exc:
        raise ServeError(str(exc)) from None
    return folder


def vllm_argv(checkpoint: Path, *, host: str, port: int, dtype: str, max_model_len: int | None,
              kv_cache_gib: float | None, enforce_eager: bool, served_model_name: str | None,
              extra: list[str]) -> list[str]:
    """The `vllm serve` command line for a checked flythinker checkpoint."""
    # --trust-request-chat-template: the middleware sends the split-context template per request; it refuses
    # client-supplied templates, so clients get no more than with vLLM's default
    argv = ["serve", str(checkpoint), "--host", host, "--port", str(port), "--dtype", dtype,
            "--middleware", "flythinker.serving.server.ReasonerViewMiddleware", "--trust-request-chat-template"]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if kv_cache_gib is not None:
        argv += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * (1 << 30)))]
    if enforce_eager:
        argv.append("--enforce-eager")
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    return argv + list(extra)


def exec_vllm(argv: list[str]) -> None:
    """Replace this process by vLLM's CLI with ARGV (`python -m flythinker.serving.launch`, see there; signals then
    reach vLLM directly)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ServeError("vLLM is not installed in this environment: run `make install-vllm` and use "
                         ".venv-vllm/bin/flythinker serve (vLLM pins an older transformers, so it has its own "
                         "virtualenv)") from None
    os.environ[CHECKPOINT_ENV] = str(argv[1])  # the middleware loads the tokenizer from it
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "flythinker.serving.launch", *argv])


def rewrite_body(body: bytes, path: str, tokenizer_loader) -> bytes | None:
    """The request body vLLM should see (None: unchanged); RequestError for a bad reasoner view."""
    data = _parse(body)
    if data is None:
        return None
    xargs = data.get("vllm_xargs") or {}
    for field in (*CHAT_FIELDS, *OTHER_FIELDS):
        if field in xargs:
            raise RequestError(f"{field!r} goes at the top level of the request, not in vllm_xargs")
    for field in OTHER_FIELDS:
        if field in data:
            raise RequestError(f"unknown field {field!r}: send the reasoner view as 'reasoner_messages' (a list of "
                               "chat messages) or 'reasoner_prompt' (text) to /v1/chat/completions, or as prompt "
                               "ids + vllm_xargs.flythinker_reasoner_tokens to /v1/completions")
    if path == COMPLETIONS_PATH:
        checked = _check_completion(data, xargs)
        return None if checked is None else json.dumps(checked).encode()
    if "chat_template" in data:
        raise RequestError("a per-request chat_template is not accepted (the server's template renders both views)")
    views = [f for f in CHAT_FIELDS if f in data]
    if not views:
        return None
    if path != CHAT_PATH or len(views) > 1:
        raise RequestError(f"give one reasoner view ('reasoner_messages' or 'reasoner_prompt') to {CHAT_PATH}")
    return json.dumps(_split_chat(data, views[0], tokenizer_loader)).encode()


def _parse(body: bytes) -> dict | None:
    """The request's JSON object (None: not an object, or not JSON: vLLM answers that itself with a 400)."""
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    except RecursionError:
        raise RequestError("the request body is nested too deeply to parse") from None
    if not isinstance(data, dict):
        return None
    for field in ("vllm_xargs", "chat_template_kwargs"):
        if data.get(field) is not None and not isinstance(data[field], dict):
            raise RequestError(f"{field} must be an object, got {type(data[field]).__name__}")
    return data


def _check_completion(data: dict, xargs: dict) -> dict | None:
    from flythinker.serving.requests import PROMPT_XARG, XARG

    for field in CHAT_FIELDS:
        if field in data:
            raise RequestError(f"{field!r} is for {CHAT_PATH}; on {COMPLETIONS_PATH} send prompt = reasoner ids + "
                               f"generator ids and vllm_xargs.{XARG} = the reasoner ids' count")
    q = xargs.get(XARG)
    if q is None:
        return None
    prompt = data.get("prompt")
    if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        raise RequestError(f"vllm_xargs.{XARG} needs the prompt as one list of token ids (reasoner view first)")
    if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q < len(prompt):
        raise RequestError(f"vllm_xargs.{XARG} must be an integer in [1, {len(prompt) - 1}] (the prompt has "
                           f"{len(prompt)} tokens and the generator view needs at least one), got {q!r}")
    # the engine-side check (flythinker.serving.requests.check_admitted) compares it with the prompt it receives
    data["vllm_xargs"] = {**xargs, PROMPT_XARG: len(prompt)}
    return _isolate_split(data)


def _isolate_split(data: dict) -> dict:
    """Keep a split request's KV blocks its own. A split request's generator KV is written into the blocks of its
    reasoner view (docs/caching.md), so two running requests that shared those blocks through prefix caching would
    overwrite each other's generator KV: each split request gets a salt of its own (no cross-request block reuse),
    and `n > 1` (children that share the prompt's blocks) is refused."""
    for field in ("n", "best_of"):
        value = data.get(field)
        if value is not None and value != 1:
            raise RequestError(f"{field}={value!r} is not supported on a split-context request (its samples would "
                               f"share one set of KV blocks); send {value!r} separate requests")
    data["cache_salt"] = f"flythinker-split-{uuid.uuid4().hex}"
    return data


def _messages(value, field: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise RequestError(f"{field!r} must be a non-empty list of {{'role': str, 'content': str}} messages "
                           "(or, for 'reasoner_prompt', a string)")
    for m in value:
        for text in (m["role"], m["content"]):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate ("\\ud800") decodes from JSON but is no text
                raise RequestError(f"{field!r} holds a character that is not valid Unicode text "
                                   f"({exc.object[exc.start:exc.end]!a} at {exc.start})") from None
    return value


def _split_chat(data: dict, field: str, tokenizer_loader) -> dict:
    """Rewrite a chat request with a reasoner view into vLLM's terms (see CHAT_FIELDS above)."""
    from flythinker.serving.requests import PROMPT_XARG, XARG

    reasoner = _messages(data.pop(field), field)
    messages = _messages(data.get("messages"), "messages")
    tok = tokenizer_loader()
    template = tok.chat_template
    if not isinstance(template, str):
        raise RequestError("the served checkpoint's tokenizer has no (single) chat template for the reasoner view")
    gen_prompt = bool(data.get("add_generation_prompt", True))
    r_text = tok.apply_chat_template(reasoner, tokenize=False, add_generation_prompt=gen_prompt)
    joined = _JOIN.replace("{TEMPLATE}", template)
    text = tok.apply_chat_template(messages, chat_template=joined, tokenize=False, add_generation_prompt=gen_prompt,
                                   flythinker_reasoner_text=r_text)
    r_ids = tok(r_text, add_special_tokens=False)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not text.startswith(r_text) or ids[:len(r_ids)] != r_ids or len(ids) <= len(r_ids):
        raise RequestError("the reasoner view and the generator view do not tokenize apart with this tokenizer")
    data["chat_template"] = joined
    data["chat_template_kwargs"] = {**(data.get("chat_template_kwargs") or {}), "flythinker_reasoner_text": r_text}
    # the prompt's length as rendered here: the engine-side check refuses the request if vLLM's prompt differs
    # (truncate_prompt_tokens, a rendering drift), which would otherwise split it at the wrong token
    data["vllm_xargs"] = {**(data.get("vllm_xargs") or {}), XARG: len(r_ids), PROMPT_XARG: len(ids)}
    return _isolate_split(data)


class ReasonerViewMiddleware:
    """ASGI middleware: turns a chat request's reasoner view into vLLM's split-context form (see above), checks
    the completions form, answers a bad reasoner view with 400; anything else reaches vLLM unchanged."""

    def __init__(self, app):
        self.app = app
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(os.environ[CHECKPOINT_ENV])
        return self._tok

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        if scope.get("type") != "http" or scope.get("method") != "POST" or path not in (CHAT_PATH, COMPLETIONS_PATH):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # client went away
                await self.app(scope, receive, send)
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        try:
            new = rewrite_body(body, path, self._tokenizer)
        except RequestError as exc:
            await _json_error(send, 400, f"flythinker serve: {exc}")
            return
        if new is not None:
            body = new
            scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", []) if k != b"content-length"]
                         + [(b"content-length", str(len(body)).encode())])
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _json_error(send, status: int, message: str) -> None:
    payload = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                    "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


__all__ = ["ReasonerViewMiddleware", "RequestError", "ServeError", "check_checkpoint", "exec_vllm", "rewrite_body",
           "vllm_argv"]
