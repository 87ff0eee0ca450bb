"""A small OpenAI-compatible chat server for a local HF causal LM, on loopback (the HTTP judge's test server, and
a way to share one local judge between processes).

    python -m flythinker.empathy.server --model smollm2-135m-instruct --port 8765
    # then: OpenAIJudgeBackend("smollm2-135m-instruct", base_url="http://127.0.0.1:8765/v1")

Endpoints: ``POST /v1/chat/completions`` (``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``n``, ``seed``; a
trailing assistant message is continued, not answered), ``GET /v1/models``, ``GET /health``, ``GET /stats``
(requests served, the most requests seen in flight at once). One generate runs at a time (a lock: the model is not
thread-safe). Fault injection for tests: ``fail_first`` requests answer HTTP 503, every request waits ``delay_s``.
"""

# no `from __future__ import annotations`: FastAPI resolves the request model from the live annotations
import argparse
import threading
import time
import uuid
from typing import Any

import torch


@torch.no_grad()
def _complete(model, tokenizer, text: str, max_tokens: int, temperature: float, n: int, seed: int | None,
              top_p: float = 1.0):
    """Generate ``n`` continuations of ``text``: ``(prompt ids [1, P], OpenAI-style choices)``."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    kw: dict[str, Any] = {"max_new_tokens": max_tokens, "num_return_sequences": n,
                          "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=top_p)
    else:
        kw["do_sample"] = False
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    eos = tokenizer.eos_token_id
    choices = []
    for i, row in enumerate(out[:, ids.shape[1]:]):
        finished = eos is not None and bool((row == eos).any())
        choices.append({"index": i, "finish_reason": "stop" if finished else "length", "n_tokens": int(row.numel()),
                        "message": {"role": "assistant", "content": tokenizer.decode(row, skip_special_tokens=True)}})
    return ids, choices


def build_app(model: Any, tokenizer: Any, model_name: str = "local", fail_first: int = 0, delay_s: float = 0.0):
    """The FastAPI app serving ``model`` (an HF causal LM, eval mode) with ``tokenizer`` (chat template or the
    flythinker fallback template)."""
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel, Field

    from flythinker.persona.views import render_chat

    class Message(BaseModel):
        role: str
        content: str

    class ChatRequest(BaseModel):
        model: str | None = None
        messages: list[Message]
        max_tokens: int | None = Field(default=128, ge=1, le=4096)
        temperature: float | None = Field(default=1.0, ge=0.0, le=5.0)
        n: int | None = Field(default=1, ge=1, le=16)
        seed: int | None = None
        top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)

    app = FastAPI(title="flythinker judge server")
    lock = threading.Lock()
    state = {"served": 0, "received": 0, "in_flight": 0, "max_in_flight": 0}
    state_lock = threading.Lock()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def _render(messages: list[dict[str, str]]) -> str:
        if messages and messages[-1]["role"] == "assistant":
            return render_chat(tokenizer, messages[:-1], add_generation_prompt=True) + messages[-1]["content"]
        return render_chat(tokenizer, messages, add_generation_prompt=True)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/stats")
    def stats() -> dict:
        with state_lock:
            return dict(state)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "flythinker"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict:
        with state_lock:
            state["received"] += 1
            nth = state["received"]
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            if delay_s:
                time.sleep(delay_s)
            if nth <= fail_first:
                raise HTTPException(status_code=503, detail=f"injected failure {nth}/{fail_first}")
            if not req.messages:
                raise HTTPException(status_code=400, detail="messages must not be empty")
            text = _render([m.model_dump() for m in req.messages])
            if (req.n or 1) > 1 and not req.temperature:
                raise HTTPException(status_code=400, detail="n > 1 needs temperature > 0")
            with lock:
                ids, choices = _complete(model, tokenizer, text, req.max_tokens, req.temperature or 0.0, req.n or 1,
                                         req.seed, req.top_p or 1.0)
            new_tokens = sum(c.pop("n_tokens") for c in choices)
            with state_lock:
                state["served"] += 1
            return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                    "created": int(time.time()), "model": model_name, "choices": choices,
                    "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": new_tokens,
                              "total_tokens": int(ids.shape[1]) + new_tokens}}
        finally:
            with state_lock:
                state["in_flight"] -= 1

    return app


class LoopbackServer:
    """Run :func:`build_app` with uvicorn in a background thread on ``127.0.0.1`` (a free port by default).
    Use as a context manager; ``base_url`` is the OpenAI base URL (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, app: Any, port: int = 0, startup_timeout: float = 30.0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                     access_log=False))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._timeout = startup_timeout

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        deadline = time.time() + self._timeout
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the loopback server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="OpenAI-compatible chat server for a local HF model (loopback)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="known short name or local HF folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)
    import uvicorn

    from flythinker.hub import load_pretrained

    model, tok = load_pretrained(args.model)
    uvicorn.run(build_app(model, tok, model_name=args.model), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
