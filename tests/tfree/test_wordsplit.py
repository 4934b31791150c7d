"""The T-Free word splitter against reference/tfree.md section 2 and the repository's own examples."""

from __future__ import annotations

import random
import re

import pytest

from distilray.errors import DistilrayError
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

WS2, WS4 = "<|2<-ws->|>", "<|4<-ws->|>"
NL2, NL4 = "<|2<-\n->|>", "<|4<-\n->|>"


@pytest.mark.parametrize(
    "text, words",
    [
        ("", []),
        ("In 2024", ["In", WS, "2", "0", "2", "4"]),  # the space before a digit is unexpected, so kept
        ("Hello World!", ["Hello", "World", "!"]),
        ("Hello\nWorld!", ["Hello", NEWLINE, "World", "!"]),
        ("Hello World!<|endoftext|>abc", ["Hello", "World", "!", EOT, "abc"]),
        ("Hello<|startoftext|> World!", ["Hello", "<|startoftext|>", WS, "World", "!"]),
        ("ab_cd", ["ab", "_", "cd"]),
        ("a\tb", ["a", NO_WS, "\t", NO_WS, "b"]),
        ("(a) b", ["(", "a", ")", "b"]),
        ("x( y", ["x", NO_WS, "(", WS, "y"]),  # a space is expected before "(", none after it
        ("Stra\u00dfe 中文", ["Stra\u00dfe", "中文"]),
        (
            "This is a <|test with some numbers 1234.",
            ["This", "is", "a", "<", "|", NO_WS, "test", "with", "some", "numbers", WS, "1", "2", "3", "4", "."],
        ),
    ],
)
def test_split_examples(text: str, words: list[str]) -> None:
    assert split_words(text) == words
    assert words_to_text(words) == text


@pytest.mark.parametrize(
    "run, words",
    [
        (1, []),  # the one expected space is implied
        (2, [WS2]),
        (3, [WS2, WS]),
        (4, [WS4]),
        (5, [WS4, WS]),  # the reference's examples: 5 and 7 spaces
        (6, [WS4, WS2]),
        (7, [WS4, WS2, WS]),
        (8, [WS4, WS4]),
        (13, [WS4, WS4, WS4, WS]),
    ],
)
def test_space_runs(run: int, words: list[str]) -> None:
    text = "a" + " " * run + "b"
    assert split_words(text) == ["a", *words, "b"]
    assert words_to_text(split_words(text)) == text


def test_newline_runs() -> None:
    assert split_words("a\n\n\n\n\nb") == ["a", NL4, NEWLINE, "b"]
    assert split_words("\n\n\n\n\n\n\n") == [NL4, NL2, NEWLINE]
    assert split_words("a \n\n b") == ["a", WS, NL2, WS, "b"]


def test_splitter_emits_only_2_and_4_runs() -> None:
    for run in range(1, 40):
        for char in " \n":
            words = split_words(char * run)
            assert set(words) <= set(SPECIAL_WORDS), words
            assert words_to_text(words) == char * run


def test_longer_runs_decode() -> None:
    # the 6- and 8-runs are not in SPECIAL_WORDS, but a decoder given one still expands it
    assert words_to_text(["a", "<|6<-ws->|>", "b"]) == "a      b"
    assert words_to_text(["a", "<|8<-\n->|>", "b"]) == "a" + "\n" * 8 + "b"


def test_encode_document_strips_only_the_front() -> None:
    assert encode_document("Hi.  ") == ["Hi", ".", WS2, EOT]
    assert encode_document("  \n Hi.") == ["Hi", ".", EOT]
    assert encode_document("") == [EOT]
    assert encode_document("Hi\n") == ["Hi", NEWLINE, EOT]


def test_strip_only_when_asked() -> None:
    assert split_words(" Hello ") == [WS, "Hello", WS]  # inference: a start never seen in training
    assert split_words(" Hello ", strip=True) == ["Hello"]


def test_words_to_text_handles_any_word_list() -> None:
    assert words_to_text([]) == ""
    assert words_to_text(["Hello", "", "world"]) == "Hello world"
    assert words_to_text(["Hello", "world", EOT]) == "Hello world<|endoftext|>"
    assert words_to_text([NO_WS, "a", NO_WS, NO_WS, "b"]) == "ab"


def test_special_words() -> None:
    assert SPECIAL_WORDS == (EOT, NEWLINE, NO_WS, WS, WS2, WS4, NL2, NL4)
    assert NEWLINE == "<|\n|>"
    for word in SPECIAL_WORDS:
        assert is_special(word)
        assert split_words(word) == [word]  # every special word reads back as itself
    assert not is_special("<|>")
    assert not is_special("Hello")


def test_check_user_text() -> None:
    check_user_text("a < b | c > d, a <| b\nc |> d")  # no `<|...|>` on one line
    assert not has_special("x <| y")
    for text, found in [("hi <|endoftext|> there", "<|endoftext|>"), ("<|\n|>", "<|\n|>"), ("a<||>b", "<||>")]:
        assert has_special(text)
        with pytest.raises(DistilrayError, match=re.escape(repr(found))):
            check_user_text(text)


ALPHABET = "aZbYcé ßx中Q" + "0123456789" + ".,:;?!=-+*/'\"\\()<>[]{}~^&@%_#$|" + "     \n\n\t\r" + "\U0001f600\u0301"


def test_roundtrip_random_texts() -> None:
    rng = random.Random(1234)
    checked = 0
    for _ in range(4000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        if has_special(text):
            continue
        words = split_words(text)
        assert all(words), text
        assert words_to_text(words) == text, (text, words)
        checked += 1
    assert checked > 3500
