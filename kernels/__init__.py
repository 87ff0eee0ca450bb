"""flythinker.kernels: fused ops (Triton on CUDA, compiled C++ on CPU, plain-PyTorch twins as oracles)."""

if __name__ != "flythinker.kernels":
    # Imported as a top-level `kernels` module because the repo root is on sys.path (e.g. `python -m ...` run in
    # the checkout). That name belongs to the HF `kernels` package, which transformers probes by importing it:
    # stay an empty module so nothing is imported or registered twice. Use `flythinker.kernels`.
    __all__: list[str] = []
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
