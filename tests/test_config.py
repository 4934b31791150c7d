import pytest

from distilray.config import BenchTrainConfig, CorpusSpec, TrainLMConfig, config_hash, load_config
from distilray.errors import DistilrayError


def test_defaults_and_overrides_are_typed():
    cfg = load_config(TrainLMConfig, None, ["steps=12", "lr=3e-4", "corpus.dataset=tinyshakespeare", "model=tiny"])
    assert cfg.steps == 12 and isinstance(cfg.steps, int)
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)
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
        (["lr=fast"], "'lr' expects a number"),
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
    a = load_config(TrainLMConfig, None, ["artifacts_dir=/x"])
    b = load_config(TrainLMConfig, None, ["artifacts_dir=/y"])
    c = load_config(TrainLMConfig, None, ["steps=1"])
    assert config_hash(a, exclude=("artifacts_dir",)) == config_hash(b, exclude=("artifacts_dir",))
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, exclude=("artifacts_dir",)) != config_hash(c, exclude=("artifacts_dir",))
