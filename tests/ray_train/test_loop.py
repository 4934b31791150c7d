"""The shared Ray Train loop with a toy method whose extra state (a round counter and a frozen teacher
that enters the loss) must survive a worker crash, as SDTT's round, dt and teacher will."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from distilray.config import CheckpointConfig, Config, OptimConfig, ScaleConfig
from distilray.ray_train import TrainerHooks, TrainJob, WorkerInfo, cached_result, train

pytestmark = pytest.mark.ray
ROUND_EVERY = 3  # optimizer steps per round


@dataclass(frozen=True)
class ToyConfig(Config):
    steps: int = 10
    batch_size: int = 8
    seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05, warmup_steps=1, weight_decay=0.0))
    scale: ScaleConfig = field(default_factory=lambda: ScaleConfig(num_workers=1, cpus_per_worker=1, use_gpu="false"))
    checkpoint: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(every=2, report_every=1, max_failures=1)
    )


class ToyHooks(TrainerHooks):
    """Linear regression pulled towards a teacher that takes the student's weights every ROUND_EVERY steps."""

    label = "toy"

    def build(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed)
        self.round, self.teacher = 0, torch.zeros(1, 4)
        return torch.nn.Linear(4, 1, bias=False)

    def batch(self, step: int):
        x = torch.from_numpy(np.array(self.data["x"]))  # object-store arrays are read-only
        rows = torch.from_numpy(np.random.default_rng([self.cfg.seed, step]).integers(0, len(x), self.cfg.batch_size))
        return x[rows], x[rows] @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def loss(self, model, batch, step: int):
        x, y = batch
        pull = ((model.weight - self.teacher) ** 2).sum()
        return torch.nn.functional.mse_loss(model(x), y) + 0.5 * pull, {"round": float(self.round)}

    def after_update(self, done: int, model) -> None:
        if done % ROUND_EVERY == 0:
            self.round += 1
            self.teacher = model.weight.detach().clone()

    def validate(self, model) -> dict[str, float]:
        return {"teacher_norm": float(self.teacher.norm())}

    def save_model(self, model, folder: Path) -> None:
        save_file({"weight": model.weight.detach().contiguous()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}")

    def extra_state(self) -> dict:
        return {"round": self.round}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"teacher": self.teacher}

    def load_extra(self, state: dict, tensors: dict[str, torch.Tensor], folder: Path) -> None:
        self.round, self.teacher = state["round"], tensors["teacher"]


@pytest.fixture(scope="module", autouse=True)
def ship_this_module(ray_session):
    """Workers import distilray, not the tests: send this module's classes by value."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _run(run_dir: Path) -> dict:
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    return train(
        TrainJob(ToyHooks, ToyConfig(), run_dir, data={"x": x}),
        lambda m: {"round": m["round"], "teacher_norm": m["val_teacher_norm"]},
    )


def test_extra_state_survives_a_worker_crash(tmp_path, monkeypatch):
    clean = _run(tmp_path / "clean")
    assert clean["steps"] == 10 and clean["round"] == 3.0  # rounds end after steps 3, 6 and 9
    monkeypatch.setenv("DISTILRAY_FAIL_AT_STEP", "7")  # after the step-6 checkpoint, mid-round
    crashed = _run(tmp_path / "crashed")
    assert (tmp_path / "crashed" / "injected_failure").exists()
    assert crashed["round"] == clean["round"] and crashed["teacher_norm"] == pytest.approx(clean["teacher_norm"])
    # the teacher enters the loss: had it not been restored, the weights would differ
    want = load_file(str(tmp_path / "clean" / "model" / "model.safetensors"))["weight"]
    got = load_file(str(tmp_path / "crashed" / "model" / "model.safetensors"))["weight"]
    assert torch.allclose(got, want, atol=1e-6)
    assert not (tmp_path / "crashed" / "model" / "extra.safetensors").exists()  # the model folder is the model
    checkpoints = sorted((tmp_path / "crashed" / "ray").glob("*/checkpoint_0*"))
    assert json.loads((checkpoints[-1] / "trainer_state.json").read_text())["extra"] == {"round": 3}
    assert cached_result(tmp_path / "clean")["cached"] is True


def test_hooks_step_without_ray():
    """A method's hooks are plain torch: build, batch, loss and the extra state work in a test process."""
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    hooks = ToyHooks(ToyConfig(), WorkerInfo(0, 1, torch.device("cpu"), Path(".")), {"x": x}, {})
    model = hooks.build()
    loss, extra = hooks.loss(model, hooks.batch(0), 0)
    assert loss.ndim == 0 and loss > 0 and extra == {"round": 0.0}
    for done in range(1, 7):
        hooks.after_update(done, model)
    assert hooks.extra_state() == {"round": 2}
