"""Next-word figures: both model kinds judged on the same letter words, temperature fitted on one half."""

import math

import torch

from distilray.eval import tfree as E
from distilray.models.tfree_lm import build_tfree_lm
from distilray.tfree.dictionary import build_dictionary
from distilray.tfree.hashing import TrigramVocab
from distilray.tfree.wordsplit import encode_document

TEXTS = ["The cat sat on the mat. The cat ate.", "A dog ran in 2024, and the dog sat.", "The mat is red."]


def test_windows_make_every_item_after_the_first_a_target_once():
    spans = E.windows(10, 4)
    targets = [i for s, e in spans for i in range(s + 1, e)]
    assert targets == list(range(1, 10))


def test_tfree_figures_count_letter_words_and_fit_a_temperature():
    torch.manual_seed(0)
    vocab = TrigramVocab(v=256, m=4, k=0)
    model = build_tfree_lm("tfree-micro", v=256, m=4, k=0, max_seq_len=64).eval()
    words = [w for t in TEXTS for w in encode_document(t)]
    dictionary = build_dictionary({w: 1 for w in words}, vocab)
    one = E.tfree_next_word(model, dictionary, TEXTS[:1], 8)
    letters = [w for w in encode_document(TEXTS[0])[1:] if E.LETTER_WORD.fullmatch(w)]
    assert one["letter_words"] == len(letters) and 0 <= one["correct"] <= len(letters)
    assert set(one["nll"]) == set(E.TEMPERATURES) and all(v > 0 for v in one["nll"].values())
    summary = E.evaluate_texts(lambda t: E.tfree_next_word(model, dictionary, t, 8), TEXTS)
    fit = E.tfree_next_word(model, dictionary, TEXTS[:1], 8)
    assert summary["temperature"] == min(fit["nll"], key=fit["nll"].get)
    held = E.tfree_next_word(model, dictionary, TEXTS[1:], 8)
    ref_words = sum(len(E.reference_words(t)) for t in TEXTS[1:])
    assert math.isclose(summary["word_ppl"], math.exp(held["nll"][summary["temperature"]] / ref_words))
    assert math.isfinite(summary["word_ppl"]) and 0.0 <= summary["next_word_acc"] <= 1.0


def test_bpe_word_counts_only_words_whose_tokens_all_predict(small_tokenizer):
    tok, _ = small_tokenizer
    torch.manual_seed(0)
    model = build_tfree_lm("tfree-micro", input="token", v=len(tok), max_seq_len=64).eval()
    figures = E.bpe_next_word(model, tok, TEXTS, 16)
    n_letter_words = sum(len(E.LETTER_WORD.findall(t)) for t in TEXTS) - len(TEXTS)  # the first has no prediction
    assert figures["letter_words"] == n_letter_words and figures["correct"] <= n_letter_words
    assert figures["nll"][1.0] > 0
