"""`alignloop pipeline ...`: start, watch, list and cancel retraining runs (the gateway's operator routes).

Exit status: 0 done (a run that succeeded, promoted or not), 1 a run that failed or was cancelled, or no
answer from the gateway, 2 bad arguments or a request the gateway refused, 4 a conflict (another run is in
progress, or the run cannot be cancelled), 5 `run --timeout` passed first, 130 Ctrl-C while waiting (after 5
and 130 the run goes on)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from alignloop.config import Settings
from alignloop.console_progress import clock, stamped
from alignloop.gateway_client import GatewayClient, GatewayError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_FAILED, EXIT_REFUSED, EXIT_CONFLICT, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 4, 5, 130
FINISHED = ("succeeded", "failed", "cancelled")
POLL_S = 2.0
GIVE_UP_UNREACHABLE_S = 60.0  # while waiting, a gateway gone this long ends the wait
_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}


def config_arg(text: str) -> dict:
    """--config: a JSON object, or @FILE holding one."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"ppo": {"iterations": 2}}\'')
    return value


def report_failure(exc: GatewayError) -> int:
    err.print(f"[red]✗ {escape(str(exc))}[/]")
    return {409: EXIT_CONFLICT, 400: EXIT_REFUSED}.get(exc.status, EXIT_FAILED)


def operator_client() -> GatewayClient:
    return GatewayClient.from_settings(Settings())


def print_report(args: argparse.Namespace, fetch: Callable[[GatewayClient], dict], view: Callable[[dict], Table]
                 ) -> int:
    """Fetches a report through the operator routes and prints it: as one JSON line with --json, else as
    `view` draws it. A refusal is reported as `report_failure` says."""
    try:
        with operator_client() as client:
            report = fetch(client)
    except GatewayError as exc:
        return report_failure(exc)
    if args.json:
        print(json.dumps(report))
    else:
        out.print(view(report))
    return 0


# ---- rendering ------------------------------------------------------------------------------------------


def parse_time(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def duration(start: str | None, end: str | None, now: datetime | None = None) -> str:
    """'1h02m', '3m05s', '12s'; '-' before it starts; up to now while it runs."""
    began = parse_time(start)
    if began is None:
        return "-"
    return clock(((parse_time(end) or now or datetime.now(UTC)) - began).total_seconds())


def _status(status: str, progress: float = 0.0) -> str:
    shown = f"{status} {progress:.0%}" if status == "running" and 0 < progress < 1 else status
    style = _STYLE.get(status, "dim")
    return f"[{style}]{escape(shown)}[/]"


def _when(iso: str | None) -> str:
    return iso.replace("T", " ")[:19] if iso else "-"


def run_view(run: dict, note: str = "") -> Table:
    """A run's steps (name, status, detail, duration), its outcome below them."""
    table = Table(title=f"pipeline run {escape(run['id'])}: {_status(run['status'])} "
                        f"({escape(run['trigger'])}, created {_when(run['created_at'])} UTC, "
                        f"{duration(run['started_at'], run['finished_at'])})", title_justify="left")
    for col in ("step", "status", "detail", "duration"):
        table.add_column(col, overflow="fold")
    for step in run["steps"]:
        table.add_row(step["name"], _status(step["status"], step["progress"]), escape(step["detail"]),
                      duration(step["started_at"], step["finished_at"]))
    lines = [f"reason: {run['reason']}" if run["reason"] else "",
             f"outcome: {run['outcome']}" if run["outcome"] else "",
             f"error: {run['error']}" if run["error"] else "",
             f"MLflow run: {run['mlflow_run_id']}" if run["mlflow_run_id"] else "", note]
    table.caption = escape("\n".join(line for line in lines if line)) or None
    table.caption_justify = "left"
    return table


def runs_view(runs: list[dict]) -> Table:
    table = Table(title="pipeline runs, newest first", title_justify="left")
    for col in ("id", "status", "trigger", "created (UTC)", "duration", "outcome"):
        table.add_column(col, overflow="fold")
    for run in runs:
        table.add_row(escape(run["id"]), _status(run["status"]), escape(run["trigger"]),
                      _when(run["created_at"]), duration(run["started_at"], run["finished_at"]),
                      escape(run["outcome"] or run["error"] or "-"))
    return table


class StepLog:
    """A run's progress as plain lines, for a log file, where the live table shows nothing until the run is
    over: a line when a step starts, passes another tenth of its work, or ends."""

    def __init__(self) -> None:
        self._shown: dict[str, tuple[str, int]] = {}

    def lines(self, run: dict) -> list[str]:
        out = []
        for step in run["steps"]:
            status = step["status"]
            tenth = int(step["progress"] * 10) if status == "running" and step["progress"] < 1 else 0
            if status == "pending" or self._shown.get(step["name"]) == (status, tenth):
                continue
            self._shown[step["name"]] = (status, tenth)
            text = f"{step['name']} {status}" + (f" {tenth * 10}%" if tenth else "")
            if step["finished_at"]:
                text += f" after {duration(step['started_at'], step['finished_at'])}"
            if step["detail"]:
                text += f": {step['detail']}"
            out.append(stamped(f"{run['id']} {text}"))
        return out


# ---- commands -------------------------------------------------------------------------------------------


def wait_for_run(client: GatewayClient, run: dict, timeout_s: float | None) -> tuple[dict, bool]:
    """Polls the run until it finishes, drawing its steps on stderr (a live table on a terminal; in a log, a
    line per change, then the table); returns it and whether time ran out."""
    step_log = None if err.is_terminal else StepLog()
    try:
        with Live(run_view(run), console=err, auto_refresh=False) as live:
            return _follow(client, run, timeout_s, live, step_log)
    finally:
        if step_log is not None:
            err.line()  # in a file, rich leaves a live display's last drawing without its line end


def _follow(client: GatewayClient, run: dict, timeout_s: float | None, live: Live, step_log: StepLog | None
            ) -> tuple[dict, bool]:
    deadline = time.monotonic() + timeout_s if timeout_s else None
    unreachable_since = None
    while run["status"] not in FINISHED:
        if deadline is not None and time.monotonic() >= deadline:
            return run, True
        time.sleep(POLL_S)
        note = ""
        try:
            run, unreachable_since = client.get_run(run["id"]), None
        except GatewayError as exc:
            if exc.status is not None and exc.status < 500:
                raise
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > GIVE_UP_UNREACHABLE_S:
                raise
            note = f"(retrying) {exc}"
        live.update(run_view(run, note), refresh=True)
        for line in step_log.lines(run) if step_log else ():
            err.print(line, markup=False, highlight=False)
    return run, False


def cmd_pipeline_run(args: argparse.Namespace) -> int:
    wait = args.wait or args.timeout is not None
    try:
        with operator_client() as client:
            run = client.start_run(args.reason, args.config)
            if not wait:
                print(run["id"])
                return 0
            err.print(f"pipeline run {escape(run['id'])} started")
            try:
                run, timed_out = wait_for_run(client, run, args.timeout)
            except KeyboardInterrupt:
                err.print(f"stopped watching; run {escape(run['id'])} goes on (`alignloop pipeline cancel "
                          f"{escape(run['id'])}` stops it)")
                return EXIT_INTERRUPTED
    except GatewayError as exc:
        if exc.code == "pipeline_run_in_progress" and exc.error.get("run_id"):
            active = exc.error["run_id"]
            err.print(f"[red]✗ pipeline run {escape(active)} is already queued or running (one run at a "
                      f"time): `alignloop pipeline status {escape(active)}` shows it, `alignloop pipeline "
                      f"cancel {escape(active)}` stops it[/]")
            return EXIT_CONFLICT
        return report_failure(exc)
    print(json.dumps(run))
    if timed_out:
        err.print(f"[yellow]still {run['status']} after {args.timeout:g} s; the run goes on: "
                  f"`alignloop pipeline status {escape(run['id'])}`[/]")
        return EXIT_TIMEOUT
    return 0 if run["status"] == "succeeded" else EXIT_FAILED


def cmd_pipeline_status(args: argparse.Namespace) -> int:
    try:
        with operator_client() as client:
            runs = [client.get_run(args.run_id)] if args.run_id else client.list_runs(limit=1)
    except GatewayError as exc:
        return report_failure(exc)
    if not runs:
        err.print("no pipeline runs yet: `alignloop pipeline run` starts one")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(runs[0]))
    else:
        out.print(run_view(runs[0]))
    return 0


def cmd_pipeline_list(args: argparse.Namespace) -> int:
    try:
        with operator_client() as client:
            runs = client.list_runs(limit=args.limit)
    except GatewayError as exc:
        return report_failure(exc)
    if args.json:
        print(json.dumps({"object": "list", "data": runs}))
    elif not runs:
        err.print("no pipeline runs yet: `alignloop pipeline run` starts one")
    else:
        out.print(runs_view(runs))
    return 0


def cmd_pipeline_cancel(args: argparse.Namespace) -> int:
    try:
        with operator_client() as client:
            run = client.cancel_run(args.run_id)
    except GatewayError as exc:
        return report_failure(exc)
    out.print(f"pipeline run {escape(run['id'])}: {_status(run['status'])}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`alignloop pipeline {run,status,list,cancel}`."""
    pipeline = sub.add_parser(
        "pipeline", help="retraining runs (snapshot → RM → gate → PPO → gate → promotion) on the pipeline "
        "runner, through the gateway (operator key)").add_subparsers(dest="pipeline_command", required=True)
    run = pipeline.add_parser("run", help="start a run and print its id", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--reason", default="", help="why (kept with the run, at most 500 characters)")
    run.add_argument("--config", type=config_arg, metavar="JSON|@FILE",
                     help="per-run overrides of the runner's step settings, a JSON object")
    run.add_argument("--wait", action="store_true",
                     help="show the steps until the run ends, then print the run as one JSON line")
    run.add_argument("--timeout", type=float, metavar="S",
                     help="stop waiting after S seconds (implies --wait)")
    run.set_defaults(func=cmd_pipeline_run)
    status = pipeline.add_parser("status", help="a run's steps (default: the newest run)")
    status.add_argument("run_id", nargs="?", metavar="RUN_ID")
    status.add_argument("--json", action="store_true", help="the run as one JSON line")
    status.set_defaults(func=cmd_pipeline_status)
    runs = pipeline.add_parser("list", help="recent runs, newest first")
    runs.add_argument("--limit", type=int, default=20, help="1 to 200 (default 20)")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_pipeline_list)
    cancel = pipeline.add_parser("cancel", help="stop a queued or running run (not once it is promoting)")
    cancel.add_argument("run_id", metavar="RUN_ID")
    cancel.set_defaults(func=cmd_pipeline_cancel)
