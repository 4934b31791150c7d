"""`bench speculative target=PATH drafters=[...]` and the target-size sweep: drafter specs, config checks,
the user-target path on a tiny GPT-2 saved with save_pretrained (plain and padded logits), and the
sweep's table from fake results."""

import pytest
import torch

from distilray import corpus
from distilray.bench import speculative_int8, speculative_run
from distilray.bench.speculative_sweep import format_sweep
from distilray.bench.speculative_user import parse_drafters, run_user_target, with_prompt_lookup
from distilray.config import BenchSpeculativeConfig, CorpusSpec, load_config
from distilray.errors import DistilrayError
from distilray.models.causal_lm import build_causal_lm
from distilray.models.drafters import save_drafter
from distilray.models.ngram import NGramDrafter
from distilray.tokenizer import encode_documents


def test_drafter_specs_name_folders_and_prompt_lookup():
    assert parse_drafters(("ng=/runs/ngram3", "pl=prompt-lookup:n=3,k=8")) == {
        "ng": "/runs/ngram3",
        "pl": "prompt-lookup:n=3,k=8",
    }
    # one comma-separated string: the options after a prompt-lookup spec stay with it
    assert parse_drafters(("ng=/runs/ngram3,pl=prompt-lookup:n=3,k=8,lstm=runs/a=b/drafter",)) == {
        "ng": "/runs/ngram3",
        "pl": "prompt-lookup:n=3,k=8",
        "lstm": "runs/a=b/drafter",
    }
    # bare specs are named after their folder, prompt lookup after itself; a path with "=" stays a path
    assert parse_drafters(("runs/ngram3/", "prompt-lookup:k=4", "runs/a=b/lstm")) == {
        "ngram3": "runs/ngram3/",
        "prompt-lookup:k=4": "prompt-lookup:k=4",
        "lstm": "runs/a=b/lstm",
    }
    with pytest.raises(DistilrayError, match="two drafters are named 'ngram3'"):
        parse_drafters(("a/ngram3", "b/ngram3"))
    with pytest.raises(DistilrayError, match="has no spec"):
        parse_drafters(("ng=",))
    assert with_prompt_lookup({"ng": "d"}) == {"ng": "d", "prompt-lookup": "prompt-lookup"}
    assert with_prompt_lookup({"pl": "prompt-lookup:n=2"}) == {"pl": "prompt-lookup:n=2"}


def test_command_line_options_of_the_user_target_and_the_sweep():
    cfg = load_config(
        BenchSpeculativeConfig, None, ["target=T", "drafters=[ng=runs/ng3,pl=prompt-lookup:n=3]", "sweep=true"]
    )
    assert cfg.drafters == ("ng=runs/ng3", "pl=prompt-lookup:n=3")
    assert parse_drafters(cfg.drafters) == {"ng": "runs/ng3", "pl": "prompt-lookup:n=3"}
    one = load_config(BenchSpeculativeConfig, None, ["target=T", "drafters=ng=runs/ng3"])
    assert parse_drafters(one.drafters) == {"ng": "runs/ng3"}
    with pytest.raises(DistilrayError, match="set target=PATH"):
        load_config(BenchSpeculativeConfig, None, ["drafters=[ng=runs/ng3]"])
    with pytest.raises(DistilrayError, match="not a preset a CPU sweep trains"):
        load_config(BenchSpeculativeConfig, None, ["sweep_only=true", "sweep_sizes=[tiny,gpt2-xl]"])
    with pytest.raises(DistilrayError, match="not a sweep drafter"):
        load_config(BenchSpeculativeConfig, None, ["sweep=true", "sweep_drafters=[ngram7]"])
    assert load_config(BenchSpeculativeConfig, None, ["sweep_sizes=[gpt2-xl]"]).sweep is False  # unchecked when off


def _save_target(tok, folder, extra_columns: int = 0):
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok)
    if extra_columns:  # logits padded past the tokenizer, as Pythia's are
        model.resize_token_embeddings(len(tok) + extra_columns, mean_resizing=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("extra_columns", [0, 8])
def test_user_target_against_its_drafters(small_tokenizer, tmp_path, monkeypatch, extra_columns):
    tok, _ = small_tokenizer
    target = _save_target(tok, tmp_path / "target", extra_columns)
    docs = corpus.load_splits(CorpusSpec())["train"][:40]
    save_drafter(NGramDrafter(3, len(tok)).fit(encode_documents(tok, docs)), tmp_path / "ngram3")
    monkeypatch.setattr(speculative_int8, "LARGE_PRESET", "tiny")  # the ~21M preset costs seconds
    cfg = BenchSpeculativeConfig(
        artifacts_dir=str(tmp_path / "artifacts"),
        target=target,
        drafters=(f"ng={tmp_path / 'ngram3'}",),
        prompts=4,
        new_tokens=8,
        gammas=(1, 2),
        include_t5=False,
    )
    before = torch.get_num_threads()
    try:
        r = run_user_target(cfg)
    finally:
        torch.set_num_threads(before)
    assert r["target"]["user"] and r["target"]["vocab_limit"] == (len(tok) if extra_columns else None)
    assert set(r["drafters"]) == {"ng", "prompt-lookup"}
    assert r["drafters"]["ng"]["given"]["kind"] == "ngram"
    for name, variant in (("ng", "given"), ("prompt-lookup", "untrained")):
        d = r["drafters"][name][variant]
        assert d["identical_to_plain"] and d["gamma"] in (1, 2) and d["speedup_measured"] > 0
    assert r["cnndm_prompt_lookup"]["identical_to_plain"]
    assert {"best_speedup", "prompt_lookup.cnndm_speedup", "int8.verify_over_step"} <= set(r["goals"])
    assert not {"distilled_alpha_gain", "hf_assisted.speedup_ours_over_hf", "serve.ratio_vs_in_process"} & set(
        r["goals"]
    )
    table = speculative_run.format_table(r)
    assert "skipped with a user target: hf_assisted" in table and target in table


def test_user_target_refuses_a_drafter_of_another_vocabulary(small_tokenizer, tmp_path):
    tok, _ = small_tokenizer
    target = _save_target(tok, tmp_path / "target")
    save_drafter(NGramDrafter(2, len(tok) + 5), tmp_path / "other")
    cfg = BenchSpeculativeConfig(target=target, drafters=(f"other={tmp_path / 'other'}",), prompts=2, new_tokens=4)
    with pytest.raises(DistilrayError, match="drafter 'other'.*vocabularies differ"):
        run_user_target(cfg)
    with pytest.raises(DistilrayError, match="no tokenizer files"):
        run_user_target(BenchSpeculativeConfig(target=str(tmp_path / "other"), prompts=2))


def _figures(speedup: float, alpha: float = 0.5, gamma: int = 4) -> dict:
    return {"speedup_measured": speedup, "alpha": alpha, "gamma": gamma, "c": 0.1, "target_step_ms": 1.0}


def test_sweep_table_from_fake_results():
    sweep = {
        "steps": 400,
        "prompts": 8,
        "new_tokens": 64,
        "quantize": "none",
        "threads": 1,
        "sizes": [
            {
                "preset": preset,
                "parameters": params,
                "val_ppl": ppl,
                "target_step_ms": ms,
                "verify_over_step": v,
                "drafters": {"ngram3": _figures(s), "prompt-lookup": _figures(s + 0.2, 0.3, 2)},
                "cnndm_prompt_lookup": _figures(s + 0.5) if preset != "tiny" else {},
            }
            for preset, params, ppl, ms, v, s in (
                ("tiny", 524_480, 259.8, 0.6, 2.9, 0.7),
                ("mini", 4_339_200, 110.5, 1.9, 1.6, 1.1),
                ("small", 21_000_000, 80.2, 6.1, 1.2, 1.6),
            )
        ],
    }
    lines = format_sweep(sweep)
    assert lines[0].startswith("target-size sweep: 400 training steps each, 8 held-out prompts x 64 tokens")
    assert "ngram3" in lines[1] and "prompt-lookup" in lines[1] and "PL cnndm" in lines[1]
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert "21,000,000" in rows["small"] and "1.20x" in rows["small"] and "1.60x (0.50, 4)" in rows["small"]
    assert "1.80x (0.30, 2)" in rows["small"] and "2.10x (0.50, 4)" in rows["small"]
    assert rows["tiny"].rstrip().endswith("-")  # no cnndm figure for that target
    # a sweep-only result prints the sweep alone
    assert speculative_run.format_table({"sweep": sweep, "seconds": 1.0}).splitlines() == lines
