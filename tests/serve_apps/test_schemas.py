"""Request and argument validation of the Serve apps, without Ray: what the types accept, and the 400
body (OpenAI error shape, `param` naming the field) for what they refuse."""

from __future__ import annotations

import json

import pytest

from distilray.decoding.retrieval import RetrievalParams
from distilray.decoding.sampling import SamplingParams
from distilray.decoding.speculative import MAX_GAMMA, SpeculativeParams
from distilray.errors import DistilrayError
from distilray.serve_apps.openai_api import parse_app_args, validate_request
from distilray.serve_apps.schemas import (
    RetrievalAppArgs,
    RetrievalRequest,
    SpeculativeAppArgs,
    SpeculativeRequest,
)

SPEC_ARGS = SpeculativeAppArgs(target="t", drafters={"ngram3": "x"}, max_tokens_limit=120, default_gamma=3)
CDLM_ARGS = RetrievalAppArgs(model="m", datastore="d", default_mode="verify", similarity_threshold=0.7)


def _error(model, body: dict, args) -> tuple[int, dict]:
    response = validate_request(model, body, args)
    assert not isinstance(response, model), f"{body} was accepted"
    return response.status_code, json.loads(response.body)["error"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", -1),
        ("max_tokens", 121),
        ("max_tokens", "many"),
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("n", 2),
        ("stream", "sometimes"),
        ("gamma", 0),
        ("gamma", MAX_GAMMA + 1),
        ("drafter", "medusa"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", ["a", ""]),
        ("prompt", ""),
        ("prompt", 123),
    ],
)
def test_speculative_request_out_of_range_is_a_400_naming_the_field(field, value):
    status, error = _error(SpeculativeRequest, {"prompt": "hi", field: value}, SPEC_ARGS)
    assert status == 400 and error["param"] == field and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{field}: ") and error["code"] is None
    if field == "max_tokens" and value == 121:
        assert "120" in error["message"]


@pytest.mark.parametrize(
    "field, value",
    [("mode", "beam"), ("similarity_threshold", 1.5), ("similarity_threshold", -1.01), ("max_tokens", 513)],
)
def test_retrieval_request_out_of_range_is_a_400_naming_the_field(field, value):
    status, error = _error(RetrievalRequest, {"prompt": "hi", field: value}, CDLM_ARGS)
    assert status == 400 and error["param"] == field and error["message"].startswith(f"{field}: ")
    if field == "mode":
        assert "beam" in error["message"]


def test_first_bad_field_is_named_and_missing_prompt():
    _, error = _error(SpeculativeRequest, {"max_tokens": 5}, SPEC_ARGS)
    assert error["param"] == "prompt" and "required" in error["message"]
    _, error = _error(SpeculativeRequest, {"prompt": "", "gamma": 0}, SPEC_ARGS)
    assert error["param"] == "prompt"  # fields are checked in order


def test_valid_requests_become_decoder_parameters():
    req = validate_request(
        SpeculativeRequest,
        {"prompt": "hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": "\n", "adaptive_gamma": True},
        SPEC_ARGS,
    )
    assert req.stop == ["\n"] and req.drafter_name(SPEC_ARGS) == "ngram3"
    assert req.sampling(seed=11) == SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=11)
    assert req.method(SPEC_ARGS) == SpeculativeParams(gamma=3, adaptive_gamma=True, gamma_max=8)
    req = validate_request(SpeculativeRequest, {"prompt": "hi", "seed": 5, "drafter": "none", "gamma": 12}, SPEC_ARGS)
    assert req.sampling(seed=11).seed == 5 and req.drafter_name(SPEC_ARGS) == "none"
    assert req.method(SPEC_ARGS).gamma_max == 12  # adaptive gamma may reach the request's own gamma
    req = validate_request(RetrievalRequest, {"prompt": "hi"}, CDLM_ARGS)
    assert req.sampling(seed=0).max_new_tokens == 50 and req.method(CDLM_ARGS) == RetrievalParams("verify", 0.7)
    req = validate_request(RetrievalRequest, {"prompt": "hi", "mode": "paper", "similarity_threshold": -1}, CDLM_ARGS)
    assert req.method(CDLM_ARGS) == RetrievalParams("paper", -1.0)


def test_app_arguments_are_checked_by_their_types():
    def parse(model, raw: dict):
        return parse_app_args(model, raw, {}, "test")

    for raw, match in [
        ({"target": "t", "default_gamma": 0}, "default_gamma"),
        ({"target": "t", "max_sessions": 0}, "max_sessions"),
        ({"target": "t", "num_cpus": -1}, "num_cpus"),
        ({"target": "t", "drafter_transport": "carrier-pigeon"}, "drafter_transport"),
        ({"target": "t", "drafters": {"a b": "x"}}, "drafter name"),
        ({"target": "t", "drafters": {"a": "x"}, "default_drafter": "b"}, "default_drafter"),
    ]:
        with pytest.raises(DistilrayError, match=match):
            parse(SpeculativeAppArgs, raw)
    for raw, match in [
        ({"model": "m", "datastore": "d", "default_mode": "fast"}, "default_mode"),
        ({"model": "m", "datastore": "d", "similarity_threshold": 2}, "similarity_threshold"),
        ({"model": "m", "datastore": "d", "max_tokens_limit": 0}, "max_tokens_limit"),
    ]:
        with pytest.raises(DistilrayError, match=match):
            parse(RetrievalAppArgs, raw)
    assert parse(SpeculativeAppArgs, {"target": "t", "drafters": '{"a": "x"}'}).default_drafter == "a"
    for model in (SpeculativeAppArgs, RetrievalAppArgs):  # every app argument is documented
        assert all(f.description for f in model.model_fields.values()), model
