"""Byte-level BPE tokenizers: train on any corpus, save with `save_pretrained`, load any HF path.

Every tokenizer trained here carries the same four special tokens (bos, eos, pad, mask), so the
causal LMs, the drafters and the masked-diffusion models of later stages can share one vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from distilray.errors import DistilrayError
from distilray.io_utils import atomic_dir

SPECIAL_TOKENS = {
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "pad_token": "<|pad|>",
    "mask_token": "<|mask|>",
}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE (GPT-2 style pre-tokenization) and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise DistilrayError(f"vocab_size must be at least 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1_000_000, **SPECIAL_TOKENS)


def save_tokenizer(tokenizer, path: str | Path) -> Path:
    with atomic_dir(path) as tmp:
        tokenizer.save_pretrained(tmp)
    return Path(path)


def load_tokenizer(path: str | Path):
    """Load any HF tokenizer (hub name or local folder); make sure it can pad."""
    from transformers import AutoTokenizer

    p = Path(path)
    if (p.exists() and p.is_dir() and not any(p.glob("tokenizer*"))) or (p.exists() and p.is_file()):
        raise DistilrayError(f"{path} is not a tokenizer folder (no tokenizer.json / tokenizer_config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError/ValueError/HF hub errors
        raise DistilrayError(f"cannot load tokenizer {path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def vocab_fingerprint(tokenizer) -> str:
    """Hash of the token -> id map: two models can share datastores or drafters only if these match."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same_tokenizer(a, b, what: str) -> None:
    if vocab_fingerprint(a) != vocab_fingerprint(b):
        raise DistilrayError(f"{what}: the two models use different tokenizers (vocabularies differ)")


def encode_documents(tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids per document, without special tokens (packing adds eos between documents)."""
    return tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
