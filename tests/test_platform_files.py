"""The platform files at the repository root and in configs/ load, agree with each other and with
pyproject.toml, and say what DESIGN.md promises. Plain YAML and config parsing: no Ray started."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from distilray.commands import config_class
from distilray.config import BenchTrainConfig, QuickstartConfig, TrainLMConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((ROOT / "configs").glob("*.yaml"))
HEADER = re.compile(r"^#\s*distilray\s+(?P<cmd>bench\s+\S+|\S+)\s+--config\s+(?P<path>\S+)\s*$")


def _yaml(name: str) -> Any:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


def _ray_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    pins = re.findall(r'"ray(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.]*)"', text)
    assert len(pins) == 1, f"expected one ray==X pin in pyproject.toml, found {pins}"
    return pins[0]


def _header_command(path: Path) -> tuple[str, str]:
    """(command, config path) from the file's first line, e.g. `# distilray bench train --config X`."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    m = HEADER.match(first)
    assert m, f"{path.name}: first line must be `# distilray <command> --config configs/...`, got {first!r}"
    return m["cmd"], m["path"]


# --------------------------------------------------------------------------------------- configs
def test_configs_folder_has_the_expected_files() -> None:
    names = {p.name for p in CONFIG_FILES}
    assert {
        "train_lm_small.yaml",
        "train_lm_target_cpu.yaml",
        "train_lm_gpt2_cluster.yaml",
        "eval_ppl_wikitext2.yaml",
        "quickstart.yaml",
        "bench_train.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_loads_into_the_class_of_its_header_command(path: Path) -> None:
    command, named_path = _header_command(path)
    cls = config_class(command)  # KeyError: an unknown command
    assert named_path == f"configs/{path.name}", f"{path.name}: header names {named_path}"
    cfg = load_config(cls, str(path))
    assert isinstance(cfg, cls)
    # Every key written in the file is reflected in the config (nothing silently dropped).
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict) and raw
    as_dict = dataclasses.asdict(cfg)
    for key, value in raw.items():
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                assert as_dict[key][sub] == sub_value, f"{path.name}: {key}.{sub}"
        elif isinstance(value, list):
            assert list(as_dict[key]) == value, f"{path.name}: {key}"
        else:
            assert str(as_dict[key]).lower() == str(value).lower(), f"{path.name}: {key}"


def test_config_values_are_the_intended_ones() -> None:
    def load(name: str):
        return load_config(config_class(_header_command(ROOT / "configs" / name)[0]), str(ROOT / "configs" / name))

    small = load("train_lm_small.yaml")
    assert (
        small.model,
        small.corpus.dataset,
        small.seq_len,
        small.batch_size,
        small.steps,
        small.scale.num_workers,
    ) == (
        "mini",
        "tinyshakespeare",
        128,
        16,
        600,
        2,
    )
    target = load("train_lm_target_cpu.yaml")
    assert (target.model, target.corpus.dataset, target.steps, target.seq_len) == ("small", "pydoc", 2000, 256)
    big = load("train_lm_gpt2_cluster.yaml")
    assert (big.model, big.tokenizer, big.corpus.dataset) == ("gpt2", "gpt2", "hf:wikitext:wikitext-103-raw-v1")
    assert (big.seq_len, big.batch_size, big.steps, big.optim.lr, big.optim.warmup_steps) == (
        1024,
        256,
        20000,
        6e-4,
        2000,
    )
    assert (big.scale.num_workers, big.scale.use_gpu, big.checkpoint.every) == (8, "true", 1000)
    assert big.batch_size % big.scale.num_workers == 0  # the global batch splits evenly across workers
    ev = load("eval_ppl_wikitext2.yaml")
    assert ev.model and ev.corpus.dataset == "wikitext2" and ev.split == "test"
    assert 0 < ev.stride <= ev.context_len
    # quickstart.yaml is the QuickstartConfig defaults written out, key for key.
    assert load("quickstart.yaml") == QuickstartConfig()
    written = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    assert set(written) == {f.name for f in dataclasses.fields(QuickstartConfig)}


def test_header_parser_maps_bench_subcommands() -> None:
    assert _header_command(ROOT / "configs" / "bench_train.yaml")[0] == "bench train"
    assert config_class("bench train") is BenchTrainConfig and config_class("train-lm") is TrainLMConfig


# ----------------------------------------------------------------------------------- cluster.yaml
@pytest.fixture(scope="module")
def cluster() -> dict:
    data = _yaml("cluster.yaml")
    assert isinstance(data, dict)
    return data


def test_cluster_basics(cluster: dict) -> None:
    assert cluster["cluster_name"] == "distilray"
    assert cluster["provider"]["type"] == "aws"
    assert cluster["provider"]["region"] == "us-west-2"
    assert cluster["idle_timeout_minutes"] == 10
    assert cluster["upscaling_speed"] == 1.0
    assert cluster["max_workers"] == 24
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert set(workers) == {"cpu_data_worker", "gpu_worker", "gpu_spot_worker", "datastore_worker"}
    for name, t in workers.items():
        assert t["min_workers"] == 0, name
        assert 0 < t["max_workers"] <= cluster["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]


def test_cluster_images_match_the_ray_pin(cluster: dict) -> None:
    pin = _ray_pin()
    images = [cluster["docker"]["head_image"], cluster["docker"]["worker_image"]]
    images += [t["docker"]["worker_image"] for t in cluster["available_node_types"].values() if "docker" in t]
    assert len(images) >= 3
    for image in images:
        repo, _, tag = image.partition(":")
        assert repo == "rayproject/ray", image
        assert tag.split("-")[0] == pin, f"{image} is not Ray {pin} (pyproject.toml)"
    assert cluster["docker"]["head_image"].endswith("-cpu")
    assert cluster["docker"]["worker_image"].endswith("-cpu")


def test_cluster_node_types_have_the_right_resources(cluster: dict) -> None:
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    assert "docker" not in head  # the CPU head image
    gpu_types = [name for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "no worker type offers a GPU"
    for name in gpu_types:
        t = types[name]
        assert t["docker"]["worker_image"].endswith("-gpu"), name
        assert any("[gpu]" in cmd for cmd in t["worker_setup_commands"]), f"{name} lacks the gpu extra"
        # node-type commands replace the global ones, so the base install must be there too
        assert any(re.search(r"pip install .*-e \S*distilray\"?$", cmd) for cmd in t["worker_setup_commands"]), name
    for name, t in types.items():
        if name not in gpu_types:
            assert "docker" not in t or t["docker"]["worker_image"].endswith("-cpu"), name
    assert any(t.get("resources", {}).get("datastore", 0) >= 1 for t in types.values()), "no datastore resource"
    assert types["datastore_worker"]["resources"]["datastore"] == 4
    assert types["datastore_worker"]["node_config"]["InstanceType"].startswith("r5.")
    spot = [
        n for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]
    assert spot == ["gpu_spot_worker"]
    assert types["gpu_spot_worker"]["resources"].get("GPU", 0) >= 1


def test_cluster_installs_the_synced_repo(cluster: dict) -> None:
    mounts = cluster["file_mounts"]
    assert mounts.get("~/distilray") == "."
    assert any("pip install" in cmd and "distilray" in cmd for cmd in cluster["setup_commands"])
    assert not any("[gpu]" in cmd for cmd in cluster["setup_commands"])  # GPU extra on GPU nodes only
    for excluded in (".venv", "artifacts", ".git"):
        assert excluded in cluster["rsync_exclude"]


def test_cluster_dashboard_listens_on_loopback_only(cluster: dict) -> None:
    """The dashboard's job API runs code: reachable only through `ray dashboard cluster.yaml`'s tunnel."""
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text(encoding="utf-8")


def test_cluster_matches_rays_autoscaler_schema(cluster: dict) -> None:
    """Validated against the schema file shipped with the installed Ray (read as JSON, Ray not imported)."""
    import jsonschema  # comes with ray[default]

    spec = importlib.util.find_spec("ray")
    schema_path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------ runtime_env.yaml
def test_runtime_env() -> None:
    env = _yaml("runtime_env.yaml")
    assert isinstance(env, dict)
    assert "pip" not in env and "conda" not in env and "uv" not in env
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert env["env_vars"]["DISTILRAY_DATA_DIR"] == "/home/ray/data"
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray requires string values
    assert "PYTHONPATH" not in env["env_vars"]
    for excluded in (".venv", "artifacts", "runs", "results", ".git", "__pycache__"):
        assert excluded in env["excludes"]


# ----------------------------------------------------------------------------- serve_config.yaml
def test_serve_config() -> None:
    serve = _yaml("serve_config.yaml")
    assert isinstance(serve, dict)
    assert serve["http_options"] == {"host": "127.0.0.1", "port": 8000}
    assert serve["proxy_location"] == "EveryNode"
    apps = {a["name"]: a for a in serve["applications"]}
    assert apps["cdlm"]["import_path"] == "distilray.serve_apps.retrieval:app"
    from distilray.serve_apps.retrieval import RetrievalAppArgs

    RetrievalAppArgs(**apps["cdlm"]["args"])  # every arg is one the app accepts
    spec = apps["speculative"]
    assert spec["import_path"] == "distilray.serve_apps.speculative:app" and spec["route_prefix"] == "/speculative"
    from distilray.serve_apps.speculative import parse_args

    args = parse_args(spec["args"])  # every arg is one the app accepts, and the values pass its checks
    assert args.default_drafter in args.drafters and set(args.drafters) == {"ngram3", "transformer", "lookup"}
    diffusion = apps["diffusion"]
    assert diffusion["import_path"] == "distilray.serve_apps.diffusion:app"
    from distilray.serve_apps.diffusion import parse_args as parse_diffusion_args

    assert parse_diffusion_args(diffusion["args"]).model == "artifacts/quickstart/sdtt/student"  # the quickstart's
    tfree = apps["tfree"]
    assert tfree["import_path"] == "distilray.serve_apps.tfree:app" and tfree["route_prefix"] == "/tfree"
    from distilray.serve_apps.tfree import parse_args as parse_tfree_args

    assert parse_tfree_args(tfree["args"]).model == "artifacts/quickstart/tfree/model"  # the quickstart's
    assert len({a["route_prefix"] for a in apps.values()}) == len(apps)  # one prefix per application
