"""`distilray train-tfree`: a T-Free LM (reference/tfree.md) on Ray Train, or its BPE baseline.

- Data: `prepare_tfree` stores the corpus's documents as raw text in Arrow with an aligned index (entries
  of at least `min_bytes`); a sample is one aligned entry's documents, each encoded on the fly as
  `text + <|endoftext|>` words, packed to `seq_len` positions with position resets and document-boundary
  attention, filled with random further documents when short (the seed's AlignedMemoryMap).
- T-Free (`input=trigram`): each word's input is the sum of its trigrams' m hashed rows; the head predicts
  the next word's pattern, trained with BCE (pos_weight, loss_scale) normalised over real positions.
  Targets travel as index lists and become dense (B, S, v) only on the device.
- The baseline (`input=token`): the same backbone with the project's BPE (embedding + softmax head),
  on the same documents packed the same way, for the same steps.
- Instruction tuning (`instruction=true`): JSONL conversations, one per sample, loss only on the answers'
  words (the seed's instruct conversion), from a trained T-Free model whose dictionary is kept.
- The decoding dictionary: the `dictionary_words` most frequent training words (counted with Ray Data),
  special words always kept, saved inside every model folder (model/dictionary/).

The per-word loss weight of the original's `word_edge_weight` is left out: every word has edge trigrams,
so the deterministic form of that rule (pitfall 4) weights every word alike, a plain loss scale.
"""

from __future__ import annotations

import dataclasses
import re
import resource
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distilray import corpus
from distilray.config import CorpusSpec, TrainTFreeConfig, config_hash
from distilray.errors import DistilrayError
from distilray.eval import tfree as tfree_eval
from distilray.losses.tfree import tfree_bce
from distilray.models.tfree_lm import PRESETS, build_tfree_lm, embed_head_params, load_tfree_lm, save_tfree_lm
from distilray.pipelines import train_tokenizer
from distilray.pipelines.prepare_tfree import count_words, load_word_counts, prepare_tfree, save_word_counts
from distilray.ray_train import TrainerHooks, TrainJob, cached_result, train
from distilray.tfree.dictionary import build_dictionary, load_dictionary
from distilray.tfree.hashing import TrigramVocab, hasher_for
from distilray.tfree.packing import pack_instruction, pretraining_sample
from distilray.tfree.textstore import AlignedIndex, InstructionStore, TextStore
from distilray.training import batch_rows

DICTIONARY = "dictionary"


def min_bytes(cfg: TrainTFreeConfig) -> int:
    return cfg.min_bytes or 5 * cfg.seq_len  # about 5 bytes per English word with its space


def trigram_vocab(cfg: TrainTFreeConfig) -> TrigramVocab:
    return TrigramVocab(v=cfg.trigram.v, m=cfg.trigram.m, k=cfg.trigram.k)


def data_dir(cfg: TrainTFreeConfig) -> Path:
    """The prepare-tfree folder: given, or prepared (and cached) from `dataset`."""
    if cfg.data:
        return Path(cfg.data)
    spec = CorpusSpec(dataset=cfg.dataset)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.dataset).name or cfg.dataset)
    kind = "instruction" if cfg.instruction else f"{min_bytes(cfg)}-{cfg.seed}"
    name = f"{slug}-{corpus.corpus_fingerprint(spec)[:10]}-{kind}"
    out = Path(cfg.artifacts_dir).resolve() / "tfree_data" / name
    prepare_tfree(cfg.dataset, out, min_bytes=min_bytes(cfg), seed=cfg.seed, instruction=cfg.instruction)
    return out


def dictionary_dir(cfg: TrainTFreeConfig, data: Path) -> Path:
    """The decoding dictionary of this data and trigram config (word counts with Ray Data, both cached)."""
    vocab = trigram_vocab(cfg)
    folder = data / f"dictionary-{vocab.v}-{vocab.m}-{vocab.k}-{cfg.dictionary_words}"
    if (folder / "dictionary.json").is_file():
        return folder
    counts_file = data / "word_counts.json"
    if not counts_file.is_file():
        save_word_counts(counts_file, count_words(data / "train"))
    build_dictionary(load_word_counts(counts_file), vocab, cfg.dictionary_words).save(folder)
    return folder


def bpe_dir(cfg: TrainTFreeConfig) -> Path:
    return train_tokenizer.get_or_train(CorpusSpec(dataset=cfg.dataset), cfg.bpe_vocab_size, cfg.artifacts_dir)


def run_dir_for(cfg: TrainTFreeConfig, data: Path) -> Path:
    if cfg.name:
        return Path(cfg.artifacts_dir).resolve() / "tfree" / cfg.name
    store = InstructionStore if cfg.instruction else TextStore
    keyed = dataclasses.replace(cfg, data=store(data / "train").fingerprint[:12], dataset="")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.input}-{Path(cfg.model).name}")
    return Path(cfg.artifacts_dir).resolve() / "tfree" / f"{slug}-{config_hash(keyed)}"


def check_config(cfg: TrainTFreeConfig) -> None:
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.seq_len < 2:
        raise DistilrayError("steps and batch_size must be positive and seq_len at least 2")
    if cfg.pos_weight <= 0 or cfg.loss_scale <= 0:
        raise DistilrayError("pos_weight and loss_scale must be positive")
    trigram_vocab(cfg)  # v, m, k in range, or a clear error
    if cfg.instruction and (cfg.model in PRESETS or cfg.input != "trigram"):
        raise DistilrayError("instruction=true fine-tunes a trained T-Free model: give model=DIR (input=trigram)")
    if cfg.model not in PRESETS:
        model = load_tfree_lm(cfg.model)  # a clear error for a folder that is not a T-Free model
        if model.config.input != cfg.input:
            raise DistilrayError(f"{cfg.model} is a {model.config.input}-input model; input={cfg.input} was asked")


def run(cfg: TrainTFreeConfig) -> dict:
    """Train (or resume, or reuse from the cache) and return where the model went, with figures."""
    check_config(cfg)
    data = data_dir(cfg)
    run_dir = run_dir_for(cfg, data)
    if cached := cached_result(run_dir):
        return cached
    folders = {"data": data}
    if cfg.instruction:
        folders["dictionary"] = Path(cfg.model) / DICTIONARY  # the model keeps the words it was trained with
    elif cfg.input == "trigram":
        folders["dictionary"] = dictionary_dir(cfg, data)
    else:
        folders["tokenizer"] = bpe_dir(cfg)
    if cfg.model not in PRESETS:
        folders["init"] = Path(cfg.model)
    job = TrainJob(TFreeHooks, cfg, run_dir, folders=folders)
    return train(
        job,
        lambda m: {
            "input": cfg.input,
            "data_dir": str(data),
            "next_word_acc": float(m["val_next_word_acc"]),
            "word_ppl": float(m["val_word_ppl"]),
            "word_ppl_temperature": float(m["val_word_ppl_temperature"]),
            "embed_head_params": int(m["val_embed_head_params"]),
            "params": int(m["val_params"]),
            "peak_rss_mb": float(m["val_peak_rss_mb"]),
            "tokens_per_s": float(m["mean_tokens_per_s"]),
        },
    )


def validation_texts(folder: Path, words: int, instruction: bool = False) -> list[str]:
    """The first validation documents (conversations: their segments joined) holding about `words` reference
    words."""
    store = InstructionStore(folder) if instruction else TextStore(folder)
    texts, total = [], 0
    for i in range(len(store)):
        if total >= words and len(texts) >= 2:  # two at least: the perplexity's calibration takes one half
            break
        text = "\n".join(t for t, _ in store[i]) if instruction else store[i]
        texts.append(text)
        total += len(tfree_eval.reference_words(text))
    return texts


class TFreeHooks(TrainerHooks):
    """Packed aligned entries as batches; BCE on patterns (trigram) or cross-entropy (token)."""

    label = "train-tfree"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        root = Path(self.folders["data"])
        if self.cfg.instruction:
            self.store = InstructionStore(root / "train")  # one conversation per sample
        else:
            self.store = TextStore(root / "train")
            self.aligned = AlignedIndex(root / "train", min_bytes(self.cfg), self.cfg.seed)
        self.vocab = trigram_vocab(self.cfg)
        self.trigram = self.cfg.input == "trigram"

    def build(self) -> torch.nn.Module:
        cfg = self.cfg
        if "init" in self.folders:
            model = load_tfree_lm(self.folders["init"])
        elif self.trigram:
            model = build_tfree_lm(cfg.model, v=self.vocab.v, m=self.vocab.m, k=self.vocab.k, max_seq_len=cfg.seq_len)
        else:
            model = build_tfree_lm(cfg.model, input="token", v=len(self.tokenizer), max_seq_len=cfg.seq_len)
        if self.trigram and (model.config.v, model.config.m, model.config.k) != (
            self.vocab.v,
            self.vocab.m,
            self.vocab.k,
        ):
            raise DistilrayError(f"the model's (v, m, k) differ from trigram={self.vocab}")
        return model.train()

    def encode_tokens(self, text: str) -> list[int]:
        ids = self.tokenizer(text.lstrip(), add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        n = len(self.store) if cfg.instruction else len(self.aligned)
        rows = batch_rows(n, cfg.batch_size, step, cfg.seed, self.worker.rank, self.worker.world)
        samples = []
        for entry in rows:
            if cfg.instruction:
                samples.append(pack_instruction(self.store[int(entry)], cfg.seq_len))
                continue
            rng = np.random.default_rng([cfg.seed, step, int(entry)])  # the fill draws: a pure function of the step
            if self.trigram:
                samples.append(pretraining_sample(self.store, self.aligned, int(entry), cfg.seq_len, rng))
            else:
                eos = self.tokenizer.eos_token_id
                samples.append(
                    pretraining_sample(self.store, self.aligned, int(entry), cfg.seq_len, rng, self.encode_tokens, eos)
                )
        out = {
            "weights": torch.from_numpy(np.stack([s.loss_weights for s in samples])),
            "positions": torch.from_numpy(np.stack([s.positions for s in samples])),
            "doc_ids": torch.from_numpy(np.stack([s.doc_ids for s in samples])),
        }
        if not self.trigram:
            out["tokens"] = torch.tensor([s.inputs for s in samples])
            out["targets"] = torch.tensor([s.targets for s in samples])
            return out
        hasher = hasher_for(self.vocab)
        flat, offsets = hasher.encode([w for s in samples for w in s.inputs])
        target_flat, target_offsets = hasher.targets([w for s in samples for w in s.targets])
        return out | {
            "indices": torch.from_numpy(flat),
            "offsets": torch.from_numpy(offsets[:-1]),  # EmbeddingBag's: one start per bag
            "target_flat": torch.from_numpy(target_flat),
            "target_offsets": torch.from_numpy(target_offsets),
        }

    def loss(self, model, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        b = {k: v.to(self.worker.device) for k, v in batch.items()}
        shape = tuple(b["weights"].shape)
        if not self.trigram:
            logits = model(tokens=b["tokens"], positions=b["positions"], doc_ids=b["doc_ids"])
            ce = F.cross_entropy(logits.flatten(0, 1).float(), b["targets"].flatten(), reduction="none")
            return (ce * b["weights"].flatten()).sum() / b["weights"].sum().clamp(min=1.0)
        logits = model(
            indices=b["indices"], offsets=b["offsets"], shape=shape, positions=b["positions"], doc_ids=b["doc_ids"]
        )
        cfg = self.cfg
        targets = (b["target_flat"], b["target_offsets"])
        return tfree_bce(logits, targets, b["weights"], cfg.pos_weight, cfg.loss_scale, cfg.loss_normalization)

    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len  # word positions for T-Free, tokens for BPE

    def validate(self, model) -> dict[str, float]:
        texts = validation_texts(Path(self.folders["data"]) / "validation", self.cfg.eval_words, self.cfg.instruction)
        model.eval()
        if self.trigram:
            dictionary = load_dictionary(self.folders["dictionary"], self.vocab)
            summary = tfree_eval.evaluate_texts(
                lambda t: tfree_eval.tfree_next_word(model, dictionary, t, self.cfg.seq_len), texts
            )
        else:
            summary = tfree_eval.evaluate_texts(
                lambda t: tfree_eval.bpe_next_word(model, self.tokenizer, t, self.cfg.seq_len), texts
            )
        return {
            "next_word_acc": summary["next_word_acc"],
            "word_ppl": summary["word_ppl"],
            "word_ppl_temperature": summary["temperature"],
            "embed_head_params": float(embed_head_params(model)),
            "params": float(sum(p.numel() for p in model.parameters())),
            # the worker's peak resident memory (Linux reports KiB): the training's, model and batches included
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    def save_model(self, model, folder: Path) -> None:
        save_tfree_lm(model, folder)
        if self.trigram:
            load_dictionary(self.folders["dictionary"], self.vocab).save(Path(folder) / DICTIONARY)
        else:
            self.tokenizer.save_pretrained(folder)
