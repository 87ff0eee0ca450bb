"""A word-level tokenizer built from a text corpus: tiny vocabularies for fast toy training and tests.

Word-level (``\\w+`` runs and single punctuation marks) keeps synthetic sequences short and the vocabulary in the
hundreds, so small random-init models train on CPU in seconds. Special tokens: pad 0, bos 1, eos 2, unk 3
(matching :func:`flythinker.training.toy.tiny_config`), plus ``<|im_start|>`` / ``<|im_end|>`` for the chat template.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>")
# ChatML-like; an assistant turn ends with eos so generation stops there.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}</s>{% else %}<|im_end|>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def word_tokenizer(texts: Iterable[str], chat_template: bool = True, extra_words: Iterable[str] = ()):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is every word/punctuation mark in ``texts``.

    Words outside the corpus map to ``<unk>``. Decoding joins tokens with spaces.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    # The words the view builders and the chat template add around the data.
    builtin = ["user assistant system", "User: Assistant: System: Situation: About the user:",
               "What you remember about the user (oldest first): - [x]",
               "Earlier conversation with the user (oldest first):"]
    for text in list(texts) + list(extra_words) + builtin:
        for word, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    # No decoder: tokens are joined with single spaces (a WordPiece decoder would glue "###" to its neighbour).
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=list(SPECIALS[4:]))
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok
