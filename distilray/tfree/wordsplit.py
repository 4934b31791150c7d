"""T-Free pre-tokenization: text <-> words, invertible (reference/tfree.md section 2).

Text is cut into items: every digit, every non-word character (regex \\W) and underscore is an item
of its own, runs of letters form words, and `<|...|>` substrings are special words, never split.
Whitespace is then compressed so that the common case costs nothing:

- one space is expected between two items, except after `NO_SPACE_AFTER` characters, before
  `NO_SPACE_BEFORE` characters (and digits), and around special words;
- an expected space is dropped, a missing expected space becomes `<|no_ws|>`, any other space is
  kept as `<|ws|>`, a newline becomes `<|\\n|>`;
- runs of `<|ws|>` (or `<|\\n|>`) become `<|4<-ws->|>` / `<|2<-ws->|>` run words plus at most one single.

`words_to_text` undoes all of it: `words_to_text(split_words(t)) == t` for every t without a
`<|...|>` substring. Like the repository's pattern, a special word lies on one line (`<|` and `|>` on
different lines are plain characters); the newline marker `<|\n|>` and its runs are the exceptions.
"""

from __future__ import annotations

import itertools
import re

from distilray.errors import DistilrayError

EOT = "<|endoftext|>"
WS = "<|ws|>"
NO_WS = "<|no_ws|>"
NEWLINE = "<|\n|>"

_RUN_MARK = {WS: "ws", NEWLINE: "\n"}  # the single word -> the tag inside its run words


def _run_word(single: str, count: int) -> str:
    return f"<|{count}<-{_RUN_MARK[single]}->|>"


# The dictionary's special words (section 5.1). The repository also lists the 6- and 8-runs, but the
# splitter never emits them (a run of 6 is 4 + 2), so a model never sees them: they are left out.
SPECIAL_WORDS: tuple[str, ...] = (
    EOT,
    NEWLINE,
    NO_WS,
    WS,
    _run_word(WS, 2),
    _run_word(WS, 4),
    _run_word(NEWLINE, 2),
    _run_word(NEWLINE, 4),
)

NO_SPACE_AFTER = frozenset("#$=-+*/'\"\\(<[]~^&@%_\n ")
NO_SPACE_BEFORE = frozenset(".,:;?!=-+*/'\"\\)>]~^&@%_\n ") | frozenset("0123456789")

# The shortest `<|...|>` on one line, as in the repository (so `a <| b` and a later `c |> d`, pipes
# in F# or Elixir code, stay plain text), plus the newline marker and its runs, which hold a newline:
# every special word then splits back into itself.
_SPECIAL_RE = re.compile(r"(<\|[^\n]*?\|>|<\|\n\|>|<\|\d+<-\n->\|>)")
_ITEM_RE = re.compile(r"(\d|\W|_)")
_RUN_RE = re.compile(r"<\|(\d+)<-(ws|\n)->\|>")


def is_special(word: str) -> bool:
    """A word of the `<|...|>` form: hashed whole, never spaced. Every word `split_words` emits that
    contains `<|` has this form, so this agrees with the repository's `"<|" in word` on them."""
    return len(word) >= 4 and word.startswith("<|") and word.endswith("|>")


def has_special(text: str) -> bool:
    """Whether `split_words` would read some substring of raw `text` as a special word."""
    return _SPECIAL_RE.search(text) is not None


def check_user_text(text: str) -> None:
    """Reject user text holding a special word (pitfall 8: `<|endoftext|>` typed into a prompt would
    otherwise reach the model as the real marker)."""
    match = _SPECIAL_RE.search(text)
    if match is not None:
        raise DistilrayError(
            f"text contains {match.group(0)!r} at character {match.start()}: "
            "`<|...|>` is reserved for T-Free special words; remove or escape it"
        )


def _space_expected(before: str, after: str) -> bool:
    """Whether one space is the default between two adjacent plain items."""
    return before[-1] not in NO_SPACE_AFTER and after[0] not in NO_SPACE_BEFORE


def _compress_runs(words: list[str]) -> list[str]:
    """Replace runs of WS (or NEWLINE) by 4- and 2-run words plus at most one single (rule 4)."""
    out: list[str] = []
    for word, group in itertools.groupby(words):
        if word not in _RUN_MARK:
            out.extend(group)
            continue
        pairs, single = divmod(sum(1 for _ in group), 2)
        while pairs > 2:  # the splitter stops at 4: longer runs are rare
            out.append(_run_word(word, 4))
            pairs -= 2
        if pairs > 0:
            out.append(_run_word(word, 2 * pairs))
        if single:
            out.append(word)
    return out


def _split_plain(text: str) -> list[str]:
    """Words of text that holds no special word (rules 2 to 4)."""
    items = [s for s in _ITEM_RE.split(text) if s]
    words: list[str] = []
    for i, item in enumerate(items):
        before = items[i - 1] if i > 0 else None
        after = items[i + 1] if i + 1 < len(items) else None
        if item == " ":
            # the one expected space between two items is implied; any other space is kept
            if before is None or after is None or not _space_expected(before, after):
                words.append(WS)
            continue
        if before is not None and before != " " and _space_expected(before, item):
            words.append(NO_WS)  # a space was expected here but the text has none
        words.append(NEWLINE if item == "\n" else item)
    return _compress_runs(words)


def split_words(text: str, strip: bool = False) -> list[str]:
    """Text -> T-Free words.

    strip=True strips the text first, as training does with its segments. The default (False) is
    inference's: the prompt is taken as is, so " Hello" starts with `<|ws|>` and a trailing space
    ends the prompt on `<|ws|>` (pitfall 12); callers strip prompts when they want training's view.
    """
    if strip:
        text = text.strip()
    words: list[str] = []
    # re.split with one capture group alternates plain text (even) and special words (odd)
    for i, piece in enumerate(_SPECIAL_RE.split(text)):
        if i % 2:
            words.append(piece)
        elif piece:
            words.extend(_split_plain(piece))
    return words


def encode_document(text: str) -> list[str]:
    """A pre-training document's words: `text + EOT`, stripped as one string. So leading whitespace
    goes while trailing whitespace before EOT stays ("Hi.  " -> Hi . <|2<-ws->|> <|endoftext|>)."""
    return split_words((text + EOT).strip())


def _expand_runs(words: list[str]) -> list[str]:
    out: list[str] = []
    for word in words:
        match = _RUN_RE.fullmatch(word)
        if match is None:
            out.append(word)
        else:
            single = WS if match.group(2) == "ws" else NEWLINE
            out.extend([single] * int(match.group(1)))
    return out


def words_to_text(words: list[str]) -> str:
    """The inverse of `split_words`: expand runs, put back each implied space, map the markers.

    Any word list is accepted (a model's output included); empty words carry nothing and are skipped.
    Special words other than the whitespace markers stay as their text (`<|endoftext|>`).
    """
    items = _expand_runs([w for w in words if w])
    parts: list[str] = []
    for i, word in enumerate(items):
        if i > 0:
            before = items[i - 1]
            if not is_special(before) and not is_special(word) and _space_expected(before, word):
                parts.append(" ")
        if word == WS:
            parts.append(" ")
        elif word == NEWLINE:
            parts.append("\n")
        elif word != NO_WS:
            parts.append(word)
    return "".join(parts)
