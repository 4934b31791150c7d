"""The MDLM ancestral sampler: the prediction cache, fp64 draws, prompts, step callbacks and validation."""

from __future__ import annotations

import pytest
import torch

from distilray.decoding.mdlm import check_num_steps, sample
from distilray.errors import DistilrayError
from distilray.models.mdlm import MDLM, MDLMConfig

VOCAB, MASK, LENGTH = 30, 29, 8


def _model(time_conditioning: bool = False) -> MDLM:
    """A tiny DiT with every weight random, so x_theta is far from uniform."""
    torch.manual_seed(0)
    config = MDLMConfig(VOCAB, LENGTH, 32, 2, 2, cond_dim=16, dropout=0.1, time_conditioning=time_conditioning)
    model = MDLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cache_gives_the_same_tokens_with_fewer_forward_passes() -> None:
    model = _model()
    plain = sample(model, 2, 64, generator=_gen(1))
    cached = sample(model, 2, 64, generator=_gen(1), cache_predictions=True)
    assert torch.equal(plain.tokens, cached.tokens)
    assert plain.nfe >= 64 and cached.nfe < plain.nfe // 2  # 64 steps >> L = 8: most steps reveal nothing
    assert plain.steps == cached.steps == 64 and plain.seconds > 0


def test_cache_is_off_for_a_time_conditioned_model() -> None:
    model = _model(time_conditioning=True)
    cached = sample(model, 2, 32, generator=_gen(2), cache_predictions=True)
    assert cached.nfe >= 32
    assert torch.equal(cached.tokens, sample(model, 2, 32, generator=_gen(2)).tokens)


@pytest.mark.parametrize("float64", [True, False])
def test_samples_hold_no_mask_and_reproduce_from_the_seed(float64: bool) -> None:
    model = _model()
    first = sample(model, 4, 4, generator=_gen(3), float64=float64)
    assert first.tokens.shape == (4, LENGTH) and first.tokens.dtype == torch.long
    assert not bool((first.tokens == MASK).any())
    assert torch.equal(first.tokens, sample(model, 4, 4, generator=_gen(3), float64=float64).tokens)
    assert not torch.equal(first.tokens, sample(model, 4, 4, generator=_gen(4), float64=float64).tokens)


def test_one_step_reveals_by_the_final_argmax() -> None:
    model = _model()
    result = sample(model, 3, 1, generator=_gen(5))
    assert result.nfe <= 2 and not bool((result.tokens == MASK).any())


def test_prefix_is_kept_at_every_step_and_steps_only_reveal() -> None:
    model = _model()
    prompt = torch.tensor([3, 1, 4])
    states: list[tuple[int, torch.Tensor]] = []
    result = sample(model, 2, 6, generator=_gen(6), prefix=prompt, on_step=lambda j, z: states.append((j, z.clone())))
    assert [j for j, _ in states] == list(range(6))
    for _, z in states:
        assert torch.equal(z[:, :3], prompt.expand(2, 3))
    for (_, before), (_, after) in zip(states, states[1:]):
        revealed = before != MASK
        assert torch.equal(after[revealed], before[revealed])  # a revealed token never changes
    assert torch.equal(result.tokens[:, :3], prompt.expand(2, 3))

    rows = torch.tensor([[1, 2], [5, 6]])
    assert torch.equal(sample(model, 2, 3, generator=_gen(7), prefix=rows).tokens[:, :2], rows)


def test_temperature_and_seq_len() -> None:
    model = _model()
    short = sample(model, 2, 3, generator=_gen(8), seq_len=5, temperature=0.5)
    assert short.tokens.shape == (2, 5)
    for bad in ({"temperature": 0.0}, {"seq_len": LENGTH + 1}, {"eps": 0.0}):
        with pytest.raises(DistilrayError):
            sample(model, 2, 3, generator=_gen(), **bad)


def test_model_mode_is_restored() -> None:
    model = _model().train()
    sample(model, 1, 2, generator=_gen(9))
    assert model.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 100_001}, "num_steps"),
        ({"prefix": torch.arange(LENGTH)}, "leaves nothing"),
        ({"prefix": torch.tensor([1, MASK])}, "mask token"),
        ({"prefix": torch.tensor([[1, 2]] * 3)}, "prefix must be"),
    ],
)
def test_bad_requests_are_clear_errors(kwargs: dict, message: str) -> None:
    args = {"num_steps": 4, **kwargs}
    with pytest.raises(DistilrayError, match=message):
        sample(_model(), 2, generator=_gen(), **args)


def test_check_num_steps() -> None:
    assert check_num_steps(1) == 1 and check_num_steps(100_000) == 100_000
    for bad in (0, -3, 100_001, 2.0, True):
        with pytest.raises(DistilrayError):
            check_num_steps(bad)  # type: ignore[arg-type]
