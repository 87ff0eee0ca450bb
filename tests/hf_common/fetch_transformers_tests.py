"""Install step: put transformers' common test mixins for the *installed* transformers version into a git-ignored cache.

transformers' own test files are not in its wheel. The sdist on PyPI for the same version ships the top-level
`tests/*.py` files (test_modeling_common.py with ModelTesterMixin, test_configuration_common.py with ConfigTester),
so this script downloads exactly that sdist with pip and extracts those files, unchanged, into

    .cache/transformers-tests/<version>/transformers_tests/

as a package (an empty `__init__.py` is added), written to a temp folder beside it and moved into place with one
os.replace (atomic: an interrupted run leaves no half-filled cache, only a temp folder the next run removes). A
cache that exists is reused. The sdist does NOT ship tests/generation/, tests/exporters/ or tests/utils/ (checked
for 5.24.0), which test_modeling_common.py imports from; tests/hf_common/standins.py provides flythinker's own
stand-ins for those three modules at import time (see tests/test_hf_common.py).

Usage: python tests/hf_common/fetch_transformers_tests.py [--root .cache/transformers-tests]
Prints the package folder on success; exits non-zero with a one-line reason otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The upstream files the conformance tests import (missing one = the sdist layout changed: fail, don't guess).
FILES = ("test_modeling_common.py", "test_configuration_common.py")
PACKAGE = "transformers_tests"
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / ".cache" / "transformers-tests"


def package_dir(version: str, root: Path = DEFAULT_ROOT) -> Path:
    """Where the extracted test package for transformers `version` lives."""
    return root / version / PACKAGE


def _download_sdist(version: str, dest: Path) -> Path:
    """`pip download` the transformers sdist for `version` into `dest`; returns the .tar.gz path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
           f"transformers=={version}", "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"transformers-{version}.tar.gz"))
    if r.returncode != 0 or not found:
        raise SystemExit(f"could not download the transformers {version} sdist: {r.stderr.strip()[-500:]}")
    return found[0]


def _extract(sdist: Path, version: str, out: Path) -> None:
    """Copy FILES from the sdist's tests/ folder into `out` (a package folder)."""
    prefix = f"transformers-{version}/tests/"
    out.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        for name in FILES:
            try:
                member = tar.getmember(prefix + name)
            except KeyError:
                raise SystemExit(f"the transformers {version} sdist has no tests/{name}") from None
            src = tar.extractfile(member)
            if src is None:
                raise SystemExit(f"tests/{name} in the transformers {version} sdist is not a regular file")
            (out / name).write_bytes(src.read())
    (out / "__init__.py").write_text(f'"""transformers {version} common tests, extracted from its PyPI sdist."""\n')
    (out / "VERSION").write_text(version + "\n")


def fetch(version: str, root: Path = DEFAULT_ROOT) -> Path:
    """Make sure package_dir(version, root) holds the extracted files; returns it."""
    final = package_dir(version, root)
    if (final / "VERSION").is_file() and all((final / f).is_file() for f in FILES):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{PACKAGE}.tmp-*"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{PACKAGE}.tmp-") as tmp:
        tmp_path = Path(tmp)
        sdist = _download_sdist(version, tmp_path / "dl")
        staged = tmp_path / PACKAGE
        _extract(sdist, version, staged)
        if final.exists():  # incomplete (no VERSION): replace it
            shutil.rmtree(final)
        os.replace(staged, final)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--version", default=None, help="default: the installed transformers version")
    args = ap.parse_args(argv)
    version = args.version
    if version is None:
        import transformers

        version = transformers.__version__
    print(fetch(version, args.root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
