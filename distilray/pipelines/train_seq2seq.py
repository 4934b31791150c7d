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
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch

from distilray import corpus
from distilray.config import CorpusSpec, TrainSeq2SeqConfig, config_hash
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_write_json, read_json
from distilray.losses.distillation import DIVERGENCES
from distilray.models.causal_lm import count_parameters
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
from distilray.pipelines.ray_runtime import cpus_per_worker, ensure_ray, resolve_use_gpu
from distilray.pipelines.trainer_runtime import (
    apply_update,
    config_from_dict,
    copy_final_model,
    fail_at_step_from_env,
    fit,
    folder_files,
    latest_checkpoint,
    maybe_inject_failure,
    report_step,
    restore_start_step,
    saved_files,
    worker_context,
    worker_tokenizer,
    write_folder,
)
from distilray.tokenizer import load_tokenizer, vocab_fingerprint
from distilray.training import MetricsLog, batch_rows, load_checkpoint_into, lr_at, make_optimizer, read_trainer_state, save_checkpoint

log = logging.getLogger("distilray.train_seq2seq")

Pair = tuple[str, str]
# Config fields that do not change what is trained (left out of the artifact cache key).
_NOT_IN_KEY = ("artifacts_dir", "checkpoint_every", "report_every", "keep_checkpoints", "max_failures", "name", "cpus_per_worker", "use_gpu")


# ------------------------------------------------------------------------------------- data
def load_pairs(dataset: str) -> list[Pair]:
    """(article, highlights) pairs: `cnndm` from ../shared/data, or a local .jsonl/.json with those fields."""
    if dataset == "cnndm":
        return corpus.load_cnndm_pairs()
    path = Path(dataset).expanduser()
    if not (path.is_file() and path.suffix.lower() in (".jsonl", ".json")):
        raise DistilrayError(f"train-seq2seq reads article/highlights pairs: dataset=cnndm or a .jsonl/.json file, got {dataset!r}")
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
        return train_tokenizer.get_or_train(CorpusSpec(dataset=cfg.dataset, text_field="article"), cfg.vocab_size, cfg.artifacts_dir)
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
    keyed = dataclasses.replace(cfg, tokenizer=vocab_fingerprint(tokenizer), teacher=_file_key(cfg.teacher) if cfg.teacher else "")
    key = config_hash(keyed, exclude=_NOT_IN_KEY)
    fingerprint = corpus.corpus_fingerprint(CorpusSpec(dataset=cfg.dataset, text_field="article"))[:6]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model.strip("/").split("/")[-1]) + ("-kd" if cfg.teacher else "")
    return Path(cfg.artifacts_dir).resolve() / "seq2seq" / f"{slug}-{key}-{fingerprint}"


def validate(cfg: TrainSeq2SeqConfig) -> None:
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise DistilrayError("steps and batch_size must be positive")
    if cfg.max_source_tokens < 2 or cfg.max_target_tokens < 2:
        raise DistilrayError("max_source_tokens and max_target_tokens must be at least 2 (a token and eos)")
    if cfg.teacher and cfg.loss not in DIVERGENCES:
        raise DistilrayError(f"loss must be one of {', '.join(DIVERGENCES)} with a teacher, got {cfg.loss!r}")
    if not cfg.temperature > 0 or cfg.ce_weight < 0:
        raise DistilrayError("temperature must be > 0 and ce_weight >= 0")


def _check_teacher(cfg: TrainSeq2SeqConfig, tokenizer) -> None:
    """The teacher loads, is seq2seq, and proposes over the student's vocabulary with the same start token."""
    teacher = load_seq2seq_lm(cfg.teacher, device="cpu", dtype=torch.float32)
    if int(teacher.get_output_embeddings().weight.shape[0]) != len(tokenizer):
        raise DistilrayError(f"teacher {cfg.teacher} has {teacher.config.vocab_size} logits, the tokenizer {len(tokenizer)} tokens; they must share the tokenizer")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    if is_seq2seq_preset(cfg.model) and decoder_start_id(teacher) != start:
        raise DistilrayError(f"teacher starts decoding with id {decoder_start_id(teacher)}, a {cfg.model} with this tokenizer with {start}")


# ------------------------------------------------------------------------------------- driver
def run(cfg: TrainSeq2SeqConfig) -> dict:
    """Train (or resume, or reuse from the cache) and return where everything went, with figures."""
    validate(cfg)
    if not is_seq2seq_preset(cfg.model):
        load_seq2seq_lm(cfg.model, device="cpu")  # fail early, with a clear message, on a bad path
    tok_dir = resolve_tokenizer(cfg)
    tokenizer = load_tokenizer(tok_dir)
    run_dir = run_dir_for(cfg, tokenizer)
    result_path = run_dir / "result.json"
    if result_path.is_file() and (run_dir / "model" / "config.json").is_file():
        return {**read_json(result_path), "cached": True}
    if cfg.teacher:
        _check_teacher(cfg, tokenizer)

    splits = split_pairs(load_pairs(cfg.dataset), cfg.val_pairs, cfg.test_pairs, cfg.split_seed)
    train_src, train_sum = encode_split(tokenizer, splits["train"], cfg)
    val = encode_split(tokenizer, splits["validation"], cfg)
    ensure_ray()
    use_gpu = resolve_use_gpu(cfg.use_gpu)
    cpus = cpus_per_worker(cfg.cpus_per_worker, cfg.num_workers)
    run_dir.mkdir(parents=True, exist_ok=True)
    storage = run_dir / "ray"
    resume = latest_checkpoint(storage)
    if resume is not None:
        log.warning(f"[train-seq2seq] resuming from {resume} (step {read_trainer_state(resume)['step']})")
    teacher_dir = Path(cfg.teacher) if cfg.teacher and Path(cfg.teacher).is_dir() else None
    loop_config = {
        "cfg": dataclasses.asdict(cfg),
        "src_ref": ray.put(pad_rows(train_src, tokenizer.pad_token_id).numpy().astype(np.int32)),  # (N, S)
        "labels_ref": ray.put(pad_rows(train_sum, IGNORE).numpy().astype(np.int32)),  # (N, T)
        "val_ref": ray.put(val),
        "tokenizer_files": saved_files(tokenizer),
        "teacher_files": folder_files(teacher_dir) if teacher_dir else {},
        "run_dir": str(run_dir),
        "threads": cpus,
        "resume_dir": str(resume) if resume else "",
        "fail_at_step": fail_at_step_from_env(),
    }
    result = fit(train_loop, loop_config, storage, cfg.num_workers, use_gpu, cpus, cfg.keep_checkpoints, cfg.max_failures)
    model_dir = run_dir / "model"
    copy_final_model(result, model_dir)
    metrics = result.metrics
    summary = {
        "run_dir": str(run_dir),
        "model_dir": str(model_dir),
        "tokenizer_dir": str(Path(tok_dir).resolve()) if Path(tok_dir).exists() else str(tok_dir),
        "metrics_csv": str(run_dir / "metrics.csv"),
        "parameters": int(metrics["parameters"]),
        "steps": int(metrics["step"]),
        "train_pairs": len(train_src),
        "val_pairs": len(val[0]),
        "first_loss": float(metrics["first_loss"]),
        "final_loss": float(metrics["loss"]),
        "val_loss": float(metrics["val_loss"]),
        "teacher": cfg.teacher,
        "config": dataclasses.asdict(cfg),
        "cached": False,
    }
    atomic_write_json(result_path, summary)
    return summary


# --------------------------------------------------------------------------------- on the workers
def train_loop(c: dict) -> None:
    cfg = config_from_dict(TrainSeq2SeqConfig, c["cfg"])
    rank, world, device = worker_context(c["threads"], cfg.seed)

    tok_dir, tokenizer = worker_tokenizer(c["tokenizer_files"])
    if is_seq2seq_preset(cfg.model):
        model = build_seq2seq_lm(cfg.model, tokenizer, dropout=cfg.dropout)
    else:
        model = load_seq2seq_lm(cfg.model, device="cpu", dtype=torch.float32).train()
    teacher, teacher_dir = None, None
    if cfg.teacher:
        teacher_dir = write_folder(c["teacher_files"], "distilray-teacher-") if c["teacher_files"] else None
        teacher = load_seq2seq_lm(teacher_dir or cfg.teacher, device=device, dtype=torch.float32)
        teacher.requires_grad_(False)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    start = restore_start_step(model, optimizer, c["resume_dir"])
    raw_model = model
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1, and onto the device
    src_all = torch.from_numpy(np.asarray(ray.get(c["src_ref"])).astype(np.int64))  # (N, S)
    labels_all = torch.from_numpy(np.asarray(ray.get(c["labels_ref"])).astype(np.int64))  # (N, T)
    pad_id, start_id = tokenizer.pad_token_id, decoder_start_id(raw_model)
    metrics_log = MetricsLog(Path(c["run_dir"]), resume_step=start) if rank == 0 else None
    n_params = count_parameters(raw_model)
    print_every = max(1, cfg.steps // 20)
    first_loss = float("nan")
    model.train()
    for step in range(start, cfg.steps):
        maybe_inject_failure(c["run_dir"], c["fail_at_step"], step, rank)
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        rows = torch.from_numpy(batch_rows(len(src_all), cfg.batch_size, step, cfg.seed, rank, world))
        src, labels = _trim(src_all[rows], labels_all[rows], pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = seq2seq_loss(model, src.to(device), labels.to(device), pad_id, start_id, teacher,
                                cfg.loss, cfg.temperature, cfg.ce_weight)
        grad_norm = apply_update(model, optimizer, loss, lr, cfg.grad_clip)
        loss_value = float(loss.detach())  # this rank's loss; ranks differ only by their batch
        if step == start:
            first_loss = loss_value
        done = step + 1
        metrics = {"step": done, "loss": loss_value, "first_loss": first_loss, "lr": lr, "grad_norm": grad_norm,
                   "seconds_per_step": time.perf_counter() - t0, "parameters": n_params}
        if metrics_log is not None:
            metrics_log.log(done, {k: v for k, v in metrics.items() if k not in ("step", "parameters", "first_loss")})
            if done % print_every == 0 or done == cfg.steps:
                log.info(f"[train-seq2seq] step {done}/{cfg.steps} loss {loss_value:.4f} lr {lr:.2e}")
        final = done == cfg.steps
        if final:
            sources, summaries = ray.get(c["val_ref"])
            metrics["val_loss"] = mean_token_loss(raw_model, sources, summaries, pad_id, start_id) if rank == 0 else float("nan")
        state = {"step": done, "seed": cfg.seed, "model": cfg.model}
        report_step(metrics, done, cfg.steps, cfg.checkpoint_every, cfg.report_every, rank,
                    lambda d: save_checkpoint(d, raw_model, tokenizer, optimizer, state))
    if metrics_log is not None:
        metrics_log.close()
    for d in (tok_dir, teacher_dir):
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)


def _trim(src: torch.Tensor, labels: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of the batch: (B, S), (B, T) -> (B, S'), (B, T')."""
    s = int((src != pad_id).sum(1).max())
    t = int((labels != IGNORE).sum(1).max())
    return src[:, :s], labels[:, :t]


def restore_checkpoint(directory: Path, model, optimizer) -> int:
    """Weights and optimizer state from a checkpoint folder, in place; returns its step (T5's tied
    embeddings are stored once; the shared loader allows for that)."""
    return int(load_checkpoint_into(Path(directory), model, optimizer)["step"])
