"""`alignloop simulate`: send simulated chat traffic and feedback to the gateway; print a JSON report.

Exit status: 0 the run went through (the report counts any failures), 1 no request was answered, the gateway
refused the key or the model, or no credentials, 2 bad arguments or prompt file, 130 Ctrl-C (the report so far
is printed first)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from alignloop.console_progress import ProgressBar
from alignloop.simulate import labeler as rules
from alignloop.simulate import prompts as prompt_sets
from alignloop.simulate.traffic import DEFAULT_MIX, PAIRED, parse_mix, simulate

err = Console(stderr=True, soft_wrap=True)  # stdout carries only the JSON report


def mix_arg(text: str) -> dict[str, float]:
    """--mix: KIND=WEIGHT,... (argparse names the option in its error)."""
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`alignloop simulate [...]`."""
    p = sub.add_parser(
        "simulate", help="simulated users: chat through the gateway (application key) and send feedback by "
        "fixed rules; prints a JSON report",
        description=__doc__, epilog=rules.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100, metavar="N", help="chat requests to send (default 100)")
    p.add_argument("--n", type=_positive, default=2, metavar="K",
                   help="answers per request (default 2; comparison and ranking need 2 or more)")
    p.add_argument("--mix", type=mix_arg, default=DEFAULT_MIX, metavar="KIND=W,...",
                   help="feedback kinds drawn per response, weights normalised (default "
                   "thumbs=0.25,rating=0.25,comparison=0.25,ranking=0.25)")
    p.add_argument("--noise", type=_fraction, default=0.25,
                   help="probability of flipping a preference or a thumb, or moving a rating by one "
                   "(default 0.25, as AlpacaFarm)")
    p.add_argument("--concurrency", type=_positive, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--max-tokens", type=_positive, default=64, help="per answer (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="prompt order, feedback kinds, labels, sampling seeds")
    p.add_argument("--prompt-file", type=Path, metavar="F",
                   help='JSON lines of {"prompt": str} or {"messages": [...]} (default: 480 built-in prompts)')
    p.add_argument("--hold-out", type=_fraction, default=0.0, metavar="FRACTION",
                   help="never send the prompts in this held-out share (split by hash, as `alignloop ppo "
                   "evaluate` does), so they stay unseen for evaluation (default 0)")
    p.add_argument("--base-url", metavar="URL", help="the gateway (default: the local stack's)")
    p.add_argument("--model", default="alignloop-policy", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from alignloop import credentials
    from alignloop.config import Settings

    if args.requests < 0:
        err.print("[red]✗ --requests must be >= 0[/]")
        return 2
    if args.n < 2 and any(args.mix[k] > 0 for k in PAIRED):
        err.print("[red]✗ --mix has comparison or ranking, which need --n 2 or more[/]")
        return 2
    try:
        prompts = (prompt_sets.read_prompt_file(args.prompt_file) if args.prompt_file
                   else prompt_sets.generate(args.seed))
    except (OSError, ValueError) as exc:
        err.print(f"[red]✗ --prompt-file: {escape(str(exc))}[/]")
        return 2
    prompts, held_out = prompt_sets.split(prompts, args.hold_out)
    if not prompts:
        err.print(f"[red]✗ all {len(held_out)} prompts are held out[/]")
        return 2
    settings = Settings()
    try:
        app_key = credentials.load(settings.credentials_path).app_key
    except FileNotFoundError:
        err.print(f"[red]✗ no credentials at {settings.credentials_path}: is `alignloop up` running?[/]")
        return 1
    except (ValueError, KeyError) as exc:
        err.print(f"[red]✗ cannot read the app key from {settings.credentials_path}: {exc!r}[/]")
        return 1
    base_url = args.base_url or settings.gateway_url
    err.print(f"simulating {args.requests} requests × {args.n} answers against {base_url} "
              f"({len(prompts)} prompts, {len(held_out)} held out, noise {args.noise:g})")
    with ProgressBar(err, "simulate", args.requests, unit=" requests") as bar:
        report = simulate(
            base_url, app_key, requests=args.requests, n=args.n, mix=args.mix,
            labeler=rules.Labeler(noise=args.noise, seed=args.seed), concurrency=args.concurrency,
            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, model=args.model,
            prompts=prompts, on_progress=lambda done, _total: bar.update(done))
    for message in report.errors:
        err.print(f"[yellow]! {escape(message)}[/]")
    print(json.dumps(report.to_json()), flush=True)
    if report.stopped == "interrupted":
        return 130
    return 1 if report.stopped or (args.requests and not report.responses) else 0
