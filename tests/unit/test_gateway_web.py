"""The gateway's web pages as files and routes: served with a strict Content-Security-Policy, free of inline
code, every asset they name present, and the console's settings for operator keys only."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from alignloop.config import Settings
from alignloop.credentials import Credentials
from services.gateway.app import create_app
from services.gateway.auth import KeyRing
from services.gateway.web import PAGES, WEB_DIR

APP = {"Authorization": "Bearer a-key"}
OPERATOR = {"Authorization": "Bearer o-key"}


@pytest.fixture
def client(tmp_path) -> TestClient:
    app = create_app(Settings(home=tmp_path, mlflow_ui_url="https://mlflow.example/"))
    app.state.keys = KeyRing(Credentials(app_key="a-key", operator_key="o-key"))
    return TestClient(app)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.assets: list[str] = []
        self.inline: list[str] = []
        self.labels: set[str] = set()
        self.ids: set[str] = set()
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        self.inline += [f"{tag} {name}" for name in attrs if name.startswith("on") or name == "style"]
        if tag == "label":
            self.labels.add(attrs.get("for"))
        if tag == "script":
            self._in_script = True
            if "src" not in attrs:
                self.inline.append("script without src")
            else:
                self.assets.append(attrs["src"])
        if tag == "link" and attrs.get("href", "").startswith("/static/"):
            self.assets.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append("script body")


@pytest.mark.parametrize("path", list(PAGES))
def test_pages_are_public_and_served_with_a_strict_policy(client, path):
    resp = client.get(path)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    policy = resp.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert resp.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name", sorted(PAGES.values()))
def test_pages_hold_no_inline_code_and_name_only_present_assets(client, name):
    page = _Page()
    page.feed((WEB_DIR / name).read_text())
    assert not page.inline
    assert page.assets
    for asset in page.assets:
        resp = client.get(asset)
        assert resp.status_code == 200, asset
        assert "script-src 'self'" in resp.headers["content-security-policy"]
    # Every form field the page declares has a label (the accessible name the tests find it by, too).
    fields = re.findall(r'<(?:input|textarea|select)[^>]*\bid="([^"]+)"', (WEB_DIR / name).read_text())
    assert set(fields) <= page.labels


def test_scripts_import_only_files_that_exist():
    scripts = list((WEB_DIR / "static" / "js").glob("*.js"))
    assert scripts
    for script in scripts:
        for target in re.findall(r'from "(\./[^"]+)"|import\("(\./[^"]+)"\)', script.read_text()):
            path = next(t for t in target if t)
            assert (script.parent / path).is_file(), f"{script.name} imports {path}"
        # Nothing outside this gateway: no absolute URLs in what the pages fetch.
        assert not re.search(r"fetch\(\s*[\"'`]https?:", script.read_text()), script.name


def test_console_config_is_for_operator_keys(client):
    assert client.get("/v1/admin/console/config").status_code == 401
    refused = client.get("/v1/admin/console/config", headers=APP)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "operator_key_required"
    config = client.get("/v1/admin/console/config", headers=OPERATOR).json()
    assert config == {"object": "console.config", "policy_model": "alignloop-policy",
                      "mlflow_url": "https://mlflow.example"}


def test_console_links_to_the_tracking_server_by_default(tmp_path):
    app = create_app(Settings(home=tmp_path, mlflow_port=5123))
    app.state.keys = KeyRing(Credentials(app_key="a-key", operator_key="o-key"))
    config = TestClient(app).get("/v1/admin/console/config", headers=OPERATOR).json()
    assert config["mlflow_url"] == "http://127.0.0.1:5123"
