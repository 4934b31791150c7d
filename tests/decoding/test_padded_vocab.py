"""A target whose logits are wider than its tokenizer (T5: 32128 for 32100; Pythia), with every drafter
kind: vocab_limit = len(tokenizer) masks the padded columns, drafters sized to the tokenizer are accepted,
greedy output is the masked target's own and no sampled id is a padded one."""

from __future__ import annotations

import pytest
import torch

from distilray.decoding.drafter_api import check_same_vocab
from distilray.decoding.drafters import HFDrafter
from distilray.decoding.speculative import plain_generate, speculative_generate
from distilray.errors import DistilrayError
from distilray.models.conv_drafter import ConvDrafter, ConvDrafterConfig, ConvDrafterState
from distilray.models.lstm_drafter import LSTMDrafter, LSTMDrafterConfig, LSTMDrafterState
from distilray.models.ngram import NGramDrafter
from distilray.tokenizer import encode_documents

PAD = 8  # logit columns past the tokenizer


def _pad(model: torch.nn.Module, vocab: int) -> torch.nn.Module:
    """PAD more output rows, copies of real rows amplified: unmasked, the padded ids would win often."""
    model.resize_token_embeddings(vocab + PAD, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight  # (vocab + PAD, d)
        weight[vocab:] = 1.5 * weight[torch.arange(PAD) * 7 + 50]
    return model.eval()


@pytest.fixture(scope="module")
def setup(pydoc_tokenizer, tiny_lm, one_thread):
    from pydoc_data.topics import topics

    tok = pydoc_tokenizer(12, 300)
    vocab = len(tok)
    target = _pad(tiny_lm(tok, 0), vocab)
    ids = encode_documents(tok, list(topics.values())[:12])
    torch.manual_seed(1)
    drafters = {
        "ngram3": NGramDrafter(3, vocab).fit(ids),
        "cnn": ConvDrafterState(ConvDrafter(ConvDrafterConfig(vocab_size=vocab, d_model=32))),
        "lstm": LSTMDrafterState(LSTMDrafter(LSTMDrafterConfig(vocab_size=vocab, d_model=32))),
        "padded transformer": HFDrafter(_pad(tiny_lm(tok, 1), vocab)),  # as wide as the target
        "transformer": HFDrafter(tiny_lm(tok, 2)),  # sized to the tokenizer
    }
    prompts = [seq[:10] for seq in ids[:2]]
    return tok, target, drafters, prompts


def masked_greedy(model, prompt: list[int], n: int, vocab: int) -> list[int]:
    """Reference: the argmax over the real columns only, recomputing the whole prefix (no cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1, :vocab].argmax()))
    return seq[len(prompt) :]


def test_every_drafter_kind_decodes_a_padded_target_greedily(setup):
    tok, target, drafters, prompts = setup
    vocab = len(tok)
    assert target.get_output_embeddings().weight.shape[0] == vocab + PAD
    unmasked = plain_generate(target, prompts[0], 20).token_ids
    assert any(t >= vocab for t in unmasked)  # without the mask the target emits undecodable ids
    for prompt in prompts:
        want = masked_greedy(target, prompt, 20, vocab)
        assert plain_generate(target, prompt, 20, vocab_limit=vocab).token_ids == want
        for kind, drafter in drafters.items():
            got = speculative_generate(target, drafter, prompt, 20, gamma=3, vocab_limit=vocab)
            assert got.token_ids == want, kind
            assert got.drafted > 0 and got.accepted + got.rejections > 0, kind


def test_sampling_never_emits_a_padded_id(setup):
    tok, target, drafters, prompts = setup
    vocab = len(tok)
    plain = [plain_generate(target, prompts[0], 24, temperature=1.0, seed=s).token_ids for s in range(3)]
    assert any(t >= vocab for ids in plain for t in ids)  # unmasked sampling does emit padded ids
    for kind in ("ngram3", "cnn", "padded transformer"):
        accepted = rejections = 0
        for seed in range(4):
            for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
                rec = speculative_generate(
                    target, drafters[kind], prompts[seed % 2], 24, gamma=3,
                    temperature=temperature, top_p=top_p, seed=seed, vocab_limit=vocab,
                )  # fmt: skip
                assert len(rec.token_ids) == 24 and max(rec.token_ids) < vocab, kind
                accepted, rejections = accepted + rec.accepted, rejections + rec.rejections
        assert accepted > 0 and rejections > 0, kind  # accepted drafts and residual samples both ran
        rec = plain_generate(target, prompts[1], 24, temperature=1.0, seed=7, vocab_limit=vocab)
        assert max(rec.token_ids) < vocab


def test_vocab_limit_is_checked(setup):
    tok, target, drafters, prompts = setup
    vocab = len(tok)
    ngram = drafters["ngram3"]
    with pytest.raises(DistilrayError, match="vocabularies differ.*vocab_limit"):
        speculative_generate(target, ngram, prompts[0], 4)  # default: the widths must be equal, as before
    check_same_vocab(vocab + PAD, ngram, vocab_limit=vocab)
    check_same_vocab(vocab + PAD, drafters["padded transformer"], vocab_limit=vocab)
    with pytest.raises(DistilrayError, match="vocabularies differ"):
        check_same_vocab(vocab + PAD, NGramDrafter(2, vocab - 1), vocab_limit=vocab)  # misses real tokens
    with pytest.raises(DistilrayError, match="vocabularies differ"):
        check_same_vocab(vocab + PAD, NGramDrafter(2, vocab + PAD + 1), vocab_limit=vocab)  # wider than the target
    with pytest.raises(DistilrayError, match="vocab_limit"):
        plain_generate(target, prompts[0], 4, vocab_limit=vocab + PAD + 1)
    with pytest.raises(DistilrayError, match="padded id"):
        plain_generate(target, [5, vocab + 1], 4, vocab_limit=vocab)
