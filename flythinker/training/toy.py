"""A character-level tokenizer and toy tasks: tiny, offline training fixtures for tests and smoke runs.

The tokenizer matches :func:`tiny_config` (pad 0, bos 1, eos 2; vocab < 256), so a tiny
random pair plus this tokenizer is a complete, hub-free model pair that the CLI can load from disk.
"""

from __future__ import annotations

import os
import random
import string
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = string.printable[:95] + "\n"  # digits, letters, punctuation, space, newline: 96 characters
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


TINY_FAMILIES = ("llama", "qwen2", "mistral", "gemma")


def tiny_config(
    family: str = "llama",
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    vocab_size: int = 256,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    **overrides,
):
    """A small random-init decoder config of a given HF family (`llama`, `qwen2`, `mistral`, `gemma`) whose special ids
    match `char_tokenizer` (pad 0, bos 1, eos 2): the toy models of smoke runs, tests and benchmarks."""
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family '{family}', expected one of {TINY_FAMILIES}")
    kwargs = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        vocab_size=vocab_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    if family == "gemma":
        kwargs["head_dim"] = hidden_size // num_attention_heads
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def char_tokenizer():
    """A `PreTrainedTokenizerFast` with one token per printable ASCII character (ids 4..99)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_model(path: str | os.PathLike, *, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random causal LM (`tiny_config(**config_overrides)`) + the char tokenizer to `path`."""
    import torch
    from transformers import AutoModelForCausalLM


    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(**config_overrides))
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    char_tokenizer().save_pretrained(path)
    return path


def reverse_task(n: int, *, seed: int = 0, min_len: int = 3, max_len: int = 8) -> list[dict[str, str]]:
    """Shared-context toy task: prompt "abc=" -> response "cba" (lowercase letters)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(string.ascii_lowercase[:8]) for _ in range(rng.randint(min_len, max_len)))
        out.append({"prompt": word + "=", "response": word[::-1]})
    return out


def secret_task(n: int, *, seed: int = 0, n_keys: int = 4) -> list[dict[str, str]]:
    """Split-context toy task: only the reasoner's prompt says which word to write.

    generator_prompt "say:" ; reasoner_prompt "key=<k>:" ; response = WORDS[k]. A generator alone can at best
    guess among `n_keys` words; with the reasoner's latents fused it can learn to write the right one.
    """
    words = ("apple", "bread", "cider", "dates", "eggs!", "figs.", "grape", "honey")[:n_keys]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(n_keys)
        out.append({"generator_prompt": "say:", "reasoner_prompt": f"key={k}:", "response": words[k]})
    return out
