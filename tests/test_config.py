import pytest

from distilray.config import (
    BenchTrainConfig,
    CDLMGenerateConfig,
    CorpusSpec,
    DistillDrafterConfig,
    OptimConfig,
    ScaleConfig,
    TrainLMConfig,
    cache_key_fields,
    config_from,
    config_hash,
    load_config,
    replace_keys,
)
from distilray.errors import DistilrayError


def test_defaults_and_overrides_are_typed():
    cfg = load_config(TrainLMConfig, None, ["steps=12", "lr=3e-4", "corpus.dataset=tinyshakespeare", "model=tiny"])
    assert cfg.steps == 12 and isinstance(cfg.steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.corpus == CorpusSpec(dataset="tinyshakespeare")
    assert cfg.model == "tiny"
    with pytest.raises(Exception):
        cfg.steps = 3  # frozen


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 50\nbatch_size: 8\ncorpus:\n  dataset: wikitext2\n  val_fraction: 0.1\n")
    cfg = load_config(TrainLMConfig, str(path), ["steps=7"])
    assert (cfg.steps, cfg.batch_size, cfg.corpus.dataset, cfg.corpus.val_fraction) == (7, 8, "wikitext2", 0.1)


def test_tuple_field():
    cfg = load_config(BenchTrainConfig, None, ["worker_counts=[1, 2, 4]"])
    assert cfg.worker_counts == (1, 2, 4)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["stesp=3"], "unknown config key 'stesp'"),
        (["corpus.datset=x"], "unknown config key 'corpus.datset'"),
        (["steps=many"], "'steps' expects an integer"),
        (["lr=fast"], "'optim.lr' expects a number"),
        (["corpus=pydoc"], "is a section"),
        (["steps"], "not of the form key=value"),
    ],
)
def test_bad_keys_and_values_name_the_problem(overrides, words):
    with pytest.raises(DistilrayError, match=words.replace("(", r"\(")):
        load_config(TrainLMConfig, None, overrides)


def test_unknown_key_in_yaml_lists_known_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("modle: tiny\n")
    with pytest.raises(DistilrayError) as e:
        load_config(TrainLMConfig, str(path))
    assert "modle" in str(e.value) and "model" in str(e.value) and "corpus.dataset" in str(e.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(DistilrayError, match="config file not found"):
        load_config(TrainLMConfig, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(DistilrayError, match="not valid YAML"):
        load_config(TrainLMConfig, str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(DistilrayError, match="mapping"):
        load_config(TrainLMConfig, str(listy))


def test_config_hash_ignores_excluded_fields_only():
    a = load_config(TrainLMConfig, None, ["seq_len=64"])
    b = load_config(TrainLMConfig, None, ["seq_len=32"])
    c = load_config(TrainLMConfig, None, ["steps=1"])
    assert config_hash(a, exclude=("seq_len",)) == config_hash(b, exclude=("seq_len",))
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, exclude=("seq_len",)) != config_hash(c, exclude=("seq_len",))


# ------------------------------------------------------------------------------ sections and choices
def test_sections_take_dotted_and_flat_keys_alike():
    dotted = load_config(TrainLMConfig, None, ["optim.lr=3e-4", "scale.num_workers=2", "checkpoint.every=7"])
    flat = load_config(TrainLMConfig, None, ["lr=3e-4", "num_workers=2", "checkpoint_every=7"])
    assert dotted == flat
    assert (flat.optim.lr, flat.scale.num_workers, flat.checkpoint.every) == (3e-4, 2, 7)
    assert config_from(TrainLMConfig, lr=3e-4, num_workers=2, checkpoint_every=7) == flat
    assert replace_keys(TrainLMConfig(), lr=3e-4, **{"scale.num_workers": 2}, keep_checkpoints=2).optim.lr == 3e-4


def test_yaml_sections_nest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n  warmup_steps: 3\nscale:\n  use_gpu: false\n")
    cfg = load_config(TrainLMConfig, str(path))
    assert cfg.optim == OptimConfig(lr=0.01, warmup_steps=3)
    assert cfg.scale.use_gpu == "false"  # YAML's boolean read as the choice it spells


@pytest.mark.parametrize(
    "cls, overrides, words",
    [
        (TrainLMConfig, ["use_gpu=maybe"], "use_gpu must be one of auto, true, false; got 'maybe'"),
        (DistillDrafterConfig, ["loss=kl"], "loss must be one of ce, fkl, rkl, jsd, tvd"),
        (DistillDrafterConfig, ["drafter=ngram"], "distilray fit-ngram"),
        (CDLMGenerateConfig, ["mode=greedy"], "mode must be one of paper, verify, baseline"),
        (TrainLMConfig, ["optim.lr.x=1"], "unknown config key"),
    ],
)
def test_choices_are_checked_and_named(cls, overrides, words):
    with pytest.raises(DistilrayError, match=words):
        load_config(cls, None, overrides)


def test_choices_are_checked_however_the_config_is_built():
    with pytest.raises(DistilrayError, match="data must be one of"):
        DistillDrafterConfig(data="web")
    with pytest.raises(DistilrayError, match="use_gpu must be one of"):
        ScaleConfig(use_gpu="yes")


def test_one_rule_for_the_cache_key():
    base = TrainLMConfig()
    # how a run is spread and checkpointed, and where it writes, never change what it trains
    same = [
        replace_keys(base, num_workers=4, use_gpu="true", cpus_per_worker=3),
        replace_keys(base, every=5, keep=9),
        replace_keys(base, artifacts_dir="/elsewhere", name="x"),
    ]
    assert {config_hash(c) for c in same} == {config_hash(base)}
    # what is trained does
    changed = [replace_keys(base, lr=1e-4), replace_keys(base, steps=1), replace_keys(base, dataset="wikitext2")]
    assert len({config_hash(c) for c in changed} | {config_hash(base)}) == 4
    keyed = cache_key_fields(DistillDrafterConfig())
    assert "scale" not in keyed and "checkpoint" not in keyed and "pseudo_actors" not in keyed and "optim" in keyed


def test_a_section_key_keeps_the_commands_own_section_defaults():
    # distill-drafter's optimizer defaults (lr 2e-3, no weight decay) differ from the section class's
    cfg = load_config(DistillDrafterConfig, None, ["warmup_steps=7"])
    assert (cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.weight_decay) == (7, 2e-3, 0.0)
    assert config_from(DistillDrafterConfig, lr=5e-4).optim.weight_decay == 0.0
