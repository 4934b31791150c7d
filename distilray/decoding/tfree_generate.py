"""Word-by-word generation from a T-Free LM, KV-cached (reference/tfree.md 5.1, 5.6).

    prompt -> split_words -> prefill once with a KVCache -> logits of the last position
    loop: word_scores over the dictionary D -> pick a word -> stop? -> feed ONLY that word's bag at the next
          position with the cache -> logits of that position

Rules, as the repository's `InferencePipe.generate`, with its gaps closed:

- D is closed (pitfall 6): for each call it gets the words of `more_words`, or by default the prompt's words
  (`more_words or prompt`), those not in it yet. `dictionary_size` reports the D that was used.
- The prompt is split after stripping its LEADING whitespace only. Training strips each document at its start
  (`encode_document`), so " Hello" would start on `<|ws|>`, a start no training document has (pitfall 12).
  Trailing whitespace is kept: training keeps it too (before `<|endoftext|>`), and a prompt that ends on a space
  asks for a continuation after that space.
- Stops: `<|endoftext|>` (abort_eot), a word of `stop_words`, an empty word (only a hand-made D can hold one, and
  it has no trigrams to feed: it ends the text as EOT does), `max_words` generated words, or the model's context
  (`max_seq_len` positions) full. The stopping EOT or stop word is not part of the result (the OpenAI `stop`
  convention); with abort_eot=False an EOT is an ordinary word, kept and fed back.
- Greedy at temperature 0 (the repository's decoding), else sampled (decoding/tfree.py `pick_word`).

`load_tfree_bundle` reads what train-tfree writes: <folder>/config.json + model.safetensors and <folder>/dictionary/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from distilray.decoding.tfree import METHODS, pick_word, word_scores
from distilray.errors import DistilrayError
from distilray.io_utils import read_json
from distilray.models.module_io import read_config
from distilray.models.tfree_lm import ARCH, KVCache, TFreeLM, TFreeLMConfig, load_tfree_lm
from distilray.tfree.dictionary import Dictionary, load_dictionary
from distilray.tfree.hashing import TrigramVocab, hasher_for
from distilray.tfree.wordsplit import EOT, split_words, words_to_text

DICTIONARY_DIR = "dictionary"  # a train-tfree model folder's dictionary, beside config.json
StopReason = Literal["eot", "stop_word", "max_words", "context"]
OnWord = Callable[[str, str], None]  # on_word(word, text of the words generated so far)


@dataclass(frozen=True)
class GenerationResult:
    words: list[str]  # the generated words, without the stopping EOT or stop word
    text: str  # words_to_text(words): the generated part only, not the prompt
    stop_reason: StopReason
    prompt_words: int
    dictionary_size: int  # |D| after adding more_words (or the prompt's words)
    seconds: float  # prefill and decoding

    @property
    def words_per_s(self) -> float | None:
        return len(self.words) / self.seconds if self.seconds > 0 else None


def model_vocab(model: TFreeLM) -> TrigramVocab:
    """The trigram hashing the model was trained with."""
    return TrigramVocab(model.config.v, model.config.m, model.config.k)


def _check_pair(model: TFreeLM, dictionary: Dictionary) -> None:
    if model.config.input != "trigram":
        raise DistilrayError(
            "dictionary decoding needs a trigram-mode T-Free LM; this one is the token-mode (BPE) baseline"
        )
    if dictionary.vocab != model_vocab(model):
        raise DistilrayError(
            f"the dictionary was built for {dictionary.vocab}, but the model uses {model_vocab(model)}: "
            "its word patterns would score the wrong rows"
        )


def prompt_words(model: TFreeLM, prompt: str) -> list[str]:
    """The words the prompt prefills (leading whitespace stripped, see the module docstring); a prompt with no
    word, or more words than the model's context, is a DistilrayError."""
    words = split_words(prompt.lstrip())
    if not words:
        raise DistilrayError("the prompt holds no words (empty or only whitespace): a T-Free LM continues words")
    if len(words) > model.config.max_seq_len:
        raise DistilrayError(
            f"the prompt has {len(words)} words, more than the model's context of {model.config.max_seq_len}"
        )
    return words


def _feed(model: TFreeLM, words: list[str], cache: KVCache) -> torch.Tensor:
    """Run `words` at the positions after the cached ones (the cache grows by len(words)); logits (v,) of the
    last of them."""
    flat, offsets = hasher_for(model_vocab(model)).encode(words)
    device = next(model.parameters()).device
    logits = model(
        indices=torch.from_numpy(flat).to(device),
        offsets=torch.from_numpy(offsets[:-1]).to(device),  # EmbeddingBag takes the starts only
        shape=(1, len(words)),
        cache=cache,
    )  # (1, S, v)
    return logits[0, -1]


def text_after(previous: str | None, word: str) -> str:
    """What `word` adds to the text of the words before it, the last of them `previous` (None: no word yet).
    words_to_text spaces each item by its predecessor alone, so texts grow by appending: streaming costs one
    word's work per word instead of re-joining every word so far."""
    if previous is None:
        return words_to_text([word])
    return words_to_text([previous, word])[len(words_to_text([previous])) :]


def generate_words(
    model: TFreeLM,
    dictionary: Dictionary,
    prompt: str,
    max_words: int = 32,
    method: str = "head",
    edge_weight: float = 1.0,
    temperature: float = 0.0,
    top_k: int = 0,
    more_words: str | None = None,
    stop_words: tuple[str, ...] = (),
    abort_eot: bool = True,
    generator: torch.Generator | None = None,
    on_word: OnWord | None = None,
) -> GenerationResult:
    """Continue `prompt` word by word (module docstring). `method` and `edge_weight` choose the word score
    (decoding/tfree.py); `generator` must live on the model's device; `on_word(word, text_so_far)` is called
    after each generated word, for streaming."""
    _check_pair(model, dictionary)
    if method not in METHODS:
        raise DistilrayError(f"unknown T-Free score method {method!r}; choose one of {', '.join(METHODS)}")
    if max_words < 0:
        raise DistilrayError(f"max_words must be >= 0, got {max_words}")
    start = time.perf_counter()
    context = prompt_words(model, prompt)
    dictionary = dictionary.with_more_words(split_words(more_words) if more_words else context)
    stops = set(stop_words)
    words: list[str] = []
    text = ""  # what the words add to the prompt's text (prompt + text reads right), kept up to date
    reason: StopReason = "max_words"
    if max_words > 0:
        with torch.no_grad():
            cache = model.new_cache()
            logits = _feed(model, context, cache)  # prefill once
            while True:
                scores = word_scores(logits, dictionary, method, edge_weight)  # (|D|,)
                word = dictionary.words[int(pick_word(scores, temperature, top_k, generator))]
                if not word or (abort_eot and word == EOT):
                    reason = "eot"
                    break
                if word in stops:
                    reason = "stop_word"
                    break
                text += text_after(words[-1] if words else context[-1], word)
                if on_word is not None:
                    on_word(word, text)
                words.append(word)
                if len(words) >= max_words:
                    reason = "max_words"
                    break
                if cache.length >= model.config.max_seq_len:  # no position left to feed this word at
                    reason = "context"
                    break
                logits = _feed(model, [word], cache)  # only the new word, at the next position
    return GenerationResult(
        words=words,
        text=text,
        stop_reason=reason,
        prompt_words=len(context),
        dictionary_size=len(dictionary),
        seconds=time.perf_counter() - start,
    )


def check_tfree_folder(folder: str | Path) -> TFreeLMConfig:
    """The model config of a train-tfree model folder, read without its weights, after checking that the folder
    holds a trigram-mode T-Free LM and a dictionary/; anything else is a DistilrayError naming what is wrong."""
    if not str(folder):
        raise DistilrayError("no T-Free model folder given (model=PATH: a train-tfree model folder)")
    path = Path(folder)
    if not path.is_dir():
        raise DistilrayError(f"T-Free model folder not found: {folder}")
    if not (path / "config.json").is_file():
        raise DistilrayError(f"{folder} is not a T-Free model folder: it has no config.json")
    try:
        raw = read_json(path / "config.json")
    except (OSError, ValueError) as err:
        raise DistilrayError(f"{folder} is not a T-Free model folder: unreadable config.json ({err})") from None
    kind = raw.get("architecture") if isinstance(raw, dict) else None
    if kind != ARCH:
        what = f"a {kind!r} model" if kind else "an unknown model"
        raise DistilrayError(f"{folder} is not a T-Free model folder: its config.json describes {what}")
    config = TFreeLMConfig(**read_config(path, ARCH, TFreeLMConfig))
    if config.input != "trigram":
        raise DistilrayError(
            f"{folder} holds the token-mode (BPE) baseline of train-tfree, which has no dictionary decoding"
        )
    if not (path / DICTIONARY_DIR).is_dir():
        raise DistilrayError(f"{folder} has no {DICTIONARY_DIR}/ folder: not a complete train-tfree model folder")
    return config


def load_tfree_bundle(folder: str | Path, device: str | torch.device = "cpu") -> tuple[TFreeLM, Dictionary]:
    """The model (eval mode, on `device`) and dictionary of a train-tfree model folder (check_tfree_folder)."""
    check_tfree_folder(folder)  # before the weights
    model = load_tfree_lm(folder, device)
    return model, load_dictionary(Path(folder) / DICTIONARY_DIR, vocab=model_vocab(model))
