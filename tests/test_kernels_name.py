"""The checkout's top-level `kernels/` folder never shadows Hugging Face's `kernels` package.

transformers (>= 5.25) imports `from kernels import ...` when `modeling_utils` loads. Each way a user runs code from
a checkout is tried in a fresh interpreter: `import transformers.modeling_utils` must succeed, the top-level name
`kernels` must be Hugging Face's package, and `flythinker.kernels` must still be this project's ops. (The
installed wheel is covered by tests/test_packaging.py.)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, sys
import transformers.modeling_utils
import kernels
from kernels import CUDAProperties  # the name transformers 5.25 imports
import flythinker.kernels as ours
print(json.dumps({"kernels": kernels.__file__, "ours": ours.__file__,
                  "latent_fuse": callable(getattr(ours, "latent_fuse", None)),
                  "root_first": os.path.realpath(sys.path[0] or os.getcwd()) == %r}))
"""

try:
    HF_KERNELS = importlib.metadata.version("kernels")
except importlib.metadata.PackageNotFoundError:
    HF_KERNELS = None

pytestmark = pytest.mark.skipif(HF_KERNELS is None, reason="Hugging Face's kernels package is not installed")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def _check(out: str) -> dict:
    info = json.loads(out.strip().splitlines()[-1])
    assert "site-packages" in info["kernels"] and not Path(info["kernels"]).is_relative_to(REPO / "kernels"), info
    assert Path(info["ours"]) == REPO / "kernels" / "__init__.py", info
    assert info["latent_fuse"], info
    return info


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_session_started_in_checkout():
    """`python` started in the checkout root: sys.path[0] is '' (the current directory)."""
    info = _check(_run([sys.executable, "-c", PROBE % str(REPO)], REPO, _env()))
    assert info["root_first"]


def test_repo_root_first_on_path(tmp_path):
    """What pytest's `pythonpath = ["."]` and PYTHONPATH=<checkout> do: the root is an explicit sys.path entry."""
    _check(_run([sys.executable, "-c", PROBE % str(REPO)], tmp_path, _env(PYTHONPATH=str(REPO))))


def test_module_run_from_checkout(tmp_path):
    """`python -m benchmarks.<script>` from the checkout puts the root first; the probe runs as a module there."""
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "probe.py").write_text(PROBE % str(REPO))
    info = _check(_run([sys.executable, "-m", "probe_pkg.probe"], REPO, _env(PYTHONPATH=str(tmp_path))))
    assert info["root_first"]


def test_benchmark_help_from_checkout():
    """A real benchmark script's `--help` (it imports transformers) from the checkout, as the README runs it."""
    out = _run([sys.executable, "-m", "benchmarks.personalization_smollm2", "--help"], REPO, _env())
    assert "usage" in out


def test_editable_install_elsewhere(tmp_path):
    """The project venv's editable install, from an unrelated directory: no checkout root on sys.path."""
    info = _check(_run([sys.executable, "-c", PROBE % str(REPO)], tmp_path, _env()))
    assert not info["root_first"]


def test_without_hf_kernels_the_name_is_an_empty_stand_in(tmp_path):
    """With Hugging Face's package hidden (transformers < 5.25 does not require it), `import kernels` from the
    checkout gives an empty stand-in that reads as "not a real install" (no file, no submodules, none of our ops),
    which is what transformers' availability probe needs to answer False; `flythinker.kernels` still imports."""
    code = (
        "import sys, importlib.machinery as m\n"
        "orig = m.PathFinder.find_spec\n"
        "def find_spec(name, path=None, target=None):\n"
        "    spec = orig(name, path, target)\n"
        "    return None if name == 'kernels' and spec and 'site-packages' in (spec.origin or '') else spec\n"
        "m.PathFinder.find_spec = staticmethod(find_spec)\n"
        "import kernels\n"
        "assert kernels.__file__ is None and kernels.__path__ == [] and not hasattr(kernels, 'latent_fuse')\n"
        "try:\n"
        "    from kernels import latent_fuse\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('our ops under the foreign name')\n"
        "import flythinker.kernels as k\n"
        "assert callable(k.latent_fuse)\n"
        "print('ok')\n"
    )
    assert _run([sys.executable, "-c", code], REPO, _env()).strip().endswith("ok")
