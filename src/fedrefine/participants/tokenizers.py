"""Small tokenizers trained locally, with real-style chat templates.

Tiny participants need tokenizers that run offline. Two families are offered so that
participants really disagree on token boundaries and alignment is exercised:

- ``byte_bpe``: byte-level BPE with a ChatML template (like Qwen).
- ``metaspace_bpe``: SentencePiece-style BPE (``▁`` word marker) with a Llama-3 template.
- ``word``: whole words, for the toy world where tiny models learn facts fastest.
- ``syllable``: whole lowercase words, capitalised words (names) split into syllables: a model can then
  copy a name it has never seen, from pieces it knows (the toy world's rephrasing receiver).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

TokenizerKind = Literal["byte_bpe", "metaspace_bpe", "word", "syllable"]
ChatStyle = Literal["chatml", "llama3"]

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CHAT_STYLES: dict[str, dict] = {
    "chatml": {
        "template": CHATML_TEMPLATE,
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "pad": "<|endoftext|>",
        "eos": "<|im_end|>",
        "bos": None,
    },
    "llama3": {
        "template": LLAMA3_TEMPLATE,
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "pad": "<|end_of_text|>",
        "eos": "<|eot_id|>",
        "bos": "<|begin_of_text|>",
    },
}

DEFAULT_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A question and an answer: the correct answer is B.",
    "Which of these would let the most heat travel through? A metal spoon, a wooden stick, a cloth, a glass.",
    "Large language models share key value caches instead of text; a fuser maps one cache into another.",
    "Café, naïve, déjà vu, 東京, Ünïcödé and emoji 🙂 appear so that multi-byte characters are tested.",
    "user assistant system: you are a helpful assistant. Answer with the letter of the correct option.",
)
# Line breaks appear in every chat template, and option letters follow a space in answers:
# make sure every tokenizer knows them (so " A" ... " E" can be single tokens).
_FORMAT_TEXT = "user\nassistant\n\nsystem\n" + " ".join(f"answer is {letter}" for letter in "ABCDE" * 20)
_CONSONANTS = "b-df-hj-np-tv-zB-DF-HJ-NP-TV-Z"
#: Pieces of the ``syllable`` kind: a lowercase word whole; a capitalised word as (consonants)(vowels) syllables
#: and a closing consonant run; digits, punctuation marks and whitespace runs as in ``word``.
SYLLABLE_PATTERN = (
    rf" ?(?<![A-Za-z])[a-z]+\b| ?[A-Z][{_CONSONANTS}]*[aeiouAEIOU]+|[{_CONSONANTS}]*[aeiou]+|[{_CONSONANTS}]+"
    r"| ?\d+| ?[^\w\s]| ?\w+|\s+"
)


def build_tokenizer(
    kind: TokenizerKind = "byte_bpe",
    chat_style: ChatStyle = "chatml",
    corpus: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a small tokenizer on ``corpus`` and wrap it as a fast HF tokenizer with a chat template.

    Training is deterministic for a given corpus and settings.
    """
    if chat_style not in _CHAT_STYLES:
        raise ValueError(f"Unknown chat_style {chat_style!r}; choose one of {sorted(_CHAT_STYLES)}.")
    style = _CHAT_STYLES[chat_style]
    specials = list(style["specials"])
    corpus = [*corpus, _FORMAT_TEXT]

    if kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "metaspace_bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        specials = ["<unk>", *specials]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    elif kind in ("word", "syllable"):
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        # Words and punctuation marks (each with the one space before it, as in GPT-style
        # vocabularies) and other whitespace runs are tokens, so every character of the text is
        # covered by some token's offsets.
        pattern = r" ?\w+| ?[^\w\s]|\s+" if kind == "word" else SYLLABLE_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        tok.decoder = decoders.Fuse()
        specials = ["<unk>", *specials]
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"Unknown tokenizer kind {kind!r}; choose 'byte_bpe', 'metaspace_bpe', 'word' or 'syllable'.")

    tok.train_from_iterator(corpus, trainer=trainer)
    # Chat-template markers must be atomic tokens, even inside rendered text.
    tok.add_special_tokens(specials)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=style["eos"],
        pad_token=style["pad"],
        bos_token=style["bos"],
        unk_token="<unk>" if kind != "byte_bpe" else None,
        padding_side="left",
    )
    wrapped.chat_template = style["template"]
    return wrapped
