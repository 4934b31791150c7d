"""serve_config.yaml as Serve reads it: valid, and every deployment of every app autoscales."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from distilray.decoding.drafters import is_prompt_lookup

CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


def _deployment_names(import_path: str, drafters: dict[str, str]) -> set[str]:
    """The deployments an app's module defines (a drafter deployment is named per drafter folder)."""
    module = importlib.import_module(import_path.split(":")[0])
    names = {d.name for d in vars(module).values() if isinstance(d, serve.Deployment) and d.name != "DrafterDeployment"}

    return names | {f"Drafter-{name}" for name, spec in drafters.items() if not is_prompt_lookup(spec)}


def test_serve_config_is_valid_and_every_deployment_autoscales():
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    assert config.http_options.host == "127.0.0.1"
    assert {app.name for app in config.applications} == {"cdlm", "speculative", "diffusion", "tfree"}
    for app in config.applications:
        listed = {d.name: d for d in app.deployments}
        defined = _deployment_names(app.import_path, app.args.get("drafters", {}))
        assert set(listed) == defined, app.name
        for name, deployment in listed.items():
            scaling = deployment.autoscaling_config
            assert scaling and 1 <= scaling["min_replicas"] <= scaling["max_replicas"], (app.name, name)
            assert scaling["target_ongoing_requests"] > 0
        assert app.args.get("served_model_name", app.name) == app.name  # ids, not paths
