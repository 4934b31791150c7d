"""MDLM's DiT backbone: config checks, forward, save/load, presets at paper scale, and a one-batch overfit."""

from __future__ import annotations

import json

import pytest
import torch

from distilray.errors import DistilrayError
from distilray.losses.mdlm import mask_tokens, nelbo, sample_times, subs_log_probs
from distilray.models.mdlm import MDLM, PRESETS, MDLMConfig, build_mdlm, load_mdlm

VOCAB, MASK, LENGTH = 40, 39, 12


def _random_model(seed: int = 0, **overrides) -> MDLM:
    """dit-micro with every weight random (the zero-initialised adaLN and output layers would hide bugs)."""
    torch.manual_seed(seed)
    config = MDLMConfig(VOCAB, LENGTH, d_model=32, n_layers=2, n_heads=2, cond_dim=16, dropout=0.0, **overrides)
    model = MDLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def test_config_defaults_and_checks() -> None:
    assert MDLMConfig(50, 8, d_model=32, n_heads=2).mask_id == 49
    assert MDLMConfig(50, 8, d_model=32, n_heads=2, mask_id=3).mask_id == 3
    with pytest.raises(DistilrayError, match="heads"):
        MDLMConfig(50, 8, d_model=30, n_heads=4)
    with pytest.raises(DistilrayError, match="mask_id"):
        MDLMConfig(50, 8, d_model=32, n_heads=2, mask_id=50)
    with pytest.raises(DistilrayError, match="dropout"):
        MDLMConfig(50, 8, d_model=32, n_heads=2, dropout=1.0)
    with pytest.raises(DistilrayError, match="preset"):
        build_mdlm("dit-huge", 50, 49, 8)


def test_forward_shape_and_bidirectional_attention() -> None:
    model = _random_model()
    ids = torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    assert logits.shape == (3, LENGTH, VOCAB) and logits.dtype == torch.float32
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    assert not torch.allclose(model(changed)[:, 0], logits[:, 0])  # the first position sees the last one
    with pytest.raises(DistilrayError, match="context"):
        model(torch.zeros(1, LENGTH + 1, dtype=torch.long))


def test_time_input_is_ignored_unless_time_conditioned() -> None:
    ids = torch.full((2, LENGTH), MASK)
    plain = _random_model()
    assert torch.equal(plain(ids, torch.tensor([0.1, 0.9])), plain(ids, torch.tensor([0.9, 0.1])))
    timed = _random_model(time_conditioning=True)
    low, high = timed(ids, torch.tensor([0.1, 0.1])), timed(ids, torch.tensor([0.9, 0.9]))
    assert not torch.allclose(low, high)
    with pytest.raises(DistilrayError, match="needs t"):
        timed(ids)


def test_fresh_model_starts_uniform() -> None:
    model = build_mdlm("dit-micro", VOCAB, MASK, LENGTH)
    assert torch.equal(model(torch.full((1, LENGTH), MASK)), torch.zeros(1, LENGTH, VOCAB))  # adaLN-zero, zero head


def test_save_load_round_trip_gives_identical_logits(tmp_path) -> None:
    model = _random_model(time_conditioning=True, mask_id=5)
    model.save_pretrained(tmp_path / "mdlm")
    config = json.loads((tmp_path / "mdlm" / "config.json").read_text())
    assert config["architecture"] == "mdlm_dit" and config["mask_id"] == 5
    loaded = load_mdlm(tmp_path / "mdlm")
    assert loaded.config == model.config and not loaded.training
    ids, t = torch.randint(0, VOCAB, (2, LENGTH)), torch.tensor([0.3, 0.7])
    assert torch.equal(loaded(ids, t), model(ids, t))


def test_loading_a_folder_that_is_not_an_mdlm_names_it(tmp_path) -> None:
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(DistilrayError, match=r"gpt2.*not an MDLM.*'gpt2'"):
        load_mdlm(gpt2)

    from distilray.models.conv_drafter import ConvDrafter, ConvDrafterConfig

    ConvDrafter(ConvDrafterConfig(vocab_size=VOCAB, d_model=8)).save_pretrained(tmp_path / "cnn")
    with pytest.raises(DistilrayError, match="conv_drafter"):
        MDLM.from_pretrained(tmp_path / "cnn")
    with pytest.raises(DistilrayError, match="no config.json"):
        load_mdlm(tmp_path / "missing")


@pytest.mark.parametrize(
    ("preset", "millions"), [("dit-orig-small", 169), ("dit-orig-medium", 424), ("dit-orig-large", 862)]
)
def test_orig_presets_match_the_published_parameter_counts(preset: str, millions: int) -> None:
    with torch.device("meta"):  # no memory
        model = build_mdlm(preset, vocab_size=50258, mask_id=50257, seq_len=1024)
    assert model.num_parameters() / 1e6 == pytest.approx(millions, rel=0.03)
    assert PRESETS[preset][0] == model.config.d_model


def test_tiny_model_overfits_one_batch_with_the_nelbo() -> None:
    torch.manual_seed(0)
    config = MDLMConfig(VOCAB, LENGTH, d_model=32, n_layers=2, n_heads=2, cond_dim=16, dropout=0.0)
    model = MDLM(config).train()
    x = (torch.arange(8)[:, None] * 4).expand(8, LENGTH)  # one token per row: any visible token gives the row
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    noise = torch.Generator().manual_seed(3)

    def loss_at(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        z = mask_tokens(x, t, MASK, generator)
        return nelbo(subs_log_probs(model(z, t), z, MASK), x, z, t, MASK)

    def probe() -> float:
        generator = torch.Generator().manual_seed(4)
        with torch.no_grad():
            return sum(loss_at(sample_times(8, generator, 1e-3), generator).item() for _ in range(4)) / 4

    before = probe()
    for _ in range(50):
        loss = loss_at(sample_times(8, noise, 1e-3), noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as MDLM; the 1/t weight makes rare spikes
        optimizer.step()
    after = probe()
    assert after < 0.3 * before, (before, after)
