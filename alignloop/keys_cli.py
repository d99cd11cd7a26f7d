"""`alignloop keys`: add, list, rotate and revoke the gateway's API keys in `ALIGNLOOP_HOME/credentials.json`,
and set a tenant's own rate limits and scheduling priority.
The gateway re-reads the file within a second, so none of these needs a restart."""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone

from rich.console import Console
from rich.table import Table

from alignloop import credentials
from alignloop.config import Settings

console = Console(soft_wrap=True, stderr=True)  # stdout carries only the key (or the JSON), for scripts

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """'90s', '30m', '24h', '7d' or a number of seconds, as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration: use e.g. 0, 90s, 30m, 24h or 7d")
    return float(match[1]) * _UNITS[match[2] or "s"]


def _settings_with_keys() -> Settings:
    settings = Settings()
    settings.ensure_dirs()
    credentials.load_or_create(settings.credentials_path)
    return settings


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def limit(text: str) -> int | None:
    """A per-minute limit: a count (0: none), or 'default' for the gateway's own."""
    if text.strip().lower() == "default":
        return None
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a limit: use a count per minute, 0 for none, "
                                         "or 'default'")
    return int(text)


def priority(text: str) -> int | None:
    """A scheduling priority: an integer, lower served first (negative: ahead of the default), or 'default'."""
    if text.strip().lower() == "default":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a priority: use an integer (lower is served "
                                         "first; 0 is the default) or 'default'") from None


def listing(creds: credentials.Credentials, now: float) -> list[dict]:
    """One row per working key (never the key itself): name, role, tenant, fingerprint, the tenant's own rate
    limits (None: the gateway's default), its scheduling priority, and for a rotated-out key the time it stops
    working."""
    rows = []
    for name in creds.names():
        own = creds.limits.get(creds.tenant(name), credentials.Limits())
        rows.append({"name": name, "role": "operator" if name == credentials.OPERATOR else "application",
                     "tenant": creds.tenant(name), "fingerprint": credentials.key_hash(creds.current(name)),
                     "requests_per_minute": own.requests_per_minute,
                     "tokens_per_minute": own.tokens_per_minute,
                     "priority": creds.priorities.get(creds.tenant(name), 0),
                     "retiring_until": None})
        rows += [{**rows[-1], "fingerprint": credentials.key_hash(r.key), "retiring_until": r.until}
                 for r in creds.retiring_at(now) if r.name == name]
    return rows


def _refusals_exit_2(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A change the credentials refuse (unknown or reserved name) is printed and exits with status 2."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except credentials.CredentialsError as exc:
            console.print(f"[red]✗[/] {exc}")
            return 2
    return run


@_refusals_exit_2
def cmd_keys_add_app(args: argparse.Namespace) -> int:
    settings = _settings_with_keys()
    key = credentials.add_app(settings.credentials_path, args.name)
    console.print(f"application key '{args.name}' (in {settings.credentials_path}):")
    print(key)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    settings = _settings_with_keys()
    rows = listing(credentials.load(settings.credentials_path), time.time())
    if args.json:
        print(json.dumps(rows))
        return 0
    table = Table(title=f"API keys in {settings.credentials_path}")
    for column in ("name", "role", "tenant", "fingerprint", "requests/min", "tokens/min", "priority",
                   "works until"):
        table.add_column(column)
    for row in rows:
        until = "-" if row["retiring_until"] is None else _when(row["retiring_until"])
        table.add_row(row["name"], row["role"], row["tenant"], row["fingerprint"],
                      _limit_text(row["requests_per_minute"]), _limit_text(row["tokens_per_minute"]),
                      str(row["priority"]), until)
    Console(soft_wrap=True).print(table)
    return 0


def _limit_text(value: int | None) -> str:
    return "default" if value is None else "none" if value == 0 else f"{value:,}"


@_refusals_exit_2
def cmd_keys_limit(args: argparse.Namespace) -> int:
    # A flag not given is absent (argparse.SUPPRESS): that limit stays as it is.
    rpm = getattr(args, "requests_per_minute", credentials.KEEP)
    tpm = getattr(args, "tokens_per_minute", credentials.KEEP)
    if rpm == credentials.KEEP and tpm == credentials.KEEP:
        console.print("[red]✗[/] give --requests-per-minute, --tokens-per-minute or both")
        return 2
    settings = _settings_with_keys()
    own = credentials.set_limits(settings.credentials_path, args.name, rpm, tpm)
    console.print(f"[green]✓[/] '{args.name}': {_limit_text(own.requests_per_minute)} requests/min, "
                  f"{_limit_text(own.tokens_per_minute)} tokens/min; the gateway applies them within a second")
    return 0


@_refusals_exit_2
def cmd_keys_priority(args: argparse.Namespace) -> int:
    settings = _settings_with_keys()
    credentials.set_priority(settings.credentials_path, args.name, args.priority)
    value = args.priority or 0
    console.print(f"[green]✓[/] '{args.name}': priority {value} (lower is served first); the gateway applies it "
                  "within a second, and the engine orders by it with ALIGNLOOP_SCHEDULING_POLICY=priority")
    return 0


@_refusals_exit_2
def cmd_keys_rotate(args: argparse.Namespace) -> int:
    settings = _settings_with_keys()
    key = credentials.rotate(settings.credentials_path, args.name, args.grace)
    old = ("stopped working now" if args.grace <= 0
           else f"works until {_when(time.time() + args.grace)}")
    console.print(f"new key for '{args.name}' (in {settings.credentials_path}); the old one {old}:")
    print(key)
    return 0


@_refusals_exit_2
def cmd_keys_revoke(args: argparse.Namespace) -> int:
    settings = _settings_with_keys()
    credentials.revoke(settings.credentials_path, args.name)
    console.print(f"[green]✓[/] '{args.name}' revoked: the gateway refuses its keys within a second; "
                  "what it stored stays")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds `alignloop keys add-app|list|rotate|revoke|limit|priority`."""
    keys = sub.add_parser("keys", help="API keys: add, list, rotate, revoke, rate limits, priorities "
                          "(no restart needed)"
                          ).add_subparsers(dest="keys_command", required=True)
    add_app = keys.add_parser("add-app", help="create an application key (a tenant of its own) and print it")
    add_app.add_argument("name")
    add_app.set_defaults(func=cmd_keys_add_app)
    list_ = keys.add_parser("list", help="the keys by name, role, tenant and fingerprint (never the keys)")
    list_.add_argument("--json", action="store_true", help="the listing as one JSON line")
    list_.set_defaults(func=cmd_keys_list)
    rotate = keys.add_parser("rotate", help="give NAME a new key and print it; the old one works for --grace")
    rotate.add_argument("name", help=f"'{credentials.DEFAULT_APP}' (app_key), '{credentials.OPERATOR}' "
                                     "(operator_key) or an application's name")
    rotate.add_argument("--grace", type=duration_s, default=duration_s("24h"), metavar="DURATION",
                        help="how long the old key keeps working: 0 (stops now, e.g. after a leak), 90s, 30m, "
                             "24h (default), 7d")
    rotate.set_defaults(func=cmd_keys_rotate)
    revoke = keys.add_parser("revoke", help="remove an application and all its keys at once")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_keys_revoke)
    limit_ = keys.add_parser("limit", help="set a tenant's own chat rate limits, in place of the gateway's")
    limit_.add_argument("name", help="a key's name, as `keys list` shows it")
    for flag, short, what in (("--requests-per-minute", "--rpm", "chat requests"),
                              ("--tokens-per-minute", "--tpm", "prompt and completion tokens")):
        limit_.add_argument(flag, short, type=limit, default=argparse.SUPPRESS, metavar="N",
                            help=f"{what} a minute: a count, 0 for no limit, or 'default'")
    limit_.set_defaults(func=cmd_keys_limit)
    priority_ = keys.add_parser("priority", help="set where a tenant's chat requests queue in the engine")
    priority_.add_argument("name", help="a key's name, as `keys list` shows it")
    priority_.add_argument("priority", type=priority, metavar="PRIORITY",
                           help="an integer, lower served first (0: the default, negative: ahead of it), or "
                                "'default'")
    priority_.set_defaults(func=cmd_keys_priority)
