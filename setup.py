"""Optional ahead-of-time build of the C++ CPU ops in csrc/.

Normal installs use pyproject.toml only, and the C++ op is compiled on first use (torch.utils.cpp_extension,
cached under ~/.cache/torch_extensions). To compile it at install time instead:

    FLYTHINKER_BUILD_EXT=1 pip install --no-build-isolation -e .
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FLYTHINKER_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "flythinker._C",
            sources=["csrc/latent_fuse.cpp"],
            extra_compile_args=["-O3", "-march=native", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
