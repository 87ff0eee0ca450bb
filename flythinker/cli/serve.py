"""`flythinker serve CHECKPOINT`: vLLM's OpenAI-compatible server for a flythinker pair (flythinker.serving)."""

from __future__ import annotations

import argparse
import shlex

from flythinker.cli.common import CLIError, positive_float, positive_int

HELP = "serve a saved pair with vLLM's OpenAI-compatible server (needs the vLLM virtualenv)"
DESCRIPTION = (
    "Start vLLM's OpenAI-compatible server (continuous batching, paged KV cache, /v1/chat/completions with "
    "streaming) on a FlyThinkerForCausalLM.save_pretrained folder that also holds the tokenizer. vLLM lives in its "
    "own virtualenv (`make install-vllm`, then .venv-vllm/bin/flythinker serve ...). --vllm-args passes more "
    "`vllm serve` options. See docs/serving.md.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="folder written by FlyThinkerForCausalLM.save_pretrained (+ its tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations dtype (default: the checkpoint's)")
    p.add_argument("--max-model-len", type=positive_int, default=None, help="longest prompt + reply in tokens")
    p.add_argument("--kv-cache-gib", type=positive_float, default=None,
                   help="memory for the paged KV + latent cache in GiB (default: vLLM's)")
    p.add_argument("--compile", action="store_true",
                   help="let vLLM torch.compile the model (slower start-up; default: eager)")
    p.add_argument("--served-model-name", default=None, help="the `model` name clients send (default: the path)")
    p.add_argument("--vllm-args", default="", metavar="'ARGS'",
                   help="more `vllm serve` options in one quoted string, passed unchanged "
                        "(e.g. --vllm-args '--max-num-seqs 32 --enable-prefix-caching')")


def run(args: argparse.Namespace) -> int:
    from flythinker.serving.server import ServeError, check_checkpoint, exec_vllm, vllm_argv

    try:
        extra = shlex.split(args.vllm_args)
    except ValueError as exc:  # an unbalanced quote
        raise CLIError(f"--vllm-args {args.vllm_args!r}: {exc}") from None
    try:
        folder = check_checkpoint(args.checkpoint)
        exec_vllm(vllm_argv(folder, host=args.host, port=args.port, dtype=args.dtype,
                            max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                            enforce_eager=not args.compile, served_model_name=args.served_model_name,
                            extra=extra))
    except ServeError as exc:
        raise CLIError(str(exc)) from None
    return 0  # not reached: exec_vllm replaces the process
