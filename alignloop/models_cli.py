"""`alignloop models versions` and `alignloop models canary`: versions side by side and the champion/challenger
traffic split, through the gateway's operator routes (so they take the pipeline runner's registry lock)."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from alignloop.gateway_client import GatewayError
from alignloop.pipeline_cli import err, operator_client, out, print_report, report_failure


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def versions_view(listing: dict) -> Table:
    period = "all time" if listing["days"] == 0 else f"last {listing['days']} days"
    table = Table(title=f"{listing['model']} versions, newest first ({period})", title_justify="left")
    for col in ("version", "aliases", "traffic", "responses", "feedback", "thumbs up", "mean rating"):
        table.add_column(col, justify="left" if col == "aliases" else "right", no_wrap=col == "aliases")
    for v in listing["data"]:
        fb = v["feedback"]
        table.add_row(escape(v["version"]), escape(", ".join(v["aliases"]) or "-"), f"{v['traffic_percent']}%",
                      str(v["responses"]), str(fb["total"]), _rate(fb["thumbs_up_rate"]),
                      "-" if fb["rating_mean"] is None else f"{fb['rating_mean']:.2f}")
    canary = listing["canary"]
    if canary["version"]:
        table.caption = (f"canary: v{canary['version']} at {canary['percent']}%"
                         + ("" if canary["serving"] else " (its policy service is not serving it yet)"))
    return table


def cmd_models_versions(args: argparse.Namespace) -> int:
    return print_report(args, lambda client: client.model_versions(days=args.days, limit=args.limit),
                        versions_view)


def cmd_models_canary(args: argparse.Namespace) -> int:
    if args.clear == (args.version is not None):
        err.print("[red]✗ give a VERSION (with --percent) or --clear[/]")
        return 2
    try:
        with operator_client() as client:
            aliases = client.clear_canary() if args.clear else client.set_canary(args.version, args.percent,
                                                                                 args.reason)
    except GatewayError as exc:
        return report_failure(exc)
    if aliases["challenger"]:
        out.print(f"{aliases['model']}: champion v{aliases['champion']}, challenger v{aliases['challenger']} "
                  f"gets {aliases['canary_percent']}% of chat traffic")
    else:
        out.print(f"{aliases['model']}: no canary; champion v{aliases['champion']} answers everything")
    return 0


def add_commands(models: argparse._SubParsersAction) -> None:
    """Adds `versions` and `canary` to `alignloop models`."""
    versions = models.add_parser("versions", help="policy versions side by side: aliases, traffic share, answers "
                                                  "served, feedback and thumbs-up rate (operator key)")
    versions.add_argument("--days", type=int, default=30, help="the period counted, in UTC days (0: all time)")
    versions.add_argument("--limit", type=int, default=50, help="newest versions shown (1 to 500)")
    versions.add_argument("--json", action="store_true", help="the listing as one JSON line")
    versions.set_defaults(func=cmd_models_versions)
    canary = models.add_parser("canary", help="send a share of chat traffic to a challenger policy version, or end "
                                              "the canary (--clear)")
    canary.add_argument("version", nargs="?", metavar="VERSION")
    canary.add_argument("--percent", type=int, default=10, help="the challenger's share, 0 to 100 (default 10)")
    canary.add_argument("--reason", default="")
    canary.add_argument("--clear", action="store_true", help="end the canary: the champion answers everything")
    canary.set_defaults(func=cmd_models_canary)
