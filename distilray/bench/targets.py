"""The models a benchmark measures: a folder a user brings, or presets trained the quickstart's way.

- `user_model`: any Hugging Face causal LM folder saved with save_pretrained, with its tokenizer
  (clear errors otherwise), and `vocab_limit_of`: the tokenizer's length when the model's logits are
  padded past it (Pythia, some Llama exports), else None; decoding then masks the padded columns.
- `train_preset`: a GPT-2 preset (models/causal_lm.py PRESETS) trained on the quickstart's corpus and
  tokenizer through the same `train_lm.run(lm_config(...))` call the benchmarks use for the quickstart
  target, so a preset and step count already trained there is reused from the cache.
"""

from __future__ import annotations

from pathlib import Path

from distilray.errors import DistilrayError


def user_model(path: str):
    """(folder, tokenizer) of a user's causal LM folder; a DistilrayError naming what is missing."""
    from distilray.tokenizer import load_tokenizer

    p = Path(path)
    if not p.is_dir():
        raise DistilrayError(f"{path} is not a folder: pass a causal LM saved with save_pretrained")
    if not (p / "config.json").is_file():
        raise DistilrayError(f"{path} has no config.json: pass a causal LM saved with save_pretrained")
    if not any(p.glob("tokenizer*")):
        raise DistilrayError(
            f"{path} has no tokenizer files: save the model's tokenizer beside it (tokenizer.save_pretrained)"
        )
    return str(p), load_tokenizer(p)


def vocab_limit_of(model, tokenizer) -> int | None:
    """len(tokenizer) when the model has more logit columns than tokens (padded), else None."""
    from distilray.decoding.drafter_api import model_vocab_size

    return len(tokenizer) if len(tokenizer) < model_vocab_size(model) else None


def quickstart_tokenizer(artifacts_dir: str, seed: int = 0):
    """(QuickstartConfig, tokenizer folder): the BPE every quickstart model shares (trained or cached)."""
    from distilray.config import QuickstartConfig
    from distilray.pipelines import train_tokenizer

    q = QuickstartConfig(artifacts_dir=artifacts_dir, seed=seed)
    return q, train_tokenizer.get_or_train(q.corpus, q.vocab_size, q.artifacts_dir)


def train_preset(artifacts_dir: str, preset: str, steps: int, seed: int = 0) -> dict:
    """train_lm's result (model_dir, parameters, steps, val_ppl, ...) for `preset` trained `steps` steps
    the quickstart's way (cached: the quickstart target is `mini` at its target_steps)."""
    from distilray.pipelines import train_lm
    from distilray.pipelines.quickstart import lm_config

    q, tok_dir = quickstart_tokenizer(artifacts_dir, seed)
    return train_lm.run(lm_config(q, preset, steps, tok_dir))
