"""T-Free training samples: words in, (input word, target word) pairs out, `seq_len` of them.

Pre-training (reference/tfree.md section 6, the seed's data/dataset.py): each document is encoded on its
own as `text + "<|endoftext|>"` with leading whitespace stripped (`wordsplit.encode_document`); within a
document, position p has input `words[p]` and target `words[p + 1]`, so the first word is only an input and
`<|endoftext|>` only a target, never an input. Documents are concatenated until the sequence is full and
the overflow is cut; positions restart at 0 in each document and `doc_ids` (0, 1, 2, ...) tell the
attention mask where documents end.

Fine-tuning: one conversation per sample; each segment is split with both sides stripped, the segments
are concatenated and `<|endoftext|>` ends them; a target position has loss weight 1 when its target word
comes from a segment with `has_loss`.

Padding (fine-tuning always, pre-training only when the documents run out): input and target are
`PAD_WORD` (`<|endoftext|>`, a word every dictionary holds), loss weight 0, doc id -1, position 0. A
model must mask padding by doc id or weight, not by word: the pad word is an ordinary word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from distilray.tfree.textstore import AlignedIndex, TextStore
from distilray.tfree.wordsplit import EOT, encode_document, split_words

PAD_WORD = EOT
PAD_DOC_ID = -1
MAX_FILL_DRAWS = 1000  # extra random documents tried beyond seq_len: only a store of empty texts needs it


@dataclass(frozen=True)
class PackedSample:
    """One training sequence of S word positions."""

    inputs: list[str]  # (S,) input word at each position
    targets: list[str]  # (S,) the word to predict there
    loss_weights: np.ndarray  # (S,) float32: 1 where the target is learned, 0 on padding / prompt words
    positions: np.ndarray  # (S,) int64: position inside its document, from 0
    doc_ids: np.ndarray  # (S,) int64: document number inside the sample from 0, PAD_DOC_ID on padding

    def __post_init__(self) -> None:
        sizes = {len(self.inputs), len(self.targets), len(self.loss_weights), len(self.positions), len(self.doc_ids)}
        if len(sizes) != 1:
            raise ValueError(f"a PackedSample's fields differ in length: {sorted(sizes)}")

    @property
    def seq_len(self) -> int:
        return len(self.inputs)

    @property
    def num_real(self) -> int:
        """Positions that are not padding."""
        return int((self.doc_ids != PAD_DOC_ID).sum())


class _Builder:
    """Fills the S positions, then pads; callers stop feeding it once `full`."""

    def __init__(self, seq_len: int, pad=PAD_WORD) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.seq_len, self.pad = seq_len, pad
        self.inputs: list[str] = []
        self.targets: list[str] = []
        self.weights: list[float] = []
        self.positions: list[int] = []
        self.doc_ids: list[int] = []

    @property
    def full(self) -> bool:
        return len(self.inputs) >= self.seq_len

    def add_document(self, words: list[str], target_weights: list[float], doc_id: int) -> int:
        """Add the (words[p], words[p+1]) pairs of one document, cut at the end of the sequence; the weight
        of pair p is target_weights[p + 1]. Returns how many positions were added."""
        n = min(len(words) - 1, self.seq_len - len(self.inputs))
        if n <= 0:
            return 0
        self.inputs += words[:n]
        self.targets += words[1 : n + 1]
        self.weights += target_weights[1 : n + 1]
        self.positions += range(n)
        self.doc_ids += [doc_id] * n
        return n

    def build(self) -> PackedSample:
        pad = self.seq_len - len(self.inputs)
        return PackedSample(
            inputs=self.inputs + [self.pad] * pad,
            targets=self.targets + [self.pad] * pad,
            loss_weights=np.array(self.weights + [0.0] * pad, dtype=np.float32),
            positions=np.array(self.positions + [0] * pad, dtype=np.int64),
            doc_ids=np.array(self.doc_ids + [PAD_DOC_ID] * pad, dtype=np.int64),
        )


def pack_pretraining(documents_words: Iterable[list], seq_len: int, end=EOT) -> PackedSample:
    """Pack encoded documents (each `encode_document(text)`, ending in EOT) into `seq_len` positions.

    The iterable is read only until the sequence is full, so it may be endless. A document that gives no
    pair (EOT alone: an empty text) takes no doc id. The BPE baseline packs token ids the same way, with its
    end-of-text id as `end` (and as padding)."""
    builder = _Builder(seq_len, pad=end)
    doc_id = 0
    for words in documents_words:
        if not words or words[-1] != end:
            raise ValueError(f"a pre-training document must end in {end!r} (encode it with encode_document)")
        if builder.add_document(list(words), [1.0] * len(words), doc_id):
            doc_id += 1
        if builder.full:
            break
    return builder.build()


def pack_instruction(segments: list[tuple[str, bool]], seq_len: int) -> PackedSample:
    """One conversation -> one sample, cut at `seq_len` or padded to it.

    The closing EOT is learned when the last segment has loss (the answer's end), like the answer's words."""
    words: list[str] = []
    weights: list[float] = []
    for text, has_loss in segments:
        segment_words = split_words(text.strip())
        words += segment_words
        weights += [float(has_loss)] * len(segment_words)
    words.append(EOT)
    weights.append(float(segments[-1][1]) if segments else 0.0)
    builder = _Builder(seq_len)
    builder.add_document(words, weights, 0)
    return builder.build()


def pretraining_sample(
    store: TextStore,
    aligned: AlignedIndex,
    entry: int,
    seq_len: int,
    rng: np.random.Generator,
    encode: Callable[[str], list] = encode_document,
    end=EOT,
) -> PackedSample:
    """The sample of one aligned entry: its documents in order, then, if they do not fill `seq_len`,
    further documents drawn uniformly with `rng` (the seed README: "filled with a random further item").
    `encode` and `end` default to T-Free's words; the BPE baseline passes its tokenizer and end-of-text id."""

    def documents() -> Iterator[list]:
        for i in aligned[entry]:
            yield encode(store[i])
        if len(store) == 0:
            return
        for _ in range(seq_len + MAX_FILL_DRAWS):  # each non-empty draw adds >= 1 position
            yield encode(store[int(rng.integers(len(store)))])

    return pack_pretraining(documents(), seq_len, end=end)
