"""The measuring pieces of `bench speculative`, on tiny models (the full benchmark trains what it measures)."""

import pytest
import torch

from distilray.bench.speculative import held_out_prompts
from distilray.config import BenchSpeculativeConfig
from distilray.decoding.drafters import HFDrafter
from distilray.decoding.speculative import SpecRecord, plain_generate
from distilray.eval.plots import acceptance_vs_gamma
from distilray.eval.speculative_speed import priced_speedup, scan_drafter, step_times, verify_cost
from distilray.models.causal_lm import build_causal_lm
from distilray.models.ngram import NGramDrafter


@pytest.fixture(scope="module")
def target(small_tokenizer):
    tok, _ = small_tokenizer
    torch.manual_seed(0)
    return build_causal_lm("tiny", tok).eval()


def test_a_drafter_equal_to_the_target_is_always_accepted(target):
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    scan, identical = scan_drafter(target, HFDrafter(target), prompts, (1, 3), 12, c=1.0, verify={1: 1.0, 3: 1.0})
    assert identical
    for g, row in scan.items():
        assert row["alpha"] == 1.0
        # every step but the budget-capped last one emits gamma + 1 tokens
        assert row["mean_accepted_length"] > g
        assert row["speedup_theoretical"] == pytest.approx((g + 1) / (g + 1))  # c = 1: no gain in theory
        assert row["speedup_theoretical_verify_cost"] == pytest.approx(row["speedup_theoretical"])


def test_a_useless_drafter_still_decodes_losslessly(target, small_tokenizer):
    tok, _ = small_tokenizer
    unigram = NGramDrafter(1, len(tok)).fit([[4] * 50])  # always proposes token 4
    scan, identical = scan_drafter(target, unigram, [[5, 6, 7, 8]], (2,), 10, c=0.01)
    assert identical and scan[2]["alpha"] < 0.5


def test_theoretical_speedup_of_a_scan_follows_alpha_gamma_and_c(target, small_tokenizer):
    """0 < alpha < 1 and c != 1: the scan's theory is E[tau] / (gamma c + 1), with E[tau] = 1 + a + ... + a^g,
    and with the verification cost v priced in, E[tau] / (gamma c + v)."""
    tok, _ = small_tokenizer
    prompt = [5, 6, 7, 8]
    seq = prompt + plain_generate(target, prompt, 16).token_ids
    seq[len(prompt) + 2] = 3  # a 4-gram copy of the target's greedy output, wrong at its third token
    scan, identical = scan_drafter(target, NGramDrafter(4, len(tok)).fit([seq]), [prompt], (3,), 16, 0.25, {3: 2.0})
    row, a = scan[3], scan[3]["alpha"]
    assert identical and 0.0 < a < 1.0
    tau = 1 + a + a**2 + a**3
    assert row["speedup_theoretical"] == pytest.approx(tau / 1.75)  # 3 * 0.25 + 1
    assert row["speedup_theoretical_verify_cost"] == pytest.approx(tau / 2.75)  # 3 * 0.25 + 2.0


def test_priced_speedup_prices_each_pass_at_its_measured_cost():
    """Passes that verified 0, 2, 4 and 3 drafts: v(0) = 1, v(2) and v(4) as measured, v(3) halfway."""
    record = SpecRecord(token_ids=list(range(10)), gamma_history=[0, 2, 4, 3])
    price = 1.0 + (1.2 + 2 * 0.1) + (1.6 + 4 * 0.1) + (1.4 + 3 * 0.1)
    assert priced_speedup([record], {2: 1.2, 4: 1.6}, c=0.1) == pytest.approx(10 / price)
    assert priced_speedup([record, record], {2: 1.2, 4: 1.6}, c=0.1) == pytest.approx(10 / price)


def test_scan_reports_the_priced_speedup(target, small_tokenizer):
    tok, _ = small_tokenizer
    drafter = NGramDrafter(2, len(tok)).fit([[4, 5, 6] * 10])
    scan, _ = scan_drafter(target, drafter, [[5, 6, 7, 8]], (2,), 10, c=0.5, verify={2: 1.5})
    assert scan[2]["speedup_priced"] > 0
    assert "speedup_priced" not in scan_drafter(target, drafter, [[5, 6, 7, 8]], (2,), 10, c=0.5)[0][2]


def test_step_times_and_verify_cost_are_positive(target, small_tokenizer):
    tok, _ = small_tokenizer
    target_s, drafter_s = step_times(target, NGramDrafter(2, len(tok)).fit([[4, 5, 6] * 10]), [5, 6, 7, 8], steps=4)
    assert target_s > 0 and drafter_s > 0
    v = verify_cost(target, [5, 6, 7, 8, 9, 10, 11, 12], (1, 4), repeats=3)
    assert set(v) == {1, 4} and all(x > 0 for x in v.values())


def test_held_out_prompts_do_not_overlap(small_tokenizer):
    tok, _ = small_tokenizer
    cfg = BenchSpeculativeConfig(prompts=6, prompt_tokens=8, new_tokens=8)
    prompts = held_out_prompts(cfg, tok)
    assert len(prompts) == 6 and all(len(p) == 8 for p in prompts)


def test_plot_is_written(tmp_path):
    scan = {
        "ngram3 (distilled)": {
            1: {"alpha": 0.5, "speedup_measured": 1.1, "speedup_theoretical": 1.4},
            2: {"alpha": 0.55, "speedup_measured": 1.2, "speedup_theoretical": 1.6},
        }
    }
    path = acceptance_vs_gamma(scan, tmp_path / "plot.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
