"""What the endpoint tests share: an OpenAI completions client on the module's `server`, and the check
of the OpenAI error body every bad request must get."""

from __future__ import annotations

from typing import Callable

import pytest
import requests


class CompletionsClient:
    """POST /v1/completions on one app's base URL."""

    def __init__(self, base: str, timeout_s: float = 120) -> None:
        self.base, self.timeout_s = base, timeout_s

    def post(self, **body) -> requests.Response:
        return requests.post(f"{self.base}/v1/completions", json=body, timeout=self.timeout_s)

    def ok(self, **body) -> dict:
        """The JSON of a request that must succeed."""
        r = self.post(**body)
        assert r.status_code == 200, r.text
        return r.json()


def _assert_error(r: requests.Response, param: str | None = None) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["type"] == "invalid_request_error" and isinstance(err["message"], str) and err["message"]
    assert err["code"] is None
    if param is not None:
        assert err["param"] == param


@pytest.fixture
def client(server: str) -> CompletionsClient:
    """A client of the requesting module's `server` fixture (its base URL)."""
    return CompletionsClient(server)


@pytest.fixture
def assert_error() -> Callable[..., None]:
    """assert_error(response, param=None): a 4xx whose body is exactly the OpenAI error object."""
    return _assert_error
