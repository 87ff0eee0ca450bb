"""`flythinker.kernels` works from a real (non-editable) install, and the install adds no top-level `kernels`.

The package is copied out of the working tree (so the build leaves no build/ or egg-info behind in it) and
installed with `pip install --no-deps --no-build-isolation` into a throwaway venv. The venv borrows torch &
co. from the project venv through a .pth line (the base interpreter has no torch, so --system-site-packages
would not help); a .pth *path* does not run the project venv's editable-install hook, so only the installed copy
of flythinker is importable. About 20-40 s; deselect with `-m "not packaging"`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.packaging

PROBE = r"""
import importlib.util, json, sys
import flythinker, flythinker.kernels as k
import flythinker.persona, flythinker.training.collator  # every subpackage ships
from flythinker import FlyThinkerForCausalLM
from flythinker.kernels import latent_fuse_cpp
import torch
ids = torch.tensor([[1, 2, 3]]); W = torch.randn(5, 8); L = torch.randn(1, 3, 6)
out = k.latent_fuse(ids, W, L, lam=0.5, backend="torch")
print(json.dumps({
    "flythinker": flythinker.__file__, "kernels": k.__file__,
    "top_level_kernels": getattr(importlib.util.find_spec("kernels"), "origin", None),
    "csrc": str(latent_fuse_cpp._source()), "shape": list(out.shape),
    "close": bool(torch.allclose(out, k.latent_fuse_naive(ids, W, L, lam=0.5))),
}))
"""


def test_installed_non_editable(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", ".benchmarks", "runs", "results", "*.so")
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for name in ("flythinker", "kernels", "csrc"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLYTHINKER_BUILD_EXT")}
    # --ignore-installed: pip sees the project venv's editable flythinker through the .pth and must not touch it.
    # Python >= 3.12 venvs have no setuptools: then let pip fetch the build backend (build isolation).
    have_backend = all(importlib.util.find_spec(m) is not None for m in ("setuptools", "wheel"))
    build = ["--no-build-isolation", "--no-index"] if have_backend else []
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", *build, "--ignore-installed",
                        "--disable-pip-version-check", str(src)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([str(py), "-c", PROBE], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(info["kernels"]).is_relative_to(site / "flythinker" / "kernels"), info
    assert Path(info["flythinker"]).is_relative_to(site / "flythinker"), info
    # a top-level `kernels` may exist (Hugging Face's, a transformers dependency), but never one from this install
    top = info["top_level_kernels"]
    assert top is None or not Path(top).is_relative_to(site), f"the install put a top-level `kernels` at {top}"
    assert not (site / "kernels").exists()
    assert Path(info["csrc"]) == site / "flythinker" / "csrc" / "latent_fuse.cpp", info  # JIT build source
    assert info["shape"] == [1, 3, 8] and info["close"]
    record = next(site.glob("flythinker-*.dist-info")) / "RECORD"
    tops = {line.split("/", 1)[0] for line in record.read_text().splitlines()}
    assert "kernels" not in tops and "flythinker" in tops, sorted(tops)
    # the CLI package ships, and `flythinker bench` (which needs benchmarks/ of a source checkout) says so
    for sub in ("cli/__init__.py", "cli/common.py", "cli/generate.py", "cli/train.py", "cli/demo.py"):
        assert (site / "flythinker" / sub).is_file(), sub
    r = subprocess.run([str(py), "-m", "flythinker.cli", "bench", "--list"], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "source checkout" in lines[0], r.stderr


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject lists packages by hand (package-dir maps `kernels/` to flythinker.kernels, which find() cannot
    express), so a new subpackage must be added there or the installed wheel lacks it."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "flythinker").rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert listed == on_disk | {"flythinker.kernels"}, {"missing": on_disk - listed, "extra": listed - on_disk}
