"""flythinker.kernels: fused ops (Triton on CUDA, compiled C++ on CPU, plain-PyTorch twins as oracles)."""

from .latent_fuse import latent_fuse
from .latent_fuse_naive import latent_fuse_naive, vocab_mean_norm

__all__ = ["latent_fuse", "latent_fuse_naive", "vocab_mean_norm"]
from .sampling import sample  # noqa: E402
from .sampling_naive import sample_naive, sampling_probs_naive  # noqa: E402

__all__ += ["sample", "sample_naive", "sampling_probs_naive"]
