"""`alignloop usage`: what each tenant used (requests, choices, tokens), through the gateway's operator route."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from alignloop.pipeline_cli import print_report


def usage_view(report: dict) -> Table:
    period = "all time" if report["days"] == 0 else f"last {report['days']} UTC days"
    table = Table(title=f"usage by tenant, most tokens first ({period})", title_justify="left")
    for col in ("name", "tenant", "requests", "choices", "prompt tokens", "of them cached", "completion tokens",
                "total tokens"):
        table.add_column(col, justify="left" if col in ("name", "tenant") else "right")
    for t in report["by_tenant"]:
        table.add_row(escape(t["name"] or "(revoked)"), t["tenant"], f"{t['requests']:,}", f"{t['completions']:,}",
                      f"{t['prompt_tokens']:,}", f"{t['cached_prompt_tokens']:,}", f"{t['completion_tokens']:,}",
                      f"{t['total_tokens']:,}")
    return table


def cmd_usage(args: argparse.Namespace) -> int:
    return print_report(args, lambda client: client.usage(days=args.days), usage_view)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds `alignloop usage`."""
    usage = sub.add_parser("usage", help="requests and tokens per tenant (for chargeback), from the store")
    usage.add_argument("--days", type=int, default=30, help="the period counted, in UTC days (0: all time)")
    usage.add_argument("--json", action="store_true", help="the report as one JSON line, per day too")
    usage.set_defaults(func=cmd_usage)
