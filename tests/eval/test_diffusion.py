"""The pinned diffusion-LM harness: Gen PPL of stub evaluators, unigram entropy, LAMBADA splitting,
accuracy and per-word perplexity of stub denoisers (reference/sdtt.md 3)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distilray.errors import DistilrayError
from distilray.eval.diffusion import (
    HARNESS,
    gen_ppl,
    lambada_accuracy,
    lambada_examples,
    lambada_ppl,
    split_lambada,
    tokenize_lambada,
    unigram_entropy,
)
from distilray.losses.mdlm import NEG_INF


class StubLM(nn.Module):
    """A causal LM whose logits at each position are `table[input token]` (a bigram model); fp32."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table = nn.Parameter(table.to(dtype), requires_grad=False)
        self.config = SimpleNamespace(vocab_size=table.shape[0])

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])  # (B, L, V)


# --- entropy --------------------------------------------------------------------------------------------------


def test_unigram_entropy_of_constant_uniform_and_mixed_samples():
    assert unigram_entropy(torch.full((3, 16), 7)) == 0.0
    v = 8
    uniform = torch.stack([torch.randperm(v) for _ in range(4)])  # every token once per sample
    assert unigram_entropy(uniform) == pytest.approx(math.log(v))
    # mean over samples, not the entropy of the pooled counts
    assert unigram_entropy(torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]])) == pytest.approx(math.log(2) / 2)


# --- generative perplexity ------------------------------------------------------------------------------------


def test_gen_ppl_of_a_uniform_evaluator_is_the_vocabulary_size():
    v = 11
    samples = torch.randint(0, v, (5, 9), generator=torch.Generator().manual_seed(0))
    out = gen_ppl(StubLM(torch.zeros(v, v)), samples, batch_size=2)
    assert out["gen_ppl"] == pytest.approx(v, rel=1e-6)
    assert out["mean_nll"] == pytest.approx(math.log(v), rel=1e-6)
    assert out["samples"] == 5 and out["tokens"] == 5 * 8  # tokens 2..L of each sample
    assert out["entropy"] == pytest.approx(unigram_entropy(samples))
    assert out["harness"]["form"] == "sdtt" and out["harness"]["bos_prepended"] is False


def test_gen_ppl_is_exp_of_the_mean_over_samples_of_each_samples_mean_nll():
    assert "per-sample" in HARNESS["mean"] and HARNESS["evaluator_precision"] == "float32"
    assert "EOS" in HARNESS["eos_rule"] and "2..L" in HARNESS["scored_tokens"]
    table = 3.0 * torch.eye(4)  # predicts a repeat of the last token
    lm = StubLM(table)
    repeat, alternate = [0, 0, 0, 0, 0], [0, 1, 0, 1, 0]
    out = gen_ppl(lm, torch.tensor([repeat, alternate]))
    logp = F.log_softmax(table, dim=-1)
    per_sample = [float(-torch.stack([logp[a, b] for a, b in zip(s[:-1], s[1:])]).mean()) for s in (repeat, alternate)]
    want = sum(per_sample) / 2
    assert out["mean_nll"] == pytest.approx(want, rel=1e-6)
    assert out["gen_ppl"] == pytest.approx(math.exp(want), rel=1e-6)
    # Not the mean of per-sample perplexities (a different, larger figure).
    assert out["gen_ppl"] < sum(math.exp(n) for n in per_sample) / 2
    # Samples of equal length: the per-sample mean equals the token-weighted mean.
    all_tokens = torch.stack([logp[a, b] for s in (repeat, alternate) for a, b in zip(s[:-1], s[1:])])
    assert out["mean_nll"] == pytest.approx(float(-all_tokens.mean()), rel=1e-6)
    # Batching does not change the figure.
    assert gen_ppl(lm, torch.tensor([repeat, alternate]), batch_size=1)["mean_nll"] == pytest.approx(want, rel=1e-6)


def test_gen_ppl_rejects_foreign_ids_and_low_precision_evaluators():
    lm = StubLM(torch.zeros(4, 4))
    with pytest.raises(DistilrayError, match="vocabulary"):
        gen_ppl(lm, torch.tensor([[0, 1, 4]]))  # 4 = a [MASK] left in the sample
    with pytest.raises(DistilrayError, match="float32"):
        gen_ppl(StubLM(torch.zeros(4, 4), dtype=torch.bfloat16), torch.tensor([[0, 1, 2]]))
    with pytest.raises(DistilrayError, match="L >= 2"):
        gen_ppl(lm, torch.tensor([[0]]))


# --- LAMBADA: data --------------------------------------------------------------------------------------------


def test_split_at_the_last_space_keeps_the_leading_space():
    assert split_lambada("`` nineteen , '' she said to claire") == ("`` nineteen , '' she said to", " claire")
    assert split_lambada("a b c \n") == ("a b", " c")
    with pytest.raises(DistilrayError):
        split_lambada("word")


def test_lambada_examples_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "dev.txt"
    txt.write_text("the cat sat on the mat\n\nshe said hello\n", encoding="utf-8")
    assert lambada_examples(txt) == ["the cat sat on the mat", "she said hello"]
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["A b c", "D e"]) + "\n", encoding="utf-8")
    assert lambada_examples(jsonl) == ["A b c", "D e"]
    with pytest.raises(DistilrayError, match="not found"):
        lambada_examples(tmp_path / "missing.txt")


def test_lambada_dev_file_of_the_shared_data():
    texts = lambada_examples()  # ../shared/data is beside every checkout, CI's included
    assert len(texts) == 4869
    prefix, target = split_lambada(texts[0])
    assert target.startswith(" ") and " " not in target[1:] and texts[0].startswith(prefix)


class CharTokenizer:
    """One id per character: ord(c) - 31 for printable ASCII (space = 1)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens
        return [ord(c) - 31 for c in text]


def test_tokenize_lambada_encodes_prefix_and_target_with_its_space():
    [(prefix, target)] = tokenize_lambada(["ab cd"], CharTokenizer())
    assert prefix == [66, 67] and target == [1, 68, 69]  # " cd": the space belongs to the target


# --- LAMBADA: accuracy and per-word perplexity ----------------------------------------------------------------

V, MASK, BOS, EOS = 6, 5, 0, 0  # real tokens 0..4, [MASK] = 5, BOS = EOS = 0 as in GPT-2
EXAMPLES = [([1, 2, 3], [4]), ([2, 2], [3, 1]), ([4], [1, 2, 3])]  # (prefix ids, target ids)


class ReplayDenoiser:
    """Knows the clean sequence of each call in turn; puts `shift`-rotated one-hots on it, and the
    highest score of all on [MASK] (which accuracy must ignore)."""

    def __init__(self, shift: int = 0, wrong_last_only: bool = False):
        self.shift, self.wrong_last_only, self.calls = shift, wrong_last_only, 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        prefix, target = EXAMPLES[self.calls]
        self.calls += 1
        clean = torch.tensor([BOS, *prefix, *target, EOS])
        guess = (clean + self.shift) % MASK
        if self.wrong_last_only:
            guess[-2] = (clean[-2] + 1) % MASK  # the last target token wrong, the others right
        log_probs = torch.full((z.shape[1], V), -5.0)
        log_probs[torch.arange(z.shape[1]), guess] = -0.5
        log_probs[:, MASK] = -0.1
        assert (z[0, 1 + len(prefix) : -1] == MASK).all() and z[0, -1] == EOS  # targets masked, EOS clean
        return log_probs.unsqueeze(0)  # (1, L, V)


def test_lambada_accuracy_of_perfect_and_wrong_denoisers():
    assert lambada_accuracy(ReplayDenoiser(), EXAMPLES, MASK, BOS, EOS) == 1.0
    assert lambada_accuracy(ReplayDenoiser(shift=1), EXAMPLES, MASK, BOS, EOS) == 0.0
    # One wrong token fails the whole word: each word has its last token wrong and the others right.
    assert lambada_accuracy(ReplayDenoiser(wrong_last_only=True), EXAMPLES, MASK, BOS, EOS) == 0.0


class UniformDenoiser:
    """Uniform over the real tokens at masked positions (SUBS copy elsewhere); records its inputs."""

    def __init__(self):
        self.inputs: list[torch.Tensor] = []

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.inputs.append(z.clone())
        log_probs = torch.full((*z.shape, V), -math.log(V - 1))
        log_probs[..., MASK] = NEG_INF
        copy = torch.full_like(log_probs, NEG_INF).scatter_(-1, z.unsqueeze(-1), 0.0)
        return torch.where((z != MASK).unsqueeze(-1), copy, log_probs)  # (T, L, V)


def test_lambada_ppl_of_a_uniform_denoiser_with_fixed_times():
    times = torch.tensor([0.25, 0.5, 0.75, 1.0])
    denoiser = UniformDenoiser()
    ppl = lambada_ppl(denoiser, EXAMPLES, MASK, BOS, EOS, torch.Generator().manual_seed(0), times=times)
    # Per word: mean over t of (number of masked target tokens at t) * ln(V - 1) / t; then exp of the mean.
    per_word = []
    for (prefix, target), z in zip(EXAMPLES, denoiser.inputs):
        assert z.shape == (4, len(prefix) + len(target) + 2)
        assert (z[:, : 1 + len(prefix)] != MASK).all() and (z[:, -1] == EOS).all()  # context and EOS clean
        counts = (z[:, 1 + len(prefix) : -1] == MASK).sum(-1).double()
        per_word.append(float((counts * math.log(V - 1) / times.double()).mean()))
    assert ppl == pytest.approx(math.exp(sum(per_word) / len(per_word)), rel=1e-5)
    # At t = 1 nearly every target token is masked: the word costs about (V - 1)^n_target.
    counts_at_1 = torch.stack([(z[-1, 1 + len(p) : -1] == MASK).sum() for (p, _), z in zip(EXAMPLES, denoiser.inputs)])
    assert counts_at_1.tolist() == [len(t) for _, t in EXAMPLES]


def test_lambada_ppl_draws_one_antithetic_batch_per_word_and_is_seeded():
    first, second = UniformDenoiser(), UniformDenoiser()
    a = lambada_ppl(first, EXAMPLES, MASK, BOS, EOS, torch.Generator().manual_seed(3), num_t=32)
    b = lambada_ppl(second, EXAMPLES, MASK, BOS, EOS, torch.Generator().manual_seed(3), num_t=32)
    assert a == b and math.isfinite(a) and a > 1.0
    assert [z.shape[0] for z in first.inputs] == [32, 32, 32]
