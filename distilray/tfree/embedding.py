"""T-Free's input side on its own, for any transformer (the standalone module users of the original ask for,
reference/tfree.md 10.6): text -> words -> the sum of each word's hashed trigram rows, (B, S, d), ready to
pass as `inputs_embeds` to a Hugging Face model. The output side is a plain `nn.Linear(d, v)` trained with
`losses.tfree.tfree_bce` on `TrigramTokenizer.targets`; decoding is `decoding/tfree.py`."""

from __future__ import annotations

import math

import torch
from torch import nn

from distilray.errors import DistilrayError
from distilray.tfree.hashing import TrigramVocab, hasher_for
from distilray.tfree.wordsplit import EOT, split_words, words_to_text


class TrigramTokenizer:
    """Words in place of token ids: `encode` splits text, `decode` joins words back (the exact inverse),
    `bags` and `targets` give the flat row lists a model and its loss read."""

    def __init__(self, vocab: TrigramVocab = TrigramVocab()) -> None:
        self.vocab = vocab
        self.hasher = hasher_for(vocab)

    def encode(self, text: str) -> list[str]:
        return split_words(text)

    def decode(self, words: list[str]) -> str:
        return words_to_text(words)

    def pad(self, batch: list[list[str]]) -> tuple[list[list[str]], torch.Tensor]:
        """Rows padded to one length with EOT, and the (B, S) mask of real words."""
        length = max(len(words) for words in batch)
        mask = torch.tensor([[i < len(words) for i in range(length)] for words in batch])
        return [words + [EOT] * (length - len(words)) for words in batch], mask

    def bags(self, batch: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Equal-length rows of words -> (rows, offsets) for a sum-EmbeddingBag, offsets one per word."""
        flat, offsets = self.hasher.encode([w for words in batch for w in words])
        return torch.from_numpy(flat), torch.from_numpy(offsets[:-1])

    def targets(self, batch: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Equal-length rows of words -> each word's pattern as (flat rows, offsets with the end): the
        multi-label targets `losses.tfree.tfree_bce` builds on the device."""
        flat, offsets = self.hasher.targets([w for words in batch for w in words])
        return torch.from_numpy(flat), torch.from_numpy(offsets)


class TrigramEmbedding(nn.Module):
    """v hashed rows of width d; a word's vector is the sum of its trigrams' m rows each (repeats count)."""

    def __init__(self, vocab: TrigramVocab, dim: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.bag = nn.EmbeddingBag(vocab.v, dim, mode="sum")
        nn.init.normal_(self.bag.weight, std=math.sqrt(2 / (5 * dim)))  # the original's "pythia" init

    def forward(self, batch: list[list[str]]) -> torch.Tensor:
        """Equal-length rows of words (pad with `TrigramTokenizer.pad`) -> (B, S, d)."""
        lengths = {len(words) for words in batch}
        if len(lengths) != 1:
            raise DistilrayError(f"rows must have one length (pad them first), got lengths {sorted(lengths)}")
        rows, offsets = TrigramTokenizer(self.vocab).bags(batch)
        device = self.bag.weight.device
        return self.bag(rows.to(device), offsets.to(device)).view(len(batch), lengths.pop(), -1)
