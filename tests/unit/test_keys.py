"""API key lifecycle: adding, rotating with a grace period, revoking; the tenant's id across rotations; the
gateway's key ring following the file; the `alignloop keys` commands."""

from __future__ import annotations

import argparse
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from alignloop import credentials, keys_cli
from alignloop.cli import build_parser
from alignloop.credentials import DEFAULT_APP, OPERATOR, CredentialsError, key_hash
from services.gateway import metrics
from services.gateway.auth import KeyRing, Role
from services.gateway.errors import ApiError


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "credentials.json"
    credentials.load_or_create(p)
    return p


def refused(ring: KeyRing, key: str) -> bool:
    try:
        ring.authenticate(f"Bearer {key}")
    except ApiError as e:
        assert e.status_code == 401
        return True
    return False


def test_rotation_gives_a_new_key_keeps_the_old_one_for_the_grace_and_the_same_tenant(path: Path):
    old = credentials.add_app(path, "billing")
    new = credentials.rotate(path, "billing", grace_s=3600, now=1000.0)
    creds = credentials.load(path)
    assert new != old and creds.apps["billing"] == new
    assert creds.tenant("billing") == key_hash(old)  # the id its stored answers carry
    assert [(r.name, r.key, r.until) for r in creds.retiring] == [("billing", old, 4600.0)]
    newer = credentials.rotate(path, "billing", grace_s=60, now=2000.0)
    creds = credentials.load(path)
    assert creds.tenant("billing") == key_hash(old)  # the first key's, however many rotations follow
    assert [r.key for r in creds.retiring] == [old, new] and creds.apps["billing"] == newer
    # Expired retiring keys are dropped at the next rotation.
    credentials.rotate(path, "billing", grace_s=60, now=5000.0)
    assert [r.key for r in credentials.load(path).retiring] == [newer]


def test_rotation_with_no_grace_stops_every_earlier_key_of_that_name_only(path: Path):
    credentials.add_app(path, "a")
    credentials.add_app(path, "b")
    credentials.rotate(path, "a", grace_s=3600, now=1000.0)
    credentials.rotate(path, "b", grace_s=3600, now=1000.0)
    credentials.rotate(path, "a", grace_s=0, now=1001.0)
    assert [r.name for r in credentials.load(path).retiring] == ["b"]


def test_the_built_in_keys_rotate_and_the_file_keeps_its_shape(path: Path):
    first = credentials.load(path)
    app = credentials.rotate(path, DEFAULT_APP, grace_s=10)
    op = credentials.rotate(path, OPERATOR, grace_s=10)
    data = json.loads(path.read_text())
    # app_key and operator_key stay the current keys: whatever reads them keeps working.
    assert (data["app_key"], data["operator_key"]) == (app, op) and op.startswith("al-op-")
    assert data["tenants"] == {DEFAULT_APP: key_hash(first.app_key), OPERATOR: key_hash(first.operator_key)}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_revoking_removes_the_application_and_its_retiring_keys(path: Path):
    first = credentials.add_app(path, "gone")
    credentials.rotate(path, "gone", grace_s=3600)
    credentials.revoke(path, "gone")
    creds = credentials.load(path)
    assert "gone" not in creds.apps and "gone" not in creds.tenants and not creds.retiring
    # The same name later is a new tenant, not the revoked one back.
    again = credentials.add_app(path, "gone")
    assert credentials.load(path).tenant("gone") == key_hash(again) != key_hash(first)


@pytest.mark.parametrize("call, message", [
    (lambda p: credentials.add_app(p, DEFAULT_APP), "built-in"),
    (lambda p: credentials.revoke(p, OPERATOR), "rotate operator --grace 0"),
    (lambda p: credentials.revoke(p, "nobody"), "no application named 'nobody'"),
    (lambda p: credentials.rotate(p, "nobody", 10), "no key named 'nobody'"),
])
def test_impossible_changes_are_refused_saying_why(path: Path, call, message):
    before = path.read_text()
    with pytest.raises(CredentialsError, match=message):
        call(path)
    assert path.read_text() == before


def test_concurrent_changes_are_not_lost(path: Path):
    threads = [threading.Thread(target=credentials.add_app, args=(path, f"app-{i}")) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(credentials.load(path).apps) == sorted(f"app-{i}" for i in range(16))


def test_a_file_without_the_rotation_fields_still_loads(tmp_path: Path):
    p = tmp_path / "credentials.json"
    p.write_text(json.dumps({"app_key": "a", "operator_key": "o", "apps": {"x": "k"}}))
    creds = credentials.load(p)
    assert creds.tenant("x") == key_hash("k") and creds.retiring == ()


def test_the_key_ring_honours_the_grace_period_and_keeps_the_tenant(path: Path, monkeypatch):
    old = credentials.add_app(path, "billing")
    ring = KeyRing.from_file(path)
    tenant = ring.authenticate(f"Bearer {old}").key_hash
    now = [1_000_000.0]
    monkeypatch.setattr("services.gateway.auth.time.time", lambda: now[0])
    new = credentials.rotate(path, "billing", grace_s=60, now=now[0])
    ring = KeyRing.from_file(path)
    before = metrics.RETIRING_KEY_REQUESTS.labels("billing")._value.get()
    assert ring.authenticate(f"Bearer {new}").key_hash == tenant
    assert ring.authenticate(f"Bearer {old}").key_hash == tenant
    assert metrics.RETIRING_KEY_REQUESTS.labels("billing")._value.get() == before + 1  # only the old key counts
    now[0] += 61
    assert refused(ring, old) and not refused(ring, new)


def test_the_key_ring_keeps_roles_apart_after_a_rotation(path: Path):
    old_op = credentials.load(path).operator_key
    credentials.rotate(path, OPERATOR, grace_s=60)
    ring = KeyRing.from_file(path)
    assert ring.authenticate(f"Bearer {old_op}").role is Role.OPERATOR
    assert ring.authenticate(f"Bearer {credentials.load(path).app_key}").role is Role.APP


def test_an_application_named_like_a_built_in_key_never_gets_its_role_or_tenant(tmp_path: Path):
    """add-app once took any name; such an entry stays an ordinary application with its own key's tenant."""
    p = tmp_path / "credentials.json"
    p.write_text(json.dumps({"app_key": "a", "operator_key": "o", "apps": {OPERATOR: "x", DEFAULT_APP: "y"}}))
    ring = KeyRing.from_file(p)
    for key in ("x", "y"):
        caller = ring.authenticate(f"Bearer {key}")
        assert caller.role is Role.APP and caller.key_hash == key_hash(key)
    assert ring.authenticate("Bearer o").role is Role.OPERATOR


def test_the_key_ring_follows_the_file_without_a_restart(path: Path, monkeypatch):
    key = credentials.add_app(path, "short-lived")
    clock = [0.0]
    monkeypatch.setattr("services.gateway.auth.time.monotonic", lambda: clock[0])
    ring = KeyRing.from_file(path)
    assert not refused(ring, key)
    credentials.revoke(path, "short-lived")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # a coarse clock's same tick
    assert not refused(ring, key)  # checked at most once a second
    clock[0] += 1.5
    assert refused(ring, key)


def run_cli(func, capsys, **kwargs) -> tuple[int, str, str]:
    code = func(argparse.Namespace(**kwargs))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_keys_commands(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path))
    code, key, _ = run_cli(keys_cli.cmd_keys_add_app, capsys, name="billing")
    assert code == 0 and key.strip().startswith("al-app-")
    code, new, err = run_cli(keys_cli.cmd_keys_rotate, capsys, name="billing", grace=90.0)
    assert code == 0 and new.strip() != key.strip() and "works until" in err
    code, out, _ = run_cli(keys_cli.cmd_keys_list, capsys, json=True)
    rows = json.loads(out)
    assert key.strip() not in out and new.strip() not in out  # fingerprints only
    billing = [r for r in rows if r["name"] == "billing"]
    assert [r["fingerprint"] for r in billing] == [key_hash(new.strip()), key_hash(key.strip())]
    assert {r["tenant"] for r in billing} == {key_hash(key.strip())} and billing[1]["retiring_until"]
    assert {r["name"] for r in rows} == {DEFAULT_APP, OPERATOR, "billing"}
    code, _, err = run_cli(keys_cli.cmd_keys_revoke, capsys, name=OPERATOR)
    assert code == 2 and "--grace 0" in err
    code, _, _ = run_cli(keys_cli.cmd_keys_revoke, capsys, name="billing")
    assert code == 0 and "billing" not in credentials.load(tmp_path / "credentials.json").apps


@pytest.mark.parametrize("text, seconds", [("0", 0), ("90", 90), ("90s", 90), ("30m", 1800), ("24h", 86400),
                                           ("7d", 604800), ("1.5h", 5400)])
def test_durations(text: str, seconds: float):
    assert keys_cli.duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "-5", "1w", "h", "soon"])
def test_bad_durations_are_refused(text: str):
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        keys_cli.duration_s(text)


def test_a_tenants_own_limits_follow_it_through_rotations_and_go_with_it(path: Path):
    key = credentials.add_app(path, "billing")
    assert credentials.set_limits(path, "billing", requests_per_minute=60) == credentials.Limits(60, None)
    # KEEP leaves the other limit as it was; None goes back to the gateway's default.
    assert credentials.set_limits(path, "billing", tokens_per_minute=0) == credentials.Limits(60, 0)
    new = credentials.rotate(path, "billing", grace_s=0)
    ring = KeyRing.from_file(path)
    caller = ring.authenticate(f"Bearer {new}")
    assert caller.name == "billing" and caller.key_hash == key_hash(key)
    assert caller.limits == credentials.Limits(60, 0)
    assert ring.authenticate(f"Bearer {credentials.load(path).app_key}").limits == credentials.Limits()
    assert credentials.set_limits(path, "billing", requests_per_minute=None) == credentials.Limits(None, 0)
    credentials.revoke(path, "billing")
    assert credentials.load(path).limits == {}
    with pytest.raises(CredentialsError, match="no key named 'billing'"):
        credentials.set_limits(path, "billing", requests_per_minute=1)
    with pytest.raises(CredentialsError, match="per minute"):
        credentials.set_limits(path, DEFAULT_APP, requests_per_minute=-1)


def test_setting_every_limit_back_to_the_default_leaves_no_entry(path: Path):
    credentials.set_limits(path, OPERATOR, 10, 1000)
    credentials.set_limits(path, OPERATOR, None, None)
    assert "limits" not in json.loads(path.read_text())


def test_the_limit_command(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path))
    run_cli(keys_cli.cmd_keys_add_app, capsys, name="billing")
    code, _, err = run_cli(keys_cli.cmd_keys_limit, capsys, name="billing", requests_per_minute=600,
                           tokens_per_minute=keys_cli.limit("default"))
    assert code == 0 and "600 requests/min, default tokens/min" in err
    code, out, _ = run_cli(keys_cli.cmd_keys_list, capsys, json=True)
    [row] = [r for r in json.loads(out) if r["name"] == "billing"]
    assert (row["requests_per_minute"], row["tokens_per_minute"]) == (600, None)
    code, _, err = run_cli(keys_cli.cmd_keys_limit, capsys, name="billing")  # neither flag given
    assert code == 2 and "--requests-per-minute" in err
    code, _, err = run_cli(keys_cli.cmd_keys_limit, capsys, name="nobody", requests_per_minute=1)
    assert code == 2 and "no key named 'nobody'" in err
    assert keys_cli.limit("0") == 0 and keys_cli.limit("Default") is None
    with pytest.raises(argparse.ArgumentTypeError, match="not a limit"):
        keys_cli.limit("-3")
    # Through the real parser: an absent flag leaves its limit alone.
    args = build_parser().parse_args(["keys", "limit", "billing", "--tpm", "5000"])
    assert args.func(args) == 0
    creds = credentials.load(tmp_path / "credentials.json")
    assert creds.limits[creds.tenant("billing")] == credentials.Limits(600, 5000)
