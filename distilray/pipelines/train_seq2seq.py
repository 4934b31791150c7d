"""`distilray train-seq2seq`: an encoder-decoder (T5) summarizer on article -> highlights pairs, with
Ray Train (DDP: gloo on CPU, NCCL on GPU), checkpoints, resume and a config-keyed artifact cache as in
train-lm.

With `teacher=PATH` the same loop distils a (smaller) T5 from a T5 target, FastLLM's drafter recipe:
a divergence between the teacher's and the student's next-token distributions on the gold
summaries, at a temperature, plus `ce_weight` times the cross-entropy on the gold tokens.

The pairs are split train/validation/test by a seeded shuffle (corpus.split_documents' logic), so
the test articles a benchmark decodes were never trained on.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import torch

from distilray import corpus
from distilray.config import CorpusSpec, TrainSeq2SeqConfig, config_hash
from distilray.errors import DistilrayError
from distilray.models.seq2seq_lm import (
    IGNORE,
    build_seq2seq_lm,
    decoder_start_id,
    encode_truncated,
    is_seq2seq_preset,
    load_seq2seq_lm,
    mean_token_loss,
    pad_rows,
    seq2seq_loss,
)
from distilray.pipelines import train_tokenizer
from distilray.ray_train import TrainerHooks, TrainJob, cached_result, train
from distilray.tokenizer import load_tokenizer, vocab_fingerprint
from distilray.training import batch_rows, load_checkpoint_into

Pair = tuple[str, str]


# ------------------------------------------------------------------------------------- data
def load_pairs(dataset: str) -> list[Pair]:
    """(article, highlights) pairs: `cnndm` from ../shared/data, or a local .jsonl/.json with those fields."""
    if dataset == "cnndm":
        return corpus.load_cnndm_pairs()
    path = Path(dataset).expanduser()
    if not (path.is_file() and path.suffix.lower() in (".jsonl", ".json")):
        raise DistilrayError(
            f"train-seq2seq reads article/highlights pairs: dataset=cnndm or a .jsonl/.json file, got {dataset!r}"
        )
    return corpus.load_cnndm_pairs(path)


def split_pairs(pairs: list[Pair], val_pairs: int, test_pairs: int, seed: int) -> dict[str, list[Pair]]:
    """{"train", "validation", "test"} -> pairs, by the corpus's seeded split applied to pair indices."""
    n = len(pairs)
    if val_pairs < 0 or test_pairs < 0 or val_pairs + test_pairs >= n:
        raise DistilrayError(f"val_pairs + test_pairs must leave training pairs: {val_pairs} + {test_pairs} of {n}")
    # indices as one-line "documents": never cut, and round(n * k / n) == k
    where = corpus.split_documents([str(i) for i in range(n)], val_pairs / n, test_pairs / n, seed)
    return {name: [pairs[int(i)] for i in idx] for name, idx in where.items()}


def encode_split(tokenizer, pairs: list[Pair], cfg: TrainSeq2SeqConfig) -> tuple[list[list[int]], list[list[int]]]:
    """(source ids, summary ids) per pair, both cut to their budgets and ending with eos."""
    sources = encode_truncated(tokenizer, [a for a, _ in pairs], cfg.max_source_tokens)
    summaries = encode_truncated(tokenizer, [h for _, h in pairs], cfg.max_target_tokens)
    return sources, summaries


def resolve_tokenizer(cfg: TrainSeq2SeqConfig) -> Path | str:
    """The tokenizer: given, else the teacher's (a drafter must share it), else the corpus BPE or the model's own."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.teacher and Path(cfg.teacher, "tokenizer.json").is_file():
        return Path(cfg.teacher)
    if is_seq2seq_preset(cfg.model):
        return train_tokenizer.get_or_train(
            CorpusSpec(dataset=cfg.dataset, text_field="article"), cfg.vocab_size, cfg.artifacts_dir
        )
    return cfg.model if cfg.teacher == "" else cfg.teacher


def _file_key(path: str) -> str:
    """A folder enters the cache key by its weights file's size and mtime, a hub name by its name."""
    weights = Path(path) / "model.safetensors"
    if weights.is_file():
        st = weights.stat()
        return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return path


def run_dir_for(cfg: TrainSeq2SeqConfig, tokenizer) -> Path:
    if cfg.name:
        return Path(cfg.artifacts_dir).resolve() / "seq2seq" / cfg.name
    keyed = dataclasses.replace(
        cfg, tokenizer=vocab_fingerprint(tokenizer), teacher=_file_key(cfg.teacher) if cfg.teacher else ""
    )
    key = config_hash(keyed)
    fingerprint = corpus.corpus_fingerprint(CorpusSpec(dataset=cfg.dataset, text_field="article"))[:6]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model.strip("/").split("/")[-1]) + ("-kd" if cfg.teacher else "")
    return Path(cfg.artifacts_dir).resolve() / "seq2seq" / f"{slug}-{key}-{fingerprint}"


def validate(cfg: TrainSeq2SeqConfig) -> None:
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise DistilrayError("steps and batch_size must be positive")
    if cfg.max_source_tokens < 2 or cfg.max_target_tokens < 2:
        raise DistilrayError("max_source_tokens and max_target_tokens must be at least 2 (a token and eos)")
    if not cfg.temperature > 0 or cfg.ce_weight < 0:
        raise DistilrayError("temperature must be > 0 and ce_weight >= 0")


def _check_teacher(cfg: TrainSeq2SeqConfig, tokenizer) -> None:
    """The teacher loads, is seq2seq, and proposes over the student's vocabulary with the same start token."""
    teacher = load_seq2seq_lm(cfg.teacher, device="cpu", dtype=torch.float32)
    if int(teacher.get_output_embeddings().weight.shape[0]) != len(tokenizer):
        raise DistilrayError(
            f"teacher {cfg.teacher} has {teacher.config.vocab_size} logits, the tokenizer {len(tokenizer)} tokens; "
            "they must share the tokenizer"
        )
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    if is_seq2seq_preset(cfg.model) and decoder_start_id(teacher) != start:
        raise DistilrayError(
            f"teacher starts decoding with id {decoder_start_id(teacher)}, "
            f"a {cfg.model} with this tokenizer with {start}"
        )


# ------------------------------------------------------------------------------------- driver
def run(cfg: TrainSeq2SeqConfig) -> dict:
    """Train (or resume, or reuse from the cache) and return where everything went, with figures."""
    validate(cfg)
    if not is_seq2seq_preset(cfg.model):
        load_seq2seq_lm(cfg.model, device="cpu")  # fail early, with a clear message, on a bad path
    tok_dir = resolve_tokenizer(cfg)
    tokenizer = load_tokenizer(tok_dir)
    run_dir = run_dir_for(cfg, tokenizer)
    if cached := cached_result(run_dir):
        return cached
    if cfg.teacher:
        _check_teacher(cfg, tokenizer)
    splits = split_pairs(load_pairs(cfg.dataset), cfg.val_pairs, cfg.test_pairs, cfg.split_seed)
    train_src, train_sum = encode_split(tokenizer, splits["train"], cfg)
    val_src, val_sum = encode_split(tokenizer, splits["validation"], cfg)
    data = {
        "sources": pad_rows(train_src, tokenizer.pad_token_id).numpy().astype(np.int32),  # (N, S)
        "labels": pad_rows(train_sum, IGNORE).numpy().astype(np.int32),  # (N, T)
        "validation": (val_src, val_sum),  # token lists
    }
    folders: dict[str, str | Path] = {"tokenizer": _saved_tokenizer(tokenizer, run_dir)}
    if cfg.teacher and Path(cfg.teacher).is_dir():
        folders["teacher"] = cfg.teacher
    job = TrainJob(Seq2SeqHooks, cfg, run_dir, data=data, folders=folders)
    return train(
        job,
        lambda m: {
            "tokenizer_dir": str(Path(tok_dir).resolve()) if Path(tok_dir).exists() else str(tok_dir),
            "train_pairs": len(train_src),
            "val_pairs": len(val_src),
            "val_loss": float(m["val_loss"]),
            "teacher": cfg.teacher,
        },
    )


def _saved_tokenizer(tokenizer, run_dir: Path) -> Path:
    """The tokenizer's files in the run folder (it may come from a hub name, or a model folder with weights)."""
    folder = run_dir / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------- on the workers
class Seq2SeqHooks(TrainerHooks):
    """Cross-entropy of the gold summary given the article; with a teacher, a divergence from its
    distributions at a temperature plus `ce_weight` x CE (FastLLM's drafter recipe)."""

    label = "train-seq2seq"

    def build(self) -> torch.nn.Module:
        cfg = self.cfg
        if is_seq2seq_preset(cfg.model):
            model = build_seq2seq_lm(cfg.model, self.tokenizer, dropout=cfg.dropout)
        else:
            model = load_seq2seq_lm(cfg.model, device="cpu", dtype=torch.float32).train()
        self.teacher = None
        if cfg.teacher:
            teacher = load_seq2seq_lm(
                self.folders.get("teacher", cfg.teacher), device=self.worker.device, dtype=torch.float32
            )
            self.teacher = teacher.requires_grad_(False)
        self.pad_id, self.start_id = self.tokenizer.pad_token_id, decoder_start_id(model)
        return model

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        sources, labels = self.data["sources"], self.data["labels"]
        rows = batch_rows(len(sources), self.cfg.batch_size, step, self.cfg.seed, self.worker.rank, self.worker.world)
        src = torch.from_numpy(np.asarray(sources[rows]).astype(np.int64))
        return _trim(src, torch.from_numpy(np.asarray(labels[rows]).astype(np.int64)), self.pad_id)

    def loss(self, model, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
        src, labels = batch
        cfg, device = self.cfg, self.worker.device
        return seq2seq_loss(
            model,
            src.to(device),
            labels.to(device),
            self.pad_id,
            self.start_id,
            self.teacher,
            cfg.loss,
            cfg.temperature,
            cfg.ce_weight,
        )

    def validate(self, model) -> dict[str, float]:
        sources, summaries = self.data["validation"]
        return {"loss": mean_token_loss(model, sources, summaries, self.pad_id, self.start_id)}


def _trim(src: torch.Tensor, labels: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of the batch: (B, S), (B, T) -> (B, S'), (B, T')."""
    s = int((src != pad_id).sum(1).max())
    t = int((labels != IGNORE).sum(1).max())
    return src[:, :s], labels[:, :t]


def restore_checkpoint(directory: Path, model, optimizer) -> int:
    """Weights and optimizer state from a checkpoint folder, in place; returns its step (T5's tied
    embeddings are stored once; the shared loader allows for that)."""
    return int(load_checkpoint_into(Path(directory), model, optimizer)["step"])
