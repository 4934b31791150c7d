"""train-tfree on the session's local Ray: a T-Free run on two workers interrupted and resumed, the BPE
baseline of the same backbone, the model folder generation reads, and the errors users meet first."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distilray.config import TrainTFreeConfig, config_from
from distilray.errors import DistilrayError
from distilray.models.tfree_lm import load_tfree_lm
from distilray.pipelines import train_tfree
from distilray.ray_train.hooks import WorkerInfo
from distilray.tfree.dictionary import load_dictionary
from distilray.tfree.wordsplit import SPECIAL_WORDS

pytestmark = pytest.mark.ray

TINY = dict(
    dataset="pydoc",
    model="tfree-micro",
    seq_len=32,
    batch_size=4,
    steps=6,
    warmup_steps=1,
    dictionary_words=600,
    eval_words=300,
    checkpoint_every=3,
    report_every=1,
    use_gpu="false",
    cpus_per_worker=1,
)


def _train(out: Path, **over) -> dict:
    return train_tfree.run(config_from(TrainTFreeConfig, **{**TINY, "artifacts_dir": str(out), **over}))


@pytest.fixture(scope="module")
def tfree_run(ray_session, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("tfree"), num_workers=2)


def test_trigram_run_on_two_workers_resumes_where_an_uninterrupted_run_ends(tfree_run, tmp_path, monkeypatch):
    assert tfree_run["final_loss"] < tfree_run["first_loss"] and math.isfinite(tfree_run["word_ppl"])
    assert 0.0 <= tfree_run["next_word_acc"] <= 1.0
    monkeypatch.setenv("DISTILRAY_FAIL_AT_STEP", "4")
    resumed = _train(tmp_path, num_workers=2)
    assert (Path(resumed["run_dir"]) / "injected_failure").exists()
    want = load_file(f"{tfree_run['model_dir']}/model.safetensors")
    got = load_file(f"{resumed['model_dir']}/model.safetensors")
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)


def test_model_folder_holds_the_weights_and_its_dictionary(tfree_run):
    model = load_tfree_lm(tfree_run["model_dir"])
    assert model.config.input == "trigram" and (model.config.v, model.config.m, model.config.k) == (4096, 8, 2)
    dictionary = load_dictionary(Path(tfree_run["model_dir"]) / train_tfree.DICTIONARY)
    assert all(w in dictionary for w in SPECIAL_WORDS) and len(dictionary) <= 600
    assert tfree_run["embed_head_params"] == 2 * 4096 * model.config.d_model


def test_batches_are_packed_documents_with_index_list_targets(tfree_run, tmp_path):
    cfg = config_from(TrainTFreeConfig, **{**TINY, "artifacts_dir": str(tmp_path)})
    data = Path(tfree_run["data_dir"])
    folders = {"data": data, "dictionary": train_tfree.dictionary_dir(cfg, data)}
    hooks = train_tfree.TFreeHooks(cfg, WorkerInfo(0, 1, torch.device("cpu"), tmp_path), {}, folders)
    batch = hooks.batch(0)
    assert batch["weights"].shape == (4, 32) and len(batch["target_offsets"]) == 4 * 32 + 1
    assert torch.equal(hooks.batch(0)["indices"], batch["indices"])  # a pure function of the step
    assert (batch["positions"][:, 0] == 0).all()  # each sample starts a document
    model = hooks.build()
    loss = hooks.loss(model, batch, 0)
    loss.backward()
    assert loss.item() > 0 and model.head.weight.grad.abs().sum() > 0


def test_bpe_baseline_trains_the_same_backbone(ray_session, tmp_path):
    res = _train(tmp_path, input="token", bpe_vocab_size=512)
    model = load_tfree_lm(res["model_dir"])
    assert model.config.input == "token" and res["final_loss"] < res["first_loss"]
    assert res["embed_head_params"] == 2 * model.config.v * model.config.d_model
    assert 0.0 <= res["next_word_acc"] <= 1.0 and np.isfinite(res["word_ppl"])


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(DistilrayError, match="m"):
        train_tfree.run(config_from(TrainTFreeConfig, **{**TINY, "v": 8, "m": 10, "artifacts_dir": str(tmp_path)}))
    with pytest.raises(DistilrayError):
        train_tfree.run(
            config_from(TrainTFreeConfig, **{**TINY, "model": str(tmp_path), "artifacts_dir": str(tmp_path)})
        )


def test_instruction_tuning_learns_only_the_answers(tfree_run, tmp_path):
    import json

    qa = tmp_path / "qa.jsonl"
    records = [{"question": f"What is item {i}?", "answer": f"Item {i} is a thing of note."} for i in range(40)]
    qa.write_text("\n".join(json.dumps(r) for r in records))
    over = dict(dataset=str(qa), instruction=True, model=tfree_run["model_dir"], steps=2, batch_size=2, warmup_steps=1)
    cfg = config_from(TrainTFreeConfig, **{**TINY, **over, "artifacts_dir": str(tmp_path)})
    res = train_tfree.run(cfg)
    tuned = load_dictionary(Path(res["model_dir"]) / train_tfree.DICTIONARY)
    assert tuned.words == load_dictionary(Path(tfree_run["model_dir"]) / train_tfree.DICTIONARY).words
    folders = {"data": Path(res["data_dir"]), "dictionary": Path(tfree_run["model_dir"]) / train_tfree.DICTIONARY}
    hooks = train_tfree.TFreeHooks(cfg, WorkerInfo(0, 1, torch.device("cpu"), tmp_path), {}, folders)
    sample = train_tfree.pack_instruction(hooks.store[0], 32)
    learned = [t for t, w in zip(sample.targets, sample.loss_weights) if w > 0]
    assert learned and "question" not in learned and "Item" in learned  # the answer's words, not the question's
    with pytest.raises(DistilrayError, match="model=DIR"):
        train_tfree.run(config_from(TrainTFreeConfig, **{**TINY, **over, "model": "tfree-micro"}))
