"""T-Free's tokenizer side, pure (no Ray, no model): the invertible word splitter, the md5 trigram
hashing of words onto v rows, the decoding dictionary, and the fertility and duplicate metrics
(reference/tfree.md sections 2, 3, 5.1-5.2, 7). Scoring words from logits is `decoding/tfree.py`."""

from distilray.tfree.dictionary import Dictionary, build_dictionary, load_dictionary
from distilray.tfree.hashing import TrigramHasher, TrigramVocab, hasher_for, word_trigrams
from distilray.tfree.metrics import duplicate_share, fertility, pattern_duplicates, reference_words
from distilray.tfree.wordsplit import (
    EOT,
    NEWLINE,
    NO_WS,
    SPECIAL_WORDS,
    WS,
    check_user_text,
    encode_document,
    has_special,
    is_special,
    split_words,
    words_to_text,
)

__all__ = [
    "EOT",
    "NEWLINE",
    "NO_WS",
    "SPECIAL_WORDS",
    "WS",
    "Dictionary",
    "TrigramHasher",
    "TrigramVocab",
    "build_dictionary",
    "check_user_text",
    "duplicate_share",
    "encode_document",
    "fertility",
    "has_special",
    "hasher_for",
    "is_special",
    "load_dictionary",
    "pattern_duplicates",
    "reference_words",
    "split_words",
    "word_trigrams",
    "words_to_text",
]
