"""flythinker.kernels: fused ops (Triton on CUDA, compiled C++ on CPU, plain-PyTorch twins as oracles).

This folder is installed as `flythinker.kernels`. In a source checkout it is also found under the top-level name
`kernels` whenever the checkout root is on `sys.path` (pytest from the root, `python -m benchmarks.<script>`, a
Python session started there). That name belongs to Hugging Face's `kernels` package, which transformers imports
when `modeling_utils` loads; so when imported as `kernels`, this module hands the name over to the real package
(see docs/packaging.md, "The top-level kernels/ folder").
"""

if __name__ != "flythinker.kernels":
    # Find the same name on sys.path without the checkout root, load it, and put it in sys.modules in place of this
    # module: the import system returns whatever sys.modules holds once a module's code has run, so `import
    # kernels` and `from kernels import X` get Hugging Face's package. Only the standard library is used here, and
    # no submodule of this folder is imported under the foreign name.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.realpath(_os.path.dirname(_os.path.dirname(__file__)))
    _rest = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _rest)
    if _spec is None or _spec.loader is None:
        # Hugging Face's package is not installed (transformers < 5.25 does not require it). Stay an empty
        # stand-in that reads as "not a real install": no file, no version, no submodules, so transformers'
        # availability probe (find_spec, then import when no metadata is found) answers False instead of failing,
        # and none of our ops are ever served under the foreign name.
        __file__ = None
        __path__: list[str] = []
        __all__: list[str] = []
    else:
        _real = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _real
        try:
            _spec.loader.exec_module(_real)
        except BaseException:
            _sys.modules.pop(__name__, None)
            raise
else:
    from .latent_fuse import latent_fuse
    from .latent_fuse_naive import latent_fuse_naive, vocab_mean_norm
    from .linear_cross_entropy import linear_cross_entropy
    from .linear_cross_entropy_naive import linear_cross_entropy_naive
    from .sampling import sample
    from .sampling_naive import sample_naive, sampling_probs_naive

    __all__ = [
        "latent_fuse",
        "latent_fuse_naive",
        "vocab_mean_norm",
        "linear_cross_entropy",
        "linear_cross_entropy_naive",
        "sample",
        "sample_naive",
        "sampling_probs_naive",
    ]
