"""The CLI's HTTP client of the gateway's operator routes: the operator key, and errors as one-line messages."""

from __future__ import annotations

from typing import Any, Self
from urllib.parse import quote

import httpx

from alignloop import credentials
from alignloop.config import Settings

PIPELINE_RUNS = "/v1/admin/pipelines/runs"
MODELS = "/v1/admin/models"


class GatewayError(Exception):
    """A call that failed, with a message for people; `status` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 error: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.error = error or {}  # the OpenAI-style error object, as sent


class GatewayClient:
    def __init__(self, base_url: str, operator_key: str, *, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, transport=transport,
                                  headers={"Authorization": f"Bearer {operator_key}"})

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayClient:
        path = settings.credentials_path
        try:
            key = credentials.load(path).operator_key
        except FileNotFoundError:
            raise GatewayError(f"no credentials at {path}: is `alignloop up` running?") from None
        except (ValueError, KeyError) as exc:
            raise GatewayError(f"cannot read the operator key from {path}: {exc!r}") from None
        return cls(settings.gateway_url, key)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded JSON answer; GatewayError for no answer or an error status."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.base_url} ({exc or type(exc).__name__}): "
                               "is `alignloop up` running?") from None
        if response.is_success:
            return response.json()
        raise _error(response)

    # ---- pipeline runs ----------------------------------------------------------------------------------
    def start_run(self, reason: str = "", config: dict | None = None) -> dict:
        body: dict[str, Any] = {"reason": reason}
        if config is not None:
            body["config"] = config
        return self.request("POST", PIPELINE_RUNS, json=body)

    def get_run(self, run_id: str) -> dict:
        return self.request("GET", f"{PIPELINE_RUNS}/{quote(run_id, safe='')}")

    def list_runs(self, limit: int = 20) -> list[dict]:
        return self.request("GET", PIPELINE_RUNS, params={"limit": limit})["data"]

    def cancel_run(self, run_id: str) -> dict:
        return self.request("POST", f"{PIPELINE_RUNS}/{quote(run_id, safe='')}/cancel")

    # ---- model versions ---------------------------------------------------------------------------------
    def model_versions(self, days: int = 30, limit: int = 50) -> dict:
        return self.request("GET", f"{MODELS}/versions", params={"days": days, "limit": limit})

    def set_canary(self, version: str, percent: int, reason: str = "") -> dict:
        return self.request("PUT", f"{MODELS}/canary", json={"version": version, "percent": percent, "reason": reason})

    def clear_canary(self) -> dict:
        return self.request("DELETE", f"{MODELS}/canary")

    # ---- usage -------------------------------------------------------------------------------------------
    def usage(self, days: int = 30) -> dict:
        return self.request("GET", "/v1/admin/usage", params={"days": days})


def _error(response: httpx.Response) -> GatewayError:
    try:
        error = response.json()["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        error, message = {}, response.text[:300] or response.reason_phrase
    param = error.get("param")
    if param and param not in message:
        message = f"{param}: {message}"
    return GatewayError(f"gateway: HTTP {response.status_code}: {message}", response.status_code,
                        error.get("code"), error)
