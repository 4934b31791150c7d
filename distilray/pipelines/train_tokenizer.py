"""`distilray train-tokenizer`: a byte-level BPE on a corpus's train split, cached by config."""

from __future__ import annotations

from pathlib import Path

from distilray import corpus
from distilray.config import CorpusSpec, TrainTokenizerConfig
from distilray.io_utils import atomic_write_json
from distilray.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer


def cached_tokenizer_dir(spec: CorpusSpec, vocab_size: int, artifacts_dir: str, min_frequency: int = 2) -> Path:
    key = corpus.corpus_fingerprint(spec)
    return Path(artifacts_dir) / "tokenizers" / f"bpe{vocab_size}-m{min_frequency}-{key}"


def get_or_train(
    spec: CorpusSpec, vocab_size: int, artifacts_dir: str, min_frequency: int = 2, output_dir: str = ""
) -> Path:
    """Folder of a BPE tokenizer for this corpus and vocabulary size, trained once and reused."""
    out = Path(output_dir) if output_dir else cached_tokenizer_dir(spec, vocab_size, artifacts_dir, min_frequency)
    if (out / "tokenizer.json").is_file():
        return out
    splits = corpus.load_splits(spec)
    tok = train_bpe_tokenizer(splits["train"], vocab_size=vocab_size, min_frequency=min_frequency)
    save_tokenizer(tok, out)
    atomic_write_json(out / "distilray_tokenizer.json", {"corpus": spec.__dict__, "vocab_size": len(tok)})
    return out


def run(cfg: TrainTokenizerConfig) -> dict:
    path = get_or_train(cfg.corpus, cfg.vocab_size, cfg.artifacts_dir, cfg.min_frequency, cfg.output_dir)
    tok = load_tokenizer(path)
    return {"tokenizer_dir": str(path), "vocab_size": len(tok)}
