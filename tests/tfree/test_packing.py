"""distilray.tfree.packing: pre-training packing (positions reset per document, EOT only a target,
overflow cut, padding), fine-tuning loss flags, and samples drawn from an aligned store."""

from __future__ import annotations

import numpy as np
import pytest

from distilray.tfree import textstore as ts
from distilray.tfree.packing import (
    PAD_DOC_ID,
    PAD_WORD,
    PackedSample,
    pack_instruction,
    pack_pretraining,
    pretraining_sample,
)
from distilray.tfree.wordsplit import EOT, encode_document, split_words

DOC_A = ["a1", "a2", "a3", EOT]  # 3 positions
DOC_B = ["b1", "b2", EOT]  # 2 positions
DOC_C = ["c1", "c2", "c3", "c4", EOT]  # 4 positions


def _check_shapes(sample: PackedSample, seq_len: int) -> None:
    assert sample.seq_len == seq_len
    assert len(sample.targets) == seq_len
    assert sample.loss_weights.dtype == np.float32 and sample.loss_weights.shape == (seq_len,)
    assert sample.positions.dtype == np.int64 and sample.doc_ids.dtype == np.int64


def test_documents_pack_with_reset_positions_and_a_cut_overflow():
    docs = iter([DOC_A, DOC_B, DOC_C, ["never", "read", EOT]])
    sample = pack_pretraining(docs, seq_len=7)
    _check_shapes(sample, 7)
    assert sample.inputs == ["a1", "a2", "a3", "b1", "b2", "c1", "c2"]
    assert sample.targets == ["a2", "a3", EOT, "b2", EOT, "c2", "c3"]  # DOC_C's overflow is cut
    assert sample.positions.tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert sample.doc_ids.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert sample.loss_weights.tolist() == [1.0] * 7
    assert EOT not in sample.inputs
    assert next(docs) == ["never", "read", EOT]  # stops reading once full


def test_documents_that_run_out_are_padded():
    sample = pack_pretraining([DOC_B, [EOT], DOC_A], seq_len=8)  # [EOT] alone gives no pair and no doc id
    assert sample.inputs[:5] == ["b1", "b2", "a1", "a2", "a3"]
    assert sample.doc_ids.tolist() == [0, 0, 1, 1, 1, PAD_DOC_ID, PAD_DOC_ID, PAD_DOC_ID]
    assert sample.loss_weights.tolist() == [1.0] * 5 + [0.0] * 3
    assert sample.inputs[5:] == [PAD_WORD] * 3 and sample.targets[5:] == [PAD_WORD] * 3
    assert sample.positions.tolist()[5:] == [0, 0, 0]
    assert sample.num_real == 5
    assert EOT not in [w for w, d in zip(sample.inputs, sample.doc_ids) if d != PAD_DOC_ID]


def test_real_documents_and_bad_input():
    texts = ["  The cat sat.  ", "In 2024 it rained.\n\nThen it stopped."]
    sample = pack_pretraining((encode_document(t) for t in texts), seq_len=64)
    first = encode_document(texts[0])
    assert first[0] == "The"  # leading whitespace stripped for pre-training
    assert sample.inputs[: len(first) - 1] == first[:-1] and sample.targets[len(first) - 2] == EOT
    with pytest.raises(ValueError, match="end in"):
        pack_pretraining([["no", "eot"]], seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        pack_pretraining([DOC_A], seq_len=0)


def test_instruction_loss_follows_the_target_segment():
    segments = [("  Question: what is 2+2?  ", False), (" It is 4. ", True)]
    prompt, answer = split_words("Question: what is 2+2?"), split_words("It is 4.")
    sample = pack_instruction(segments, seq_len=32)
    _check_shapes(sample, 32)
    words = prompt + answer + [EOT]
    n = len(words) - 1
    assert sample.inputs[:n] == words[:-1] and sample.targets[:n] == words[1:]
    # target p is words[p + 1]: the answer's words and the closing EOT are learned, the prompt is not
    expected = [0.0] * (len(prompt) - 1) + [1.0] * len(answer) + [1.0]
    assert sample.loss_weights[:n].tolist() == expected
    assert sample.positions[:n].tolist() == list(range(n)) and set(sample.doc_ids[:n].tolist()) == {0}
    assert sample.loss_weights[n:].sum() == 0 and set(sample.doc_ids[n:].tolist()) == {PAD_DOC_ID}


def test_instruction_cut_and_prompt_only():
    long = pack_instruction([("a b c d e f g h", False), ("i j k l", True)], seq_len=9)
    assert long.num_real == 9 and long.loss_weights.tolist() == [0.0] * 7 + [1.0] * 2
    prompt_only = pack_instruction([("just a prompt", False)], seq_len=6)
    assert prompt_only.loss_weights.sum() == 0  # nothing to learn, EOT included
    assert pack_instruction([("", True), ("hi", True)], seq_len=3).inputs[:1] == ["hi"]  # empty segment: no words


def test_pretraining_sample_fills_from_random_documents(tmp_path):
    docs = [f"Document number {i} has some words in it." for i in range(30)]
    ts.write_text_store(tmp_path / "s", docs)
    ts.write_aligned_index(tmp_path / "s", min_bytes=100, seed=42)
    store, aligned = ts.TextStore(tmp_path / "s"), ts.AlignedIndex(tmp_path / "s", 100, 42)
    entry_words = [encode_document(docs[i]) for i in aligned[0]]
    n_entry = sum(len(w) - 1 for w in entry_words)
    seq_len = n_entry + 25  # more than the entry holds
    sample = pretraining_sample(store, aligned, 0, seq_len, np.random.default_rng(0))
    assert sample.num_real == seq_len  # pre-training sequences are always full
    expected = [w for words in entry_words for w in words[:-1]]
    assert sample.inputs[:n_entry] == expected
    assert sample.doc_ids[n_entry - 1] == len(entry_words) - 1 and sample.doc_ids[-1] > len(entry_words) - 1
    again = pretraining_sample(store, aligned, 0, seq_len, np.random.default_rng(0))
    assert again.inputs == sample.inputs  # a seeded rng draws the same fill
    short = pretraining_sample(store, aligned, 0, 5, np.random.default_rng(0))
    assert short.inputs == expected[:5]


def test_pretraining_sample_of_a_store_of_empty_texts_pads(tmp_path):
    ts.write_text_store(tmp_path / "s", ["", "   "])
    ts.write_aligned_index(tmp_path / "s", 10, 42)
    sample = pretraining_sample(
        ts.TextStore(tmp_path / "s"), ts.AlignedIndex(tmp_path / "s", 10, 42), 0, 4, np.random.default_rng(0)
    )
    assert sample.num_real == 0  # ends instead of drawing forever
