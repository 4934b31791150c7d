"""ROUGE-L through rouge-score, against values worked out by hand."""

import pytest

from distilray.eval.rouge import rouge_l


def test_token_ids_lcs_f1_by_hand():
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    # LCS (1, 3): precision 2/2, recall 2/4, F1 = 2 * 1 * 0.5 / 1.5
    assert rouge_l([1, 2, 3, 4], [1, 3]) == pytest.approx(2 / 3)
    # LCS of ABCBDAB and BDCABA has length 4: P = 4/6, R = 4/7, F1 = 8/13
    assert rouge_l(list("ABCBDAB"), list("BDCABA")) == pytest.approx(8 / 13)
    assert rouge_l([1], [2]) == 0.0


def test_empty_side_scores_zero_as_in_rouge_score():
    assert rouge_l([], []) == 0.0 and rouge_l([1, 2], []) == 0.0


def test_tokens_are_kept_as_given():
    # punctuation and case matter between tokens (rouge-score's own tokenizer would drop "," and lowercase)
    assert rouge_l([",", "A", "."], [",", "a", "."]) == pytest.approx(2 / 3)
    # large ids and ids that look alike as text stay distinct
    assert rouge_l([50256, 12, 1], [5025, 61, 21]) == 0.0


def test_strings_use_rouge_scores_tokenizer():
    # "The cat sat on the mat." vs "the cat on a mat": LCS the-cat-on-mat = 4, P = 4/5, R = 4/6
    assert rouge_l("The cat sat on the mat.", "the cat on a mat") == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    with pytest.raises(TypeError):
        rouge_l("a b", ["a", "b"])
