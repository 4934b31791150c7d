"""The `distilray` command as a user runs it: a real subprocess, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest

from distilray.cli import flags_to_overrides
from distilray.config import PreprocessConfig, TrainLMConfig
from distilray.errors import DistilrayError


def distilray(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "distilray.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_flags_map_to_config_keys():
    assert flags_to_overrides(PreprocessConfig, ["--dataset", "wikitext2", "--output-dir=out"]) == [
        "corpus.dataset=wikitext2",
        "output_dir=out",
    ]
    assert flags_to_overrides(TrainLMConfig, ["steps=3", "text_field=body"]) == ["steps=3", "corpus.text_field=body"]
    with pytest.raises(DistilrayError, match="needs a value"):
        flags_to_overrides(TrainLMConfig, ["--steps"])


def test_preprocess_writes_the_seed_format(tmp_path):
    out = tmp_path / "pre"
    r = distilray("preprocess", "--dataset", "tinyshakespeare", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["documents"]["train"] > 0
    for split in ("train", "validation", "test"):
        rows = json.loads((out / f"{split}.json").read_text())
        assert rows and set(rows[0]) == {"text"}


@pytest.mark.parametrize(
    "args, words",
    [
        (["preprocess", "--dataset", "no-such-corpus"], "no-such-corpus"),
        (["train-lm", "stesp=3"], "unknown config key 'stesp'"),
        (["train-lm", "--config", "/nonexistent/c.yaml"], "config file not found"),
        (["eval-ppl", "model=/nonexistent/model"], "/nonexistent/model"),
        (["eval-ppl"], "eval-ppl needs model=PATH"),
        (["train-lm", "steps=abc"], "expects an integer"),
    ],
)
def test_expected_errors_are_one_clear_line(args, words, tmp_path):
    r = distilray(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert words in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("distilray: error:")


def test_eval_ppl_on_a_saved_model(small_tokenizer, tmp_path):
    import torch

    from distilray.models.causal_lm import build_causal_lm

    tok, _ = small_tokenizer
    torch.manual_seed(0)
    build_causal_lm("tiny", tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    r = distilray(
        "eval-ppl",
        f"model={tmp_path / 'm'}",
        "--dataset",
        "tinyshakespeare",
        "context_len=64",
        "max_tokens=2000",
        f"output={tmp_path / 'ppl.json'}",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "ppl.json").read_text())
    # an untrained model is close to uniform over its vocabulary
    assert result["tokens"] > 1000 and 100 < result["ppl"] < 5 * len(tok)
