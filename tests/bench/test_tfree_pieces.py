"""The T-Free benchmark's goals and table on fake figures (the runs themselves: tests/pipelines)."""

from distilray.bench import tfree as bench


def _result(tfree_acc: float, tfree_fertility: float = 1.15, tfree_rows: int = 4096) -> dict:
    names = ("tfree", "bpe8k", "bpe32k")
    d = 128
    vocab = {"tfree": tfree_rows, "bpe8k": 8192, "bpe32k": 32768}
    return {
        "fertility": {"tfree": tfree_fertility, "bpe8k": 1.3, "bpe32k": 1.2},
        "duplicates": {n: {"total": 0.0 if n == "tfree" else 40.0} for n in names},
        "sequence_length_ratio": {"tfree": 1.0, "bpe8k": 1.1, "bpe32k": 1.05},
        "embed_head_params": {n: 2 * vocab[n] * d for n in names},
        "vocab_size": vocab,
        "params": {n: 2 * vocab[n] * d + 800_000 for n in names},
        "peak_memory_mb": {"tfree": 700.0, "bpe8k": 750.0, "bpe32k": 900.0},
        "next_word_acc": {"tfree": tfree_acc, "bpe8k": 0.20, "bpe32k": 0.25},
        "word_ppl": {"tfree": 300.0, "bpe8k": 250.0, "bpe32k": 240.0},
        "train_seconds": {"tfree": 120.0, "bpe8k": 100.0, "bpe32k": 150.0},
        "harness": {"budget": "equal steps", "held_out": "1 document"},
    }


def test_goals_compare_against_the_largest_and_the_best_bpe():
    goals = bench.compute_goals(_result(tfree_acc=0.23))
    assert goals["tfree_fertility_and_duplicates"]["met"] is True
    assert goals["embed_head_saving"]["value"] == 1 - 4096 / 32768 and goals["embed_head_saving"]["met"] is True
    acc = goals["next_word_acc_vs_best_bpe"]
    assert acc["value"] == 0.23 / 0.25 and acc["met"] is True and "bpe32k" in acc["goal"]
    worse = bench.compute_goals(_result(tfree_acc=0.2, tfree_fertility=1.3, tfree_rows=8192))
    assert not any(g["met"] for g in worse.values())  # fertility, 75% saving and 0.8x accuracy all fall short


def test_table_lists_every_model_and_goal():
    r = _result(tfree_acc=0.23)
    r["goals"] = bench.compute_goals(r)
    table = bench.format_table(r)
    for needle in ("tfree", "bpe8k", "bpe32k", "embed_head_saving", ": met", "32768"):
        assert needle in table
