"""Import TRL for the GRPO tests.

pytest puts ``tests/`` on ``sys.path``, where the vLLM suite's folder ``tests/vllm`` is importable as a namespace
package named ``vllm``; TRL's import-time ``is_vllm_available()`` then finds it, reads its version as ``"N/A"`` and
raises ``InvalidVersion``. The folder is hidden from ``sys.path`` while TRL imports (TRL checks once, at import).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest


def import_trl():
    """Import ``trl`` and its GRPO trainer (skip the module when the ``rl`` extra is missing)."""
    here = str(Path(__file__).resolve().parent)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    try:
        trl = pytest.importorskip("trl", reason="GRPO needs the `rl` extra (installed by make test)")
        importlib.import_module("trl.trainer.grpo_trainer")  # runs the vLLM check now
    finally:
        sys.path[:] = saved
    return trl
