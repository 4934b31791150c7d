import pytest
import torch

from distilray.errors import DistilrayError
from distilray.training import batch_rows, load_checkpoint_into, lr_at, make_optimizer, pack_tokens, save_checkpoint


def test_pack_tokens_inserts_eos_and_drops_tail():
    blocks = pack_tokens([[1, 2, 3], [4, 5]], block_len=3, eos_id=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]  # trailing eos dropped
    with pytest.raises(DistilrayError, match="corpus too small"):
        pack_tokens([[1]], block_len=8, eos_id=0)


def test_batches_are_a_pure_function_of_step_and_cover_each_epoch():
    a = [batch_rows(10, 4, s, seed=3, rank=0, world=1).tolist() for s in range(5)]
    b = [batch_rows(10, 4, s, seed=3, rank=0, world=1).tolist() for s in range(5)]
    assert a == b
    first_epoch = sum(a, [])[:10]
    assert sorted(first_epoch) == list(range(10))
    # two ranks split the same global batch with no overlap
    r0, r1 = batch_rows(10, 4, 2, 3, 0, 2), batch_rows(10, 4, 2, 3, 1, 2)
    assert sorted([*r0, *r1]) == sorted(a[2])
    with pytest.raises(DistilrayError, match="not divisible"):
        batch_rows(10, 5, 0, 0, 0, 2)


def test_lr_schedule_shape():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)


def test_checkpoint_roundtrip_and_corruption(small_tokenizer, tmp_path):
    from distilray.models.causal_lm import build_causal_lm

    tok, _ = small_tokenizer
    torch.manual_seed(0)
    model = build_causal_lm("tiny", tok)
    opt = make_optimizer(model, 1e-3, 0.1)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", model, tok, opt, {"step": 7})
    torch.manual_seed(1)
    fresh = build_causal_lm("tiny", tok)
    fresh_opt = make_optimizer(fresh, 1e-3, 0.1)
    assert load_checkpoint_into(tmp_path / "ck", fresh, fresh_opt)["step"] == 7
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DistilrayError, match="corrupt"):
        load_checkpoint_into(tmp_path / "ck", fresh, fresh_opt)
    (tmp_path / "ck" / "trainer_state.json").write_text("{")
    with pytest.raises(DistilrayError, match="corrupt or incomplete"):
        load_checkpoint_into(tmp_path / "ck", fresh, fresh_opt)


def test_ema_warms_up_then_holds_its_decay():
    from distilray.training import ema_copy, ema_decay, ema_update

    assert ema_decay(0.999, 0) == pytest.approx(0.1) and ema_decay(0.999, 90) == pytest.approx(0.91)
    assert ema_decay(0.999, 10**6) == 0.999
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema = ema_copy(model)
    with torch.no_grad():
        model.weight.fill_(6.0)
    ema_update(ema, model, 0.75)
    assert torch.allclose(ema["weight"], torch.full((1, 2), 0.75 * 2.0 + 0.25 * 6.0))
    assert torch.equal(model.weight, torch.full((1, 2), 6.0))  # the average is a copy
