"""Packaging hooks beyond pyproject.toml.

1. The C++ sources in csrc/ are copied into the package (flythinker/csrc/) so an installed (non-editable)
   flythinker can still compile its CPU ops on first use (torch.utils.cpp_extension, cached under
   ~/.cache/torch_extensions).
2. Optional ahead-of-time build of those ops as `flythinker._C`:

    FLYTHINKER_BUILD_EXT=1 pip install --no-build-isolation .

   (-march=native: the binary is for this machine's CPU; leave the variable unset for portable installs.)
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithCsrc(build_py):
    """build_py that also ships csrc/*.cpp as flythinker/csrc/*.cpp (package data outside the package dirs)."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "flythinker" / "csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for src in sorted((HERE / "csrc").glob("*.cpp")) + sorted((HERE / "csrc").glob("*.h")):
            shutil.copy2(src, dst / src.name)


ext_modules, cmdclass = [], {"build_py": BuildPyWithCsrc}
if os.environ.get("FLYTHINKER_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "flythinker._C",
            sources=["csrc/latent_fuse.cpp"],  # one module-defining source per extension
            extra_compile_args=["-O3", "-march=native", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
