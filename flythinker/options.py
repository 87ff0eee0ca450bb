"""The names and choices of every FlyThinker option, defined once, in a module that imports nothing heavy.

`flythinker.configuration` (the config class that validates them) re-exports all of these; the CLI builds its
`choices=` from this module so that `flythinker --help` does not import transformers (seconds on a loaded machine;
docs/results.md, "Measurements behind design choices").
"""

FUSION_FIELDS = ("fusion_lambda", "norm_target", "projection", "detach_norm", "fuse_prompt", "parallel",
                 "loss_impl", "latent_eps", "latent_norm")
NORM_TARGETS = ("vocab_mean", "token")
PROJECTIONS = ("pad", "linear", "zero")
# projections with a learned [H_g, H_r] matrix (saved with the model as latent_proj.weight)
LEARNED_PROJECTIONS = ("linear", "zero")
# "standardize": centre and scale each latent channel (frozen statistics, calibrated on training data) before the
# rescale and projection (docs/fusion.md, "Standardised latents")
LATENT_NORMS = ("none", "standardize")
PARALLEL_MODES = ("auto", "off", "threads", "streams")
LOSS_IMPLS = ("fused", "naive")
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Label of a position that is not trained on (prompt, padding): PyTorch's cross_entropy default, also HF's.
IGNORE_INDEX = -100
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the LoRA'd linears
