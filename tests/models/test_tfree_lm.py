"""The T-Free LM: config checks, the sum-EmbeddingBag, document-confined attention with position resets, the KV
cache against full forwards, overfitting in both input modes, preset sizes against the paper, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distilray.errors import DistilrayError
from distilray.losses.tfree import tfree_bce
from distilray.models.tfree_lm import (
    PRESETS,
    TFreeLM,
    TFreeLMConfig,
    build_tfree_lm,
    embed_head_params,
    load_tfree_lm,
    param_count,
    save_tfree_lm,
)

V, D = 48, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors this small run fastest on one thread (a second one only adds OpenMP handoffs on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(input: str = "trigram", seed: int = 0, **overrides) -> TFreeLM:
    torch.manual_seed(seed)
    fields = dict(input=input, v=V, m=3, d_model=D, n_layers=2, n_heads=2, max_seq_len=32) | overrides
    return TFreeLM(TFreeLMConfig(**fields)).eval()


def _bags(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random word bags of 1..6 indices each, as (flat indices, EmbeddingBag offsets of B*S entries)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 7, (batch * length,), generator=generator)
    flat = torch.randint(0, V, (int(sizes.sum()),), generator=generator)
    return flat, torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])


def _bag_list(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    ends = torch.cat([offsets[1:], torch.tensor([flat.numel()])])
    return [flat[start:end] for start, end in zip(offsets.tolist(), ends.tolist())]


def _pack(bags: list[torch.Tensor], with_end: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags -> (flat, offsets); EmbeddingBag's offsets, or with_end the loss's (len(bags) + 1 entries)."""
    ends = torch.tensor([len(bag) for bag in bags]).cumsum(0)
    return torch.cat(bags), torch.cat([torch.zeros(1, dtype=torch.long), ends if with_end else ends[:-1]])


def _run(model: TFreeLM, bags: list[torch.Tensor], shape: tuple[int, int], **kwargs) -> torch.Tensor:
    flat, offsets = _pack(bags)
    return model(indices=flat, offsets=offsets, shape=shape, **kwargs)


def test_config_checks() -> None:
    assert TFreeLMConfig(v=100, d_model=4096).mlp_hidden == 10928
    for fields, message in [
        (dict(v=100, d_model=30, n_heads=4), "heads"),
        (dict(v=100, d_model=20, n_heads=4), "even"),
        (dict(v=5, m=10), "cannot exceed v"),
        (dict(v=100, m=3, k=4), "k"),
        (dict(v=0), "v must be positive"),
        (dict(v=100, input="bytes"), "input"),
        (dict(v=100, dropout=1.0), "dropout"),
    ]:
        with pytest.raises(DistilrayError, match=message):
            TFreeLMConfig(**fields)
    with pytest.raises(DistilrayError, match="leaves v open"):
        build_tfree_lm("tfree-micro")
    with pytest.raises(DistilrayError, match="preset"):
        build_tfree_lm("tfree-huge", v=100)
    with pytest.raises(DistilrayError, match="n_layer"):
        build_tfree_lm("tfree-micro", v=100, n_layer=3)
    model = build_tfree_lm("tfree-micro", v=100, max_seq_len=16)
    assert (model.config.d_model, model.config.n_layers, model.config.v) == (64, 2, 100)
    assert build_tfree_lm(model.config, input="token").config.input == "token"


def test_embedding_bag_sums_rows_and_counts_repeats() -> None:
    model = _model()
    bags = [torch.tensor([3, 3, 5]), torch.tensor([7]), torch.tensor([1, 2, 1, 1])]
    flat, offsets = _pack(bags)
    weight = model.embed.weight
    expected = torch.stack([weight[3] * 2 + weight[5], weight[7], weight[1] * 3 + weight[2]])
    torch.testing.assert_close(model.embed(flat, offsets), expected)


def test_head_and_embedding_use_the_pythia_init() -> None:
    model = build_tfree_lm("tfree-tiny", v=4000)
    std = (2 / (5 * 128)) ** 0.5
    for weight in (model.embed.weight, model.head.weight):
        assert weight.std().item() == pytest.approx(std, rel=0.05)
    assert embed_head_params(model) == 2 * 4000 * 128
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_forward_shapes_and_input_checks() -> None:
    model = _model()
    flat, offsets = _bags(2, 5)
    logits = model(indices=flat, offsets=offsets, shape=(2, 5))
    assert logits.shape == (2, 5, V) and logits.dtype == torch.float32
    with pytest.raises(DistilrayError, match="trigram"):
        model(tokens=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(DistilrayError, match="one entry per word"):
        model(indices=flat, offsets=offsets, shape=(2, 4))
    with pytest.raises(DistilrayError, match="context"):
        big_flat, big_offsets = _bags(1, 33)
        model(indices=big_flat, offsets=big_offsets, shape=(1, 33))
    with pytest.raises(DistilrayError, match="positions"):
        model(indices=flat, offsets=offsets, shape=(2, 5), positions=torch.zeros(2, 4, dtype=torch.long))
    token_model = _model("token")
    assert token_model(tokens=torch.zeros(3, 4, dtype=torch.long)).shape == (3, 4, V)
    with pytest.raises(DistilrayError, match="tokens"):
        token_model(indices=flat, offsets=offsets, shape=(2, 5))


def test_causal_attention() -> None:
    model = _model()
    bags = _bag_list(*_bags(1, 6))
    logits = _run(model, bags, (1, 6))
    bags[4] = torch.tensor([0, 1, 2])
    changed = _run(model, bags, (1, 6))
    torch.testing.assert_close(changed[:, :4], logits[:, :4], rtol=0, atol=0)
    assert not torch.allclose(changed[:, 4:], logits[:, 4:])


def test_documents_are_isolated_and_positions_restart() -> None:
    """Doc 2 of a packed row gives the logits it gives alone, whatever doc 1 holds."""
    model = _model()
    doc1, doc2 = _bag_list(*_bags(1, 4, seed=2)), _bag_list(*_bags(1, 3, seed=3))
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])

    def packed(first: list[torch.Tensor]) -> torch.Tensor:
        return _run(model, first + doc2, (1, 7), positions=positions, doc_ids=doc_ids)

    alone = _run(model, doc2, (1, 3))
    torch.testing.assert_close(packed(doc1)[:, 4:], alone, atol=1e-5, rtol=0)
    other = packed([torch.tensor([5, 6]), torch.tensor([7]), torch.tensor([8, 8, 9]), torch.tensor([10])])
    torch.testing.assert_close(other[:, 4:], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(other[:, :4], packed(doc1)[:, :4])
    # Rotary attention is relative, so inside a confined document only the position gaps matter: the reset
    # positions give the same logits as 4..6 would, but the positions are the ones given, not the row index,
    assert not torch.allclose(_run(model, doc2, (1, 3), positions=torch.tensor([[0, 2, 4]])), alone, atol=1e-4)
    # and without doc_ids doc 2 attends to doc 1.
    unconfined = _run(model, doc1 + doc2, (1, 7), positions=positions)
    assert not torch.allclose(unconfined[:, 4:], alone, atol=1e-4)


def test_padding_attends_to_itself_and_stays_finite() -> None:
    model = _model("token")
    tokens = torch.tensor([[4, 9, 2, 0, 0], [7, 7, 1, 3, 5]])
    doc_ids = torch.tensor([[0, 0, 0, -1, -1], [0, 0, 0, 0, 0]])
    logits = model(tokens=tokens, doc_ids=doc_ids)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:1, :3], model(tokens=tokens[:1, :3]), atol=1e-5, rtol=0)
    lone = model(tokens=tokens[:1, 3:4], positions=torch.tensor([[3]]))  # padding sees only itself
    torch.testing.assert_close(logits[:1, 3:4], lone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("input", ["trigram", "token"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_kv_cache_gives_the_full_sequence_logits(input: str, with_docs: bool) -> None:
    model = _model(input, seed=3)
    batch, length, prompt = 2, 9, 4
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [-1, -1, 2, 2, 2, 2, 2, 2, 2]]) if with_docs else None
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3, 4, 5, 6]]) if with_docs else None
    if input == "trigram":
        bags = _bag_list(*_bags(batch, length, seed=4))  # row-major: bags[b * length + t]

        def inputs(start: int, end: int) -> dict:
            flat, offsets = _pack([bags[b * length + t] for b in range(batch) for t in range(start, end)])
            return dict(indices=flat, offsets=offsets, shape=(batch, end - start))
    else:
        tokens = torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(4))

        def inputs(start: int, end: int) -> dict:
            return dict(tokens=tokens[:, start:end])

    def window(tensor: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
        return None if tensor is None else tensor[:, start:end]

    full = model(**inputs(0, length), positions=positions, doc_ids=doc_ids)
    cache = model.new_cache()
    steps = [
        model(
            **inputs(0, prompt), positions=window(positions, 0, prompt), doc_ids=window(doc_ids, 0, prompt), cache=cache
        )
    ]
    for t in range(prompt, length):
        steps.append(
            model(
                **inputs(t, t + 1),
                positions=window(positions, t, t + 1),
                doc_ids=window(doc_ids, t, t + 1),
                cache=cache,
            )
        )
    assert cache.length == length
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_cache_steps_without_doc_ids_continue_the_last_document() -> None:
    model = _model("token", seed=5)
    tokens = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(6))
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 0, 1, 2, 3]])
    full = model(tokens=tokens, positions=positions, doc_ids=doc_ids)
    cache = model.new_cache()
    model(tokens=tokens[:, :3], positions=positions[:, :3], doc_ids=doc_ids[:, :3], cache=cache)
    step = model(tokens=tokens[:, 3:4], positions=positions[:, 3:4], cache=cache)
    torch.testing.assert_close(step, full[:, 3:4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("input", ["trigram", "token"])
def test_tiny_model_overfits_a_batch(input: str) -> None:
    model = _model(input, seed=7).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(8)
    batch, length = 2, 6
    weights = torch.ones(batch, length)
    if input == "trigram":
        flat, offsets = _bags(batch, length + 1, seed=9)  # words 0..S: inputs 0..S-1, targets 1..S
        bags = _bag_list(flat, offsets)
        inputs = [bags[b * (length + 1) + t] for b in range(batch) for t in range(length)]
        targets = _pack([bags[b * (length + 1) + t + 1] for b in range(batch) for t in range(length)], with_end=True)

        def loss() -> torch.Tensor:
            logits = _run(model, inputs, (batch, length))
            return tfree_bce(logits, targets, weights, pos_weight=5.0, loss_scale=1.0)
    else:
        tokens = torch.randint(0, V, (batch, length + 1), generator=generator)

        def loss() -> torch.Tensor:
            logits = model(tokens=tokens[:, :-1])
            return F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))

    before = loss().item()
    for _ in range(30):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    after = loss().item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize(("preset", "billions"), [("tfree-1b", 0.84), ("tfree-3b", 2.77), ("tfree-7b", 6.71)])
def test_gpu_presets_match_the_paper_sizes(preset: str, billions: float) -> None:
    with torch.device("meta"):  # no memory
        model = build_tfree_lm(preset)
    total, embed_head = param_count(model), embed_head_params(model)
    config = model.config
    assert embed_head == 2 * config.v * config.d_model, (preset, total, embed_head)
    assert total / 1e9 == pytest.approx(billions, abs=0.005), (preset, total, embed_head)
    if preset == "tfree-7b":
        assert embed_head == 2 * 32000 * 4096, (total, embed_head)
        assert (config.m, config.k, config.n_heads, config.mlp_factor) == (10, 2, 32, 2.668)
    assert PRESETS[preset]["d_model"] == config.d_model


def test_save_load_round_trip(tmp_path) -> None:
    for input in ("trigram", "token"):
        model = _model(input, seed=11, m=4, k=1, rope_theta=500.0)
        save_tfree_lm(model, tmp_path / input)
        assert json.loads((tmp_path / input / "config.json").read_text())["architecture"] == "tfree_lm"
        loaded = load_tfree_lm(tmp_path / input)
        assert loaded.config == model.config and not loaded.training
        if input == "trigram":
            flat, offsets = _bags(2, 5)
            args = dict(indices=flat, offsets=offsets, shape=(2, 5))
        else:
            args = dict(tokens=torch.randint(0, V, (2, 5)))
        assert torch.equal(loaded(**args), model(**args))


def test_loading_another_folder_names_the_problem(tmp_path) -> None:
    other = tmp_path / "mdlm"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architecture": "mdlm_dit", "vocab_size": 10, "seq_len": 8}))
    with pytest.raises(DistilrayError, match=r"not a T-Free LM.*'mdlm_dit'"):
        load_tfree_lm(other)
    with pytest.raises(DistilrayError, match="no config.json"):
        load_tfree_lm(tmp_path / "missing")
