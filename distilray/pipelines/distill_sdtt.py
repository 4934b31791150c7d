"""`distilray distill-sdtt`: self-distillation through time (reference/sdtt.md 2) on Ray Train.

Each step: clean blocks x, rotated-lattice times t, z_t ~ q(z_t | x); the frozen teacher takes
`num_teacher_steps` ancestral steps of size delta from z_t (the corrected grid t_k = t - k delta, or
the released code's grid behind `teacher_grid=original`) and its distributions at the positions each
step reveals become the targets; the student, one pass on z_t, is pulled to them by a divergence over
the positions masked in z_t. Every `grow_dt_every` optimizer steps a round ends: the teacher takes the
student's (raw) weights and delta grows by m, so the student samples well in m times fewer steps.

The round, delta, the teacher's weights and the EMA live in every checkpoint (the original kept the
teacher out of its checkpoints and resumed from the first teacher, pitfall 10), and each round's
student is saved under `rounds/round_<r>/`. Loaders: `load_teacher(cfg)` and
`load_student(cfg, round=...)` open local artifacts as the seed's loaders open Hugging Face revisions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from distilray.config import DistillSDTTConfig, config_hash, replace_keys
from distilray.errors import DistilrayError
from distilray.io_utils import atomic_dir, atomic_write_json, folder_fingerprint
from distilray.losses import sdtt
from distilray.losses.mdlm import SAMPLER_EPS, mask_tokens, sample_times, subs_log_probs
from distilray.losses.sdtt import delta_for_round, sdtt_loss, teacher_targets
from distilray.models.mdlm import EMA_FILE, load_diffusion_lm, load_mdlm
from distilray.pipelines.train_mdlm import DiffusionHooks, diffusion_blocks
from distilray.ray_train import TrainJob, cached_result, train
from distilray.tokenizer import load_tokenizer
from distilray.training import ema_copy


def output_dir_for(cfg: DistillSDTTConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).resolve()
    key = config_hash(dataclasses.replace(cfg, teacher=folder_fingerprint(cfg.teacher)))
    return Path(cfg.artifacts_dir).resolve() / "sdtt" / f"{cfg.loss}-{cfg.teacher_grid}-{key}"


def num_rounds(cfg: DistillSDTTConfig) -> int:
    """Rounds that fit in `steps`, stopping before a student would sample with fewer than min_sampling_steps."""
    schedule = sdtt.num_rounds(cfg.orig_num_steps, cfg.num_teacher_steps, cfg.min_sampling_steps)
    return min(cfg.steps // cfg.grow_dt_every, schedule)


def student_sampling_steps(cfg: DistillSDTTConfig, round_index: int) -> int:
    """The step count the student of round r (1-based: after r rounds) is meant to sample with."""
    return sdtt.sampling_steps_for_round(round_index - 1, cfg.orig_num_steps, cfg.num_teacher_steps)


def validate(cfg: DistillSDTTConfig) -> None:
    if not cfg.teacher:
        raise DistilrayError("distill-sdtt needs teacher=PATH (a train-mdlm model folder)")
    if cfg.num_teacher_steps < 1 or cfg.orig_num_steps < 1 or cfg.grow_dt_every < 1:
        raise DistilrayError("num_teacher_steps, orig_num_steps and grow_dt_every must be positive")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise DistilrayError("steps and batch_size must be positive")
    if not 0.0 <= cfg.ema < 1.0:
        raise DistilrayError(f"ema must lie in [0, 1), got {cfg.ema}")


def run(cfg: DistillSDTTConfig) -> dict:
    """Distil (or resume, or reuse from the cache); return where the students went, with figures per round."""
    validate(cfg)
    out_dir = output_dir_for(cfg)
    if cached := cached_result(out_dir):
        return cached
    teacher = load_mdlm(cfg.teacher)  # a clear error on a folder that is not an MDLM
    tokenizer = load_tokenizer(cfg.teacher)
    seq_len = teacher.config.seq_len
    del teacher
    train_blocks = diffusion_blocks(cfg.corpus, tokenizer, seq_len, "train")
    val_blocks = diffusion_blocks(cfg.corpus, tokenizer, seq_len, "validation")[: cfg.eval_blocks]
    job = TrainJob(
        SDTTHooks,
        cfg,
        out_dir,
        data={"train": train_blocks, "validation": val_blocks},
        folders={"teacher": cfg.teacher},
    )
    rounds = num_rounds(cfg)
    return train(
        job,
        lambda m: {
            "teacher": cfg.teacher,
            "loss": cfg.loss,
            "teacher_grid": cfg.teacher_grid,
            "rounds": rounds,
            "students": {str(r): str(out_dir / "rounds" / f"round_{r}") for r in range(1, rounds + 1)},
            "sampling_steps": {str(r): student_sampling_steps(cfg, r) for r in range(1, rounds + 1)},
            "val_nelbo": float(m["val_nelbo"]),
        },
    )


def load_teacher(cfg: DistillSDTTConfig, device: str = "cpu"):
    """The MDLM a distill-sdtt config starts from (EMA weights)."""
    return load_diffusion_lm(cfg.teacher, device=device)


def load_student(cfg: DistillSDTTConfig, round: int | None = None, loss: str | None = None, device: str = "cpu"):
    """The student after `round` rounds (default: the last) of the run `cfg` names (`loss` overrides its loss)."""
    if loss is not None:
        cfg = replace_keys(cfg, loss=loss)
    out_dir = output_dir_for(cfg)
    rounds = sorted(int(p.name.split("_")[1]) for p in (out_dir / "rounds").glob("round_*"))
    if not rounds:
        raise DistilrayError(f"no distilled student in {out_dir}: run `distilray distill-sdtt` with this config first")
    chosen = rounds[-1] if round is None else round
    if chosen not in rounds:
        raise DistilrayError(f"round {chosen} is not in {out_dir / 'rounds'}; there are {rounds}")
    return load_diffusion_lm(out_dir / "rounds" / f"round_{chosen}", device=device)


class SDTTHooks(DiffusionHooks):
    """The student (initialised from the teacher) against a frozen teacher that is replaced every round."""

    label = "distill-sdtt"

    def build(self) -> torch.nn.Module:
        folder = self.folders["teacher"]
        self._tokenizer = load_tokenizer(folder)
        self.mask_id = self._tokenizer.mask_token_id
        student = load_diffusion_lm(folder).train()  # the student starts as the teacher (its EMA weights)
        self.teacher = load_diffusion_lm(folder, device=self.worker.device).requires_grad_(False)
        self.round, self.total_rounds = 0, num_rounds(self.cfg)
        self.ema = ema_copy(student)
        return student

    @property
    def delta(self) -> float:
        cfg = self.cfg
        return delta_for_round(self.round, cfg.orig_num_steps, cfg.num_teacher_steps, SAMPLER_EPS)

    def loss(self, model, x: torch.Tensor, step: int):
        generator, device = self.generator(step), self.worker.device
        t = sample_times(len(x), generator, SAMPLER_EPS, "sdtt")
        z = mask_tokens(x, t, self.mask_id, generator)
        with torch.autocast(device.type, enabled=False):  # teacher and student log-probs in fp32
            targets, masked = teacher_targets(
                lambda zk: subs_log_probs(self.teacher(zk.to(device)).float(), zk.to(device), self.mask_id),
                z,
                t,
                self.delta,
                self.mask_id,
                generator,
                num_teacher_steps=self.cfg.num_teacher_steps,
                grid=self.cfg.teacher_grid,
                eps_s=SAMPLER_EPS,
                float64=self.cfg.float64,
            )
            student = subs_log_probs(model(z.to(device)).float(), z.to(device), self.mask_id)
        loss = sdtt_loss(self.cfg.loss, student, targets.to(device), masked.to(device))
        return loss, {"round": float(self.round), "delta": self.delta}

    def after_update(self, done: int, model) -> None:
        """EMA; at a round's end (once per optimizer step) the teacher takes the student's raw weights."""
        super().after_update(done, model)
        if done % self.cfg.grow_dt_every or self.round >= self.total_rounds:
            return
        self.round += 1
        self.teacher.load_state_dict(model.state_dict())
        if self.worker.rank == 0:
            self._save_round(model)

    def _save_round(self, model) -> None:
        """The student of this round (raw weights, EMA, tokenizer) under rounds/round_<r>/, written atomically."""
        with atomic_dir(self.worker.run_dir / "rounds" / f"round_{self.round}") as tmp:
            self.save_model(model, tmp)
            atomic_write_json(
                tmp / "round.json",
                {
                    "round": self.round,
                    "delta_trained": delta_for_round(
                        self.round - 1, self.cfg.orig_num_steps, self.cfg.num_teacher_steps, SAMPLER_EPS
                    ),
                    "sampling_steps": student_sampling_steps(self.cfg, self.round),
                    "loss": self.cfg.loss,
                    "teacher_grid": self.cfg.teacher_grid,
                },
            )

    def extra_state(self) -> dict:
        return {"round": self.round, "delta": self.delta}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}

    def load_extra(self, state: dict, tensors: dict[str, torch.Tensor], folder: Path) -> None:
        super().load_extra(state, tensors, folder)
        self.round = int(state["round"])
        teacher = {k.removeprefix("teacher."): v for k, v in tensors.items() if k.startswith("teacher.")}
        self.teacher.load_state_dict({k: v.to(self.worker.device) for k, v in teacher.items()})


def round_summaries(out_dir: Path) -> list[dict]:
    """Every saved round's round.json, in order."""
    found = sorted((Path(out_dir) / "rounds").glob("round_*/round.json"), key=lambda p: int(p.parent.name[6:]))
    return [json.loads(p.read_text()) for p in found]


__all__ = ["EMA_FILE", "load_student", "load_teacher", "round_summaries", "run"]
