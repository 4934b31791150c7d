"""Long-context metrics (reference/token_weighting.md 6-7) on hand-built cases and tiny random models."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from distilray.errors import DistilrayError
from distilray.eval.long_context import (
    PASSKEY_QUESTION,
    ProbeExample,
    key_spans,
    key_token_mask,
    kv_recall_example,
    long_ppl,
    long_ppl_from_losses,
    passkey_example,
    position_bucket_ppl,
    probe_accuracy,
    probe_suite,
    short_window_losses,
    token_losses,
    tokens_in_spans,
)

FILLER = [
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
]
WORDS = "the cat sat on mat a dog ran to big red hat and far away home it was".split()


def _bpe_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with offsets: with vocab_size ~ 256 + specials it is character level on ASCII text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def _word_tokenizer():
    """Whitespace word-level tokenizer over WORDS (id 0 = [UNK]): a tokenization unlike the BPE's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _tiny_lm(vocab_size: int, n_positions: int = 64, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=1,
            n_embd=16,
            n_head=2,
            vocab_size=vocab_size,
            n_positions=n_positions,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


@pytest.fixture(scope="module")
def bpe():
    return _bpe_tokenizer(FILLER + ["key 1234: value 5678. The pass key is 71432. What is it?"], vocab_size=300)


# --- losses ----------------------------------------------------------------------------------------------------


def test_token_losses_match_manual_log_softmax_and_restore_train_mode():
    model = _tiny_lm(50)
    model.train()  # dropout on: token_losses must switch it off and switch train mode back on
    ids = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(1))
    got = token_losses(model, ids)
    assert model.training
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), dim=-1)
    want = torch.tensor([-logp[i, ids[i + 1]] for i in range(19)])
    assert got.shape == (19,) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token_losses(model, ids[None]), got)  # (1, L) accepted
    assert not model.training  # an eval-mode model stays in eval mode
    with pytest.raises(DistilrayError, match="20 tokens"):
        token_losses(model, ids, max_window=16)


def test_short_window_losses_match_direct_per_target_computation():
    K, d, L = 8, 4, 30
    model = _tiny_lm(40).eval()
    ids = torch.randint(0, 40, (L,), generator=torch.Generator().manual_seed(2))
    want = torch.empty(L - 1)
    with torch.no_grad():
        for t in range(1, L):  # target token t, loss index t - 1
            start = max(0, (t - K) // d) * d  # window j = (t - K) // d starts at j * d; t < K: window 0
            assert t < K or K <= t - start <= K + d - 1
            logits = model(input_ids=ids[None, start:t]).logits[0, -1]
            want[t - 1] = -torch.log_softmax(logits, -1)[ids[t]]
    got = short_window_losses(model, ids, K, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short_window_losses(model, ids, K, d, batch_size=1), got, rtol=1e-5, atol=1e-5)
    long = token_losses(model, ids)
    torch.testing.assert_close(got[:K], long[:K], rtol=1e-5, atol=1e-5)  # the first K targets: full context
    assert (got[K:] - long[K:]).abs().max() > 1e-3  # beyond them the context really is shorter
    torch.testing.assert_close(short_window_losses(model, ids[:10], K, d), token_losses(model, ids[:10]))


# --- LongPPL ---------------------------------------------------------------------------------------------------


def test_key_token_mask_is_strict_at_alpha_and_beta():
    long = torch.tensor([1.0, 2.0, 1.0, 0.5, 3.0])
    short = torch.tensor([3.0, 5.0, 3.5, 3.5, 9.0])
    # diff exactly alpha | long exactly -beta | both pass | both pass | long too high
    assert key_token_mask(long, short).tolist() == [False, False, True, True, False]
    assert key_token_mask(long, short, alpha=1.9, beta=-2.1).tolist() == [True, True, True, True, False]
    with pytest.raises(DistilrayError, match="shape"):
        key_token_mask(long, short[:3])


def test_key_spans_shift_by_one_and_merge_only_touching_spans():
    text = "ab cdefg"
    offsets = [(0, 1), (1, 2), (3, 5), (5, 7), (7, 8)]  # "a" "b" "cd" "ef" "g"
    assert [text[s:e] for s, e in offsets] == ["a", "b", "cd", "ef", "g"]
    # loss index i flags token i + 1: index 0 -> "b", not "a"
    assert key_spans(offsets, [True, False, False, False]) == [(1, 2)]
    # "b" ends at 2, "cd" starts at 3: kept apart; "cd" "ef" "g" touch: merged
    assert key_spans(offsets, [True, True, True, True]) == [(1, 2), (3, 8)]
    assert key_spans(offsets, torch.tensor([False, True, False, True])) == [(3, 5), (7, 8)]
    assert key_spans([(0, 1), (1, 1), (1, 2)], [True, True]) == [(1, 2)]  # empty token dropped
    with pytest.raises(DistilrayError, match="one per token after the first"):
        key_spans(offsets, [True] * 5)


def test_tokens_in_spans_needs_the_whole_token_inside_one_span():
    offsets = [(0, 3), (3, 4), (4, 8), (8, 8), (9, 12), (12, 15)]
    spans = [(3, 8), (9, 13)]
    # (3,4) and (4,8) inside the first span; (8,8) empty; (9,12) inside; (12,15) straddles the end
    assert tokens_in_spans(offsets, spans) == [1, 2, 4]
    # a long span followed by a short nested one still covers what only the long one covers
    assert tokens_in_spans([(2, 9), (5, 6)], [(0, 10), (5, 6)]) == [0, 1]
    assert tokens_in_spans(offsets, []) == []


def test_long_ppl_maps_key_tokens_across_different_tokenizers():
    text = "the cat sat on the mat"
    ev_offsets = [(i, i + 1) for i in range(len(text))]  # evaluator: one token per character
    ev_long = torch.full((len(text) - 1,), 1.0)
    ev_short = ev_long.clone()
    for t in (4, 8, 9, 10, 19):  # key characters: "c" of cat, "sat", "m" of mat
        ev_short[t - 1] = 4.0
    model_offsets = [(0, 3), (4, 7), (8, 11), (12, 14), (15, 18), (19, 22)]  # word level
    model_losses = torch.tensor([0.3, 0.7, 1.1, 1.3, 1.7])  # predictions of tokens 1..5
    got = long_ppl_from_losses(ev_offsets, ev_long, ev_short, model_offsets, model_losses)
    # spans (4,5), (8,11), (19,20): only "sat" (model token 2, loss index 1) lies inside one
    assert got == {"long_ppl": pytest.approx(math.exp(0.7)), "key_tokens": 1, "evaluator_key_tokens": 5}
    # evaluator losses for "cat" too (chars 4..6): both "cat" and "sat" scored
    ev_short[4:7] = 4.0
    got = long_ppl_from_losses(ev_offsets, ev_long, ev_short, model_offsets, model_losses)
    assert got["key_tokens"] == 2 and got["long_ppl"] == pytest.approx(math.exp((0.3 + 0.7) / 2))


def test_long_ppl_skips_model_token_zero_and_returns_none_without_key_tokens():
    # an evaluator whose token 0 is empty (BOS-like) lets its token 1 cover the model's token 0
    ev_offsets = [(0, 0), (0, 3), (4, 7)]
    model_offsets = [(0, 3), (4, 7)]
    model_losses = torch.tensor([0.5])
    key_first = long_ppl_from_losses(ev_offsets, torch.zeros(2), torch.tensor([5.0, 0.0]), model_offsets, model_losses)
    assert key_first is None  # the span covers model token 0 only, which has no prediction
    both = long_ppl_from_losses(ev_offsets, torch.zeros(2), torch.tensor([5.0, 5.0]), model_offsets, model_losses)
    assert both == {"long_ppl": pytest.approx(math.exp(0.5)), "key_tokens": 1, "evaluator_key_tokens": 2}
    none = long_ppl_from_losses(ev_offsets, torch.zeros(2), torch.full((2,), 2.0), model_offsets, model_losses)
    assert none is None  # difference exactly alpha: no key token
    with pytest.raises(DistilrayError, match="model losses"):
        long_ppl_from_losses(ev_offsets, torch.zeros(2), torch.zeros(2), model_offsets, torch.zeros(2))


def test_long_ppl_end_to_end_with_two_real_tokenizers(bpe):
    words = _word_tokenizer()
    text = "the cat sat on the mat and a dog ran far away to the big red hat it was home"
    evaluator, model = _tiny_lm(len(bpe), n_positions=128, seed=3), _tiny_lm(len(words), seed=4)
    assert len(bpe(text, add_special_tokens=False)["input_ids"]) > 16
    # thresholds that make every evaluator token a key token: every model word after the first is scored
    got = long_ppl(text, model, words, evaluator, bpe, short_length=8, step=4, alpha=-1e9, beta=-1e9)
    model_ids = torch.tensor(words(text, add_special_tokens=False)["input_ids"])
    model_losses = token_losses(model, model_ids)
    assert got["key_tokens"] == len(model_ids) - 1
    assert got["long_ppl"] == pytest.approx(math.exp(float(model_losses.mean())), rel=1e-5)
    # default thresholds: the same answer as the core applied to the same losses
    enc = bpe(text, add_special_tokens=False, return_offsets_mapping=True)
    ev_ids = torch.tensor(enc["input_ids"])
    ev_long, ev_short = token_losses(evaluator, ev_ids), short_window_losses(evaluator, ev_ids, 8, 4)
    want = long_ppl_from_losses(
        enc["offset_mapping"],
        ev_long,
        ev_short,
        words(text, return_offsets_mapping=True)["offset_mapping"],
        model_losses,
    )
    assert long_ppl(text, model, words, evaluator, bpe, short_length=8, step=4) == want


def test_long_ppl_names_the_tokenizer_without_offsets(bpe):
    class NoOffsets:
        def __call__(self, text, **kwargs):
            return {"input_ids": [1, 2, 3]}

    class Slow:
        def __call__(self, text, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    model = _tiny_lm(len(bpe))
    with pytest.raises(DistilrayError, match="evaluator tokenizer"):
        long_ppl("the cat", model, bpe, model, NoOffsets())
    with pytest.raises(DistilrayError, match="evaluated model's tokenizer"):
        long_ppl("the cat", model, Slow(), model, bpe)


def test_position_buckets_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0])  # positions 1, 2, 3
    b = torch.tensor([4.0, 5.0])  # positions 1, 2
    got = position_bucket_ppl([a, b], boundary=3)
    assert got["tokens"] == 5 and got["ppl"] == pytest.approx(math.exp(15 / 5))  # token-weighted, not per document
    assert got["tokens_before"] == 4 and got["ppl_before"] == pytest.approx(math.exp((1 + 2 + 4 + 5) / 4))
    assert got["tokens_after"] == 1 and got["ppl_after"] == pytest.approx(math.exp(3.0))
    edge = position_bucket_ppl([a], boundary=1)  # no target has fewer than 1 token of context
    assert edge["tokens_before"] == 0 and edge["ppl_before"] is None and edge["tokens_after"] == 3
    assert position_bucket_ppl([a], boundary=100)["ppl_after"] is None
    with pytest.raises(DistilrayError):
        position_bucket_ppl([], boundary=3)


# --- probes ----------------------------------------------------------------------------------------------------


def _needle(ex: ProbeExample) -> str:
    key = ex.answer.strip()
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def test_passkey_example_is_deterministic_and_places_the_needle():
    ex = passkey_example(FILLER, random.Random(7), haystack_chars=2000, depth=0.3)
    assert ex == passkey_example(FILLER, random.Random(7), haystack_chars=2000, depth=0.3)
    assert ex != passkey_example(FILLER, random.Random(8), haystack_chars=2000, depth=0.3)
    key = ex.answer.strip()
    assert ex.answer == " " + key and len(key) == 5 and key.isdigit()
    assert ex.prompt.count(_needle(ex)) == 1 and ex.prompt.count(key) == 2  # the key occurs only in the needle
    assert ex.prompt.startswith("There is an important info") and ex.prompt.endswith(PASSKEY_QUESTION)
    assert len(set(ex.candidates)) == len(ex.candidates) == 5 and ex.candidates[0] == ex.answer
    assert all(c.startswith(" ") and len(c.strip()) == 5 and c.strip().isdigit() for c in ex.candidates)
    assert all(c.strip() not in ex.prompt for c in ex.candidates[1:])
    needle_end = ex.prompt.index(_needle(ex)) + len(_needle(ex))
    assert needle_end + ex.distance_chars == ex.prompt.index(PASSKEY_QUESTION)
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        ex = passkey_example(FILLER, random.Random(1), haystack_chars=3000, depth=depth)
        haystack = ex.prompt.replace(_needle(ex), "")
        intro_len = ex.prompt.index("there.") + len("there.")
        before = ex.prompt.index(_needle(ex)) - intro_len
        total = len(haystack) - intro_len - len(PASSKEY_QUESTION)
        assert abs(before / total - depth) < 0.02, depth
    by_words = passkey_example(FILLER, random.Random(1), haystack_words=300, depth=0.5)
    hay_words = len(by_words.prompt.split()) - len(_needle(by_words).split())
    assert 300 <= hay_words - 20 - len(PASSKEY_QUESTION.split()) <= 310  # intro is 20 words
    with pytest.raises(DistilrayError, match="exactly one"):
        passkey_example(FILLER, random.Random(1), haystack_chars=10, haystack_words=10)


def test_kv_recall_example_is_deterministic_with_one_answer():
    ex = kv_recall_example(random.Random(3), num_pairs=12, query_index=4)
    assert ex == kv_recall_example(random.Random(3), num_pairs=12, query_index=4)
    lines = [line for line in ex.prompt.split("\n") if line.startswith("key ")]
    keys = [line.split()[1].rstrip(":") for line in lines]
    values = [line.split()[3] for line in lines]
    assert len(lines) == 12 and len(set(keys + values)) == 24 and all(len(k) == 4 for k in keys + values)
    assert ex.prompt.endswith(f"The value of key {keys[4]} is") and ex.answer == " " + values[4]
    assert ex.prompt.count(ex.answer.strip()) == 1
    assert ex.candidates[0] == ex.answer and len(set(ex.candidates)) == 5
    assert {c.strip() for c in ex.candidates} <= set(values)
    assert ex.prompt[: len(ex.prompt) - ex.distance_chars].endswith(lines[4])
    assert ex.depth == pytest.approx(4 / 11)
    assert len(kv_recall_example(random.Random(3), num_pairs=3, query_index=0).candidates) == 3
    with pytest.raises(DistilrayError):
        kv_recall_example(random.Random(3), num_pairs=3, query_index=3)


class OracleLM:
    """Puts all its mass on the next token of any stored sequence whose prefix the input follows."""

    def __init__(self, sequences: list[list[int]], vocab_size: int):
        self.sequences, self.vocab_size = sequences, vocab_size
        self.config = SimpleNamespace(n_positions=4096)

    def __call__(self, input_ids: torch.Tensor):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row, ids in enumerate(input_ids.tolist()):
            for seq in self.sequences:
                for t in range(min(len(ids), len(seq) - 1)):
                    if ids[t] != seq[t]:
                        break
                    logits[row, t, seq[t + 1]] = 20.0
        return SimpleNamespace(logits=logits)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_probe_accuracy_exact_and_choice_on_stubs_and_a_tiny_model(bpe):
    rng = random.Random(0)
    examples = [passkey_example(FILLER, rng, haystack_chars=200, depth=0.5) for _ in range(2)]
    examples += [kv_recall_example(rng, num_pairs=4) for _ in range(2)]
    right = OracleLM([_ids(bpe, e.prompt) + _ids(bpe, e.answer) for e in examples], len(bpe))
    assert probe_accuracy(right, bpe, examples, max_length=4096) == {
        "exact": 1.0,
        "choice": 1.0,
        "chance": 0.225,
        "n": 4,
    }
    wrong = OracleLM([_ids(bpe, e.prompt) + _ids(bpe, e.candidates[1]) for e in examples], len(bpe))
    got = probe_accuracy(wrong, bpe, examples, max_length=4096)
    assert got["exact"] == 0.0 and got["choice"] == 0.0
    model = _tiny_lm(len(bpe), n_positions=512)
    got = probe_accuracy(model, bpe, examples, max_length=512)
    assert 0.0 <= got["exact"] <= 1.0 and 0.0 <= got["choice"] <= 1.0 and got["n"] == 4
    too_long = len(_ids(bpe, examples[0].prompt))
    with pytest.raises(DistilrayError, match=f"{too_long} tokens"):
        probe_accuracy(model, bpe, examples[:1], max_length=too_long)


def test_probe_exact_agrees_with_real_greedy_decoding():
    words = _word_tokenizer()
    model = _tiny_lm(len(words), seed=5).eval()
    examples, expected = [], []
    for i in range(6):
        prompt = " ".join(WORDS[i : i + 6])
        ids = torch.tensor([_ids(words, prompt)])
        with torch.no_grad():
            for _ in range(2):  # greedy decoding, one token at a time
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        greedy = ids[0, -2:].tolist()
        if 0 in greedy:  # [UNK] does not round-trip through text
            continue
        answer = " " + " ".join(WORDS[t - 1] for t in greedy)
        other = " " + " ".join(WORDS[(t % len(WORDS))] for t in greedy)  # every word shifted by one
        examples += [
            ProbeExample(prompt, answer, [answer, other], 0, 0.0),
            ProbeExample(prompt, other, [other], 0, 0.0),
        ]
        expected += [1.0, 0.0]
    assert len(examples) >= 4
    assert probe_accuracy(model, words, examples, max_length=64)["exact"] == pytest.approx(
        sum(expected) / len(expected)
    )


def test_probe_suite_groups_by_distance(bpe):
    model = _tiny_lm(len(bpe), n_positions=512)
    got = probe_suite(model, bpe, FILLER, distances=[8, 32], depths=[0.0, 0.5], n_per_cell=1, seed=0, max_length=512)
    assert set(got) == {"passkey", "kv_recall"}
    for task in got.values():
        assert set(task) == {8, 32}
        for cell in task.values():
            assert cell["n"] == 2 and 0.0 <= cell["exact"] <= 1.0 and 0.0 <= cell["choice"] <= 1.0
        assert task[32]["mean_distance_chars"] > task[8]["mean_distance_chars"]
    with pytest.raises(DistilrayError, match="depths"):
        probe_suite(model, bpe, FILLER, distances=[8], depths=[1.0], n_per_cell=1, seed=0, max_length=512)
