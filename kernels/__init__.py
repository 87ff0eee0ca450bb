"""flythinker.kernels: fused ops (Triton on CUDA, compiled C++ on CPU, plain-PyTorch twins as oracles)."""

from .latent_fuse import latent_fuse
from .latent_fuse_naive import latent_fuse_naive, vocab_mean_norm
from .linear_cross_entropy import linear_cross_entropy
from .linear_cross_entropy_naive import linear_cross_entropy_naive

__all__ = ["latent_fuse", "latent_fuse_naive", "vocab_mean_norm"]
__all__ += ["linear_cross_entropy", "linear_cross_entropy_naive"]
from .sampling import sample  # noqa: E402
from .sampling_naive import sample_naive, sampling_probs_naive  # noqa: E402

__all__ += ["sample", "sample_naive", "sampling_probs_naive"]
