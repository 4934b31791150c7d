"""`distilray eval-tfree`: the T-Free paper's tokenizer figures and next-word figures (reference/tfree.md 7).

- Fertility: items per reference word (`tfree.metrics.reference_words`, a regex stand-in for UDPipe) on the
  held-out text. T-Free counts every item its splitter emits, whitespace markers included; a BPE tokenizer
  counts its tokens.
- Duplicates: the share of vocabulary entries that are case, leading-space or digit variants of others
  (Table 1). T-Free's vocabulary is v hash rows, not strings: 0 by construction; the share of its
  dictionary words with identical patterns (hash collisions) is reported beside it.
- Sequence length: items relative to T-Free's on the same text.
- Models: next-word top-1 accuracy on letter words and word perplexity (eval/tfree.py), embedding + head
  parameters.
"""

from __future__ import annotations

from pathlib import Path

from distilray import corpus
from distilray.config import CorpusSpec, EvalTFreeConfig
from distilray.errors import DistilrayError
from distilray.eval import tfree as tfree_eval
from distilray.io_utils import atomic_write_json
from distilray.models.tfree_lm import embed_head_params, load_tfree_lm
from distilray.tfree.dictionary import load_dictionary
from distilray.tfree.metrics import duplicate_share, fertility, hf_vocabulary, pattern_duplicates, tfree_duplicates
from distilray.tfree.wordsplit import split_words
from distilray.tokenizer import load_tokenizer

DICTIONARY = "dictionary"


def held_out_texts(dataset: str, split: str, words: int) -> list[str]:
    """The first documents of a corpus split holding about `words` reference words."""
    docs = corpus.load_splits(CorpusSpec(dataset=dataset))[split]
    texts, total = [], 0
    for doc in docs:
        if total >= words and len(texts) >= 2:  # two at least: the perplexity's calibration takes one half
            break
        texts.append(doc)
        total += len(tfree_eval.reference_words(doc))
    if len(texts) < 2:
        raise DistilrayError(f"the {split} split of {dataset!r} holds fewer than two documents")
    return texts


def tfree_items(text: str) -> list[str]:
    return split_words(text, strip=True)


def tokenizer_figures(tokenize, vocabulary: list[str] | None, texts: list[str], reference_items: int) -> dict:
    items = sum(len(tokenize(t)) for t in texts)
    return {
        "fertility": fertility(tokenize, texts),
        "duplicates": duplicate_share(vocabulary) if vocabulary is not None else tfree_duplicates(),
        "items": items,
        "sequence_length_ratio": items / reference_items,
    }


def hf_tokenize(tokenizer):
    return lambda text: tokenizer(text.strip(), add_special_tokens=False)["input_ids"]


def model_figures(folder: str | Path, texts: list[str], decode_score: str) -> dict:
    """Next-word accuracy, word perplexity and parameter counts of one train-tfree model folder."""
    model = load_tfree_lm(folder)
    seq_len = model.config.max_seq_len
    if model.config.input == "trigram":
        dictionary = load_dictionary(Path(folder) / DICTIONARY)
        summary = tfree_eval.evaluate_texts(
            lambda t: tfree_eval.tfree_next_word(model, dictionary, t, seq_len, decode_score), texts
        )
        extra = {"dictionary_words": len(dictionary), "pattern_duplicates": pattern_duplicates(dictionary)}
    else:
        tokenizer = load_tokenizer(folder)
        summary = tfree_eval.evaluate_texts(lambda t: tfree_eval.bpe_next_word(model, tokenizer, t, seq_len), texts)
        extra = {}
    return {
        **summary,
        "input": model.config.input,
        "embed_head_params": embed_head_params(model),
        "d_model": model.config.d_model,
        "params": sum(p.numel() for p in model.parameters()),
        **extra,
    }


def evaluate(models: dict[str, str], tokenizers: dict[str, str], texts: list[str], decode_score: str = "head") -> dict:
    """Figures keyed by name: tokenizer figures for T-Free and each tokenizer, model figures for each model."""
    reference = sum(len(tfree_items(t)) for t in texts)
    out = {"tfree": {"tokenizer": tokenizer_figures(tfree_items, None, texts, reference)}}
    for name, folder in tokenizers.items():
        tok = load_tokenizer(folder)
        out.setdefault(name, {})["tokenizer"] = tokenizer_figures(
            hf_tokenize(tok), hf_vocabulary(tok), texts, reference
        )
    for name, folder in models.items():
        out.setdefault(name, {})["model"] = model_figures(folder, texts, decode_score)
    return out


def run(cfg: EvalTFreeConfig) -> dict:
    if not cfg.models and not cfg.tokenizers:
        raise DistilrayError("give models=[DIR,...] (train-tfree folders) and/or tokenizers=[DIR,...]")
    texts = held_out_texts(cfg.dataset, cfg.split, cfg.eval_words)
    models, tokenizers = {}, {}
    for folder in cfg.models:
        name = Path(folder).parent.name if Path(folder).name == "model" else Path(folder).name
        models[name] = folder
        if load_tfree_lm(folder).config.input == "token":
            tokenizers[name] = folder
    for folder in cfg.tokenizers:
        tokenizers[Path(folder).name] = folder
    result = {
        "figures": evaluate(models, tokenizers, texts, cfg.decode_score),
        "harness": {
            "text": f"{len(texts)} documents of the {cfg.split} split of {cfg.dataset}",
            "reference_words": sum(len(tfree_eval.reference_words(t)) for t in texts),
            "fertility": "items / reference words (regex words and punctuation; T-Free's whitespace markers count)",
            "next_word_acc": "top-1 on letter words; BPE: greedy reproduces every token of the word",
            "word_ppl": "exp(NLL / reference words) on the second half of the texts, after temperature scaling fitted "
            "on the first half (word_ppl_raw: temperature 1); T-Free: calibrated scores over its dictionary plus the "
            "held-out words (closed vocabulary)",
        },
    }
    if cfg.json_out:
        atomic_write_json(cfg.json_out, result)
    return result
