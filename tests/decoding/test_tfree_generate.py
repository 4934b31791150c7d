"""KV-cached T-Free generation (reference/tfree.md 5.1, 5.6): the same words as re-running the whole sequence,
the dictionary's extension, every stop reason, and the model folder a generation loads."""

from __future__ import annotations

import collections

import pytest
import torch

from distilray.config import config_from
from distilray.decoding.tfree import word_scores
from distilray.decoding.tfree_generate import DICTIONARY_DIR, generate_words, load_tfree_bundle, text_after
from distilray.errors import DistilrayError
from distilray.models.tfree_lm import TFreeLM, build_tfree_lm, save_tfree_lm
from distilray.tfree.dictionary import Dictionary, build_dictionary
from distilray.tfree.hashing import TrigramVocab, hasher_for
from distilray.tfree.wordsplit import EOT, split_words, words_to_text

VOCAB = TrigramVocab(v=64, m=4, k=0)
TEXT = (
    "The cat sat on the mat. A dog ran to the park, and the cat ran after it.\n"
    "Then the dog sat down; the cat sat on the dog. The end."
)
PROMPT = "The cat"

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, max_seq_len: int = 64) -> TFreeLM:
    """tfree-micro with its weights scaled up: peaky scores, so cached and uncached float rounding cannot tie."""
    torch.manual_seed(seed)
    model = build_tfree_lm("tfree-micro", v=VOCAB.v, m=VOCAB.m, k=VOCAB.k, max_seq_len=max_seq_len)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def tiny_dictionary(extra: dict[str, int] | None = None) -> Dictionary:
    return build_dictionary({**collections.Counter(split_words(TEXT)), **(extra or {})}, VOCAB)


class ConstantHead(torch.nn.Module):
    """A head that predicts one word's pattern at every position (+10 on its rows, -10 elsewhere)."""

    def __init__(self, word: str) -> None:
        super().__init__()
        logits = torch.full((VOCAB.v,), -10.0)
        logits[torch.from_numpy(hasher_for(VOCAB).word_pattern(word))] = 10.0
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*x.shape[:-1], VOCAB.v)


def predicting(word: str) -> TFreeLM:
    model = tiny_model()
    model.head = ConstantHead(word)
    return model


def uncached_greedy(model: TFreeLM, dictionary: Dictionary, prompt: str, max_words: int, method: str) -> list[str]:
    """The reference: re-run the whole sequence at every step, argmax of the last position's word scores."""
    hasher = hasher_for(VOCAB)
    sequence = split_words(prompt)
    dictionary = dictionary.with_more_words(sequence)
    out: list[str] = []
    with torch.no_grad():
        while len(out) < max_words and len(sequence) <= model.config.max_seq_len:
            flat, offsets = hasher.encode(sequence)
            logits = model(
                indices=torch.from_numpy(flat), offsets=torch.from_numpy(offsets[:-1]), shape=(1, len(sequence))
            )
            word = dictionary.words[int(word_scores(logits[0, -1], dictionary, method).argmax())]
            if word == EOT:
                break
            out.append(word)
            sequence.append(word)
    return out


@pytest.mark.parametrize("method", ["head", "union", "calibrated"])
def test_cached_generation_gives_the_uncached_words(method: str) -> None:
    model, dictionary = tiny_model(), tiny_dictionary()
    out = generate_words(model, dictionary, PROMPT, max_words=40, method=method)
    assert out.words == uncached_greedy(model, dictionary, PROMPT, 40, method)
    assert len(set(out.words)) > 2  # the check means something: the words vary
    assert out.stop_reason == "max_words" and len(out.words) == 40 and out.prompt_words == 2
    assert out.seconds > 0 and out.words_per_s == pytest.approx(40 / out.seconds)


def test_leading_whitespace_is_stripped_and_trailing_kept() -> None:
    model, dictionary = tiny_model(), tiny_dictionary()
    plain = generate_words(model, dictionary, PROMPT, max_words=8)
    padded = generate_words(model, dictionary, "  \n " + PROMPT, max_words=8)
    assert padded.words == plain.words and padded.prompt_words == plain.prompt_words == 2
    assert generate_words(model, dictionary, PROMPT + " ", max_words=8).prompt_words == 3  # ends on <|ws|>


def test_more_words_extend_the_dictionary() -> None:
    dictionary = tiny_dictionary()
    model = tiny_model()
    # by default the prompt's words not yet in D join it; the prompt's known words do not count twice
    out = generate_words(model, dictionary, "The wombat and the quokka", max_words=1)
    assert out.dictionary_size == len(dictionary) + 2
    # more_words replaces the prompt as the source of new words
    out = generate_words(model, dictionary, "The wombat", max_words=1, more_words="quokka numbat quokka")
    assert out.dictionary_size == len(dictionary) + 2
    assert "quokka" not in dictionary and len(dictionary) == len(tiny_dictionary())  # D itself is unchanged
    # a word only more_words knows can be generated
    model = predicting("quokka")
    assert generate_words(model, dictionary, PROMPT, max_words=2, method="calibrated").words[0] != "quokka"
    out = generate_words(model, dictionary, PROMPT, max_words=2, method="calibrated", more_words="quokka")
    assert out.words == ["quokka", "quokka"]
    assert PROMPT.lstrip() + out.text == words_to_text(split_words(PROMPT.lstrip()) + ["quokka", "quokka"])
    assert out.text == " quokka quokka"  # what the words add to "The cat": a space before the first


def test_stop_reasons() -> None:
    model, dictionary = tiny_model(max_seq_len=16), tiny_dictionary()
    # the context: 2 prompt words + 14 fed words fill 16 positions, the last one still predicts a 15th word
    full = generate_words(model, dictionary, PROMPT, max_words=100)
    assert full.stop_reason == "context" and len(full.words) == 16 - 2 + 1
    # a stop word ends the text before its first occurrence
    stop = full.words[3]
    out = generate_words(model, dictionary, PROMPT, max_words=100, stop_words=(stop, "nowhere"))
    assert out.stop_reason == "stop_word" and out.words == full.words[: full.words.index(stop)]
    # max_words, and max_words 0 generates nothing
    assert generate_words(model, dictionary, PROMPT, max_words=5).words == full.words[:5]
    nothing = generate_words(model, dictionary, PROMPT, max_words=0)
    assert nothing.words == [] and nothing.text == "" and nothing.stop_reason == "max_words"
    # EOT ends the text (not part of it), unless abort_eot is off: then it is a word like any other
    eot_model = predicting(EOT)
    out = generate_words(eot_model, dictionary, PROMPT, max_words=5, method="calibrated")
    assert out.stop_reason == "eot" and out.words == [] and out.text == ""
    out = generate_words(eot_model, dictionary, PROMPT, max_words=3, method="calibrated", abort_eot=False)
    assert out.stop_reason == "max_words" and out.words == [EOT] * 3


def test_on_word_streams_each_word_with_the_text_so_far() -> None:
    model, dictionary = tiny_model(), tiny_dictionary()
    seen: list[tuple[str, str]] = []
    out = generate_words(model, dictionary, PROMPT, max_words=12, on_word=lambda w, text: seen.append((w, text)))
    assert [w for w, _ in seen] == out.words and seen[-1][1] == out.text
    texts = [text for _, text in seen]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))  # deltas can be streamed


def test_text_grows_by_appending_each_words_text() -> None:
    words = split_words("  Hi!  The cat's 2024 mat_x  (a+b)\n\n\n  end.   ") + [EOT, "x", "<|no_ws|>", "y"]
    text = ""
    for i, word in enumerate(words):
        text += text_after(words[i - 1] if i else None, word)
        assert text == words_to_text(words[: i + 1])


def test_sampling_is_seeded() -> None:
    model, dictionary = tiny_model(), tiny_dictionary()

    def sample(seed: int) -> list[str]:
        generator = torch.Generator().manual_seed(seed)
        return generate_words(model, dictionary, PROMPT, 20, temperature=5.0, top_k=8, generator=generator).words

    assert sample(1) == sample(1)
    assert len({tuple(sample(s)) for s in range(4)}) > 1


def test_bad_inputs_are_refused() -> None:
    model, dictionary = tiny_model(max_seq_len=16), tiny_dictionary()
    other = build_dictionary(collections.Counter(split_words(TEXT)), TrigramVocab(v=64, m=4, k=1))
    with pytest.raises(DistilrayError, match="dictionary was built for"):
        generate_words(model, other, PROMPT)
    token_model = build_tfree_lm("tfree-micro", v=64, m=4, input="token")
    with pytest.raises(DistilrayError, match="trigram-mode"):
        generate_words(token_model, dictionary, PROMPT)
    with pytest.raises(DistilrayError, match="no words"):
        generate_words(model, dictionary, " \n ")
    with pytest.raises(DistilrayError, match="context of 16"):
        generate_words(model, dictionary, "word " * 17)
    with pytest.raises(DistilrayError, match="unknown T-Free score method"):
        generate_words(model, dictionary, PROMPT, method="best")
    with pytest.raises(DistilrayError, match="max_words"):
        generate_words(model, dictionary, PROMPT, max_words=-1)


# --- the model folder and the generate-tfree job ---------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "tfree"
    save_tfree_lm(tiny_model(), path)  # first: it writes the folder as a whole
    tiny_dictionary().save(path / DICTIONARY_DIR)
    return path


def test_bundle_loads_and_generates_as_in_memory(folder) -> None:
    model, dictionary = load_tfree_bundle(folder)
    assert dictionary.words == tiny_dictionary().words and not model.training
    expected = generate_words(tiny_model(), tiny_dictionary(), PROMPT, max_words=10)
    assert generate_words(model, dictionary, PROMPT, max_words=10).words == expected.words


def test_run_returns_the_generation(folder) -> None:
    from distilray.config import GenerateTFreeConfig
    from distilray.pipelines.generate_tfree import run

    cfg = config_from(GenerateTFreeConfig, model=str(folder), prompt=PROMPT, max_words=6, decode_score="union")
    out = run(cfg)
    expected = generate_words(tiny_model(), tiny_dictionary(), PROMPT, max_words=6, method="union")
    assert out["words"] == expected.words and out["text"] == expected.text
    assert out["stop_reason"] == "max_words" and out["decode_score"] == "union"
    assert out["dictionary_size"] == expected.dictionary_size and out["seconds"] > 0 and out["words_per_s"] > 0
    with pytest.raises(DistilrayError, match="model=PATH"):
        run(config_from(GenerateTFreeConfig))


def test_folders_that_are_not_tfree_models_are_refused(folder, tmp_path) -> None:
    with pytest.raises(DistilrayError, match="not found"):
        load_tfree_bundle(tmp_path / "missing")
    with pytest.raises(DistilrayError, match="no config.json"):
        load_tfree_bundle(tmp_path)
    bare = tmp_path / "bare"
    save_tfree_lm(tiny_model(), bare)
    with pytest.raises(DistilrayError, match="no dictionary/"):
        load_tfree_bundle(bare)
    token = tmp_path / "token"
    save_tfree_lm(build_tfree_lm("tfree-micro", v=64, m=4, input="token"), token)
    with pytest.raises(DistilrayError, match="token-mode"):
        load_tfree_bundle(token)
    (tmp_path / "other" / "config.json").parent.mkdir()
    (tmp_path / "other" / "config.json").write_text('{"architecture": "mdlm_dit"}')
    with pytest.raises(DistilrayError, match="mdlm_dit"):
        load_tfree_bundle(tmp_path / "other")
