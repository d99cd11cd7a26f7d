"""The `alignloop` command: the local stack (up, status, down), models, feedback, reward, SFT, PPO, pipeline runs and simulated users."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alignloop import components, credentials, keys_cli, models_cli, pipeline_cli, usage_cli
from alignloop import demo as demo_cli
from alignloop.config import Settings, vllm_cpu_environment
from alignloop.simulate import cli as simulate_cli
from alignloop.supervisor import StackError, Supervisor, pid_alive, read_state, stop_groups

console = Console(soft_wrap=True)  # log paths and tails must stay copy-pasteable


def _ensure_policy_registered(settings: Settings) -> None:
    from alignloop.registry import ModelNotRegistered, resolve_alias

    try:
        ref = resolve_alias(settings.tracking_uri, settings.policy_model_name, settings.policy_model_alias)
        console.print(f"[green]✓[/] model    {ref.name}@{settings.policy_model_alias} = version {ref.version}")
    except ModelNotRegistered:
        from pipelines.models_init import init_models

        flag = " --tiny" if settings.bootstrap_model == "tiny" else ""
        console.print(f"no {settings.policy_model_name} registered yet: running `alignloop models init{flag}`")
        init_models(settings, tiny=settings.bootstrap_model == "tiny")


def _ensure_reward_registered(settings: Settings) -> None:
    """The reward service needs a champion RM to start: before any RM is trained, a placeholder (untrained)."""
    from alignloop.registry import ModelNotRegistered, resolve_alias

    try:
        ref = resolve_alias(settings.tracking_uri, settings.reward_model_name, settings.reward_model_alias)
        console.print(f"[green]✓[/] model    {ref.name}@{settings.reward_model_alias} = version {ref.version}")
    except ModelNotRegistered:
        from pipelines.models_init import init_reward_model

        console.print(f"no {settings.reward_model_name} registered yet: registering an untrained placeholder")
        init_reward_model(settings, tiny=settings.bootstrap_model == "tiny", console=console)


def _upgrade_store(settings: Settings) -> None:
    from alignloop import store

    revision = store.upgrade(settings.store)
    console.print(f"[green]✓[/] store    {_redacted(settings.store)} (schema {revision})")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_up(args: argparse.Namespace) -> int:
    settings = Settings()
    settings.ensure_dirs()
    state = read_state(settings)
    if state and pid_alive(state["supervisor_pid"]):
        console.print(f"[red]alignloop is already running from {settings.home} "
                      f"(supervisor pid {state['supervisor_pid']}); `alignloop down` stops it.[/]")
        return 1
    creds_existed = settings.credentials_path.exists()
    credentials.load_or_create(settings.credentials_path)

    sup = Supervisor(settings, console)

    def on_signal(signum, _frame):
        if not sup.stopping.is_set():
            sup.stopping.set()
            console.print(f"\n{signal.Signals(signum).name}: stopping the stack")
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    rc = 0
    try:
        infra = components.infrastructure(settings)
        svcs = components.services(settings)
        sup.check_ports(infra + svcs)
        started = time.monotonic()
        sup.bring_up(infra)
        if settings.embedded_kafka:
            from alignloop.kafka_admin import ensure_topics

            ensure_topics(settings.kafka_bootstrap)
        _ensure_policy_registered(settings)
        _ensure_reward_registered(settings)
        _upgrade_store(settings)
        sup.bring_up(svcs)
        _print_ready(settings, creds_existed, time.monotonic() - started)
        rc = sup.watch()
    except StackError as exc:
        console.print(f"[red]✗ {exc}[/]")
        rc = 1
    except KeyboardInterrupt:
        rc = 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        sup.stop_all(timeout_s=max(20.0, settings.drain_s + 10))  # each service drains first
    return rc


def _print_ready(settings: Settings, creds_existed: bool, seconds: float) -> None:
    creds_note = "reused" if creds_existed else "created (mode 0600)"
    console.print(
        f"\n[bold green]alignloop is up[/] in {seconds:.0f} s\n"
        f"  chat API      {settings.gateway_url}/v1  (OpenAI-compatible, model '{settings.policy_model_name}')\n"
        f"  MLflow        {settings.tracking_uri}\n"
        f"  Kafka         {settings.kafka_bootstrap}\n"
        f"  feedback      {settings.gateway_url}/v1/feedback  (store: {_redacted(settings.store)})\n"
        f"  credentials   {settings.credentials_path} ({creds_note}): app_key for /v1, operator_key for operators\n"
        f"  logs          {settings.logs_dir}/\n\n"
        f"  try: curl {settings.gateway_url}/v1/chat/completions -H \"Authorization: Bearer $(python3 -c "
        f"\"import json;print(json.load(open('{settings.credentials_path}'))['app_key'])\")\" "
        f"-H 'Content-Type: application/json' -d '{{\"model\":\"{settings.policy_model_name}\","
        f"\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'\n\n"
        "Ctrl-C stops everything."
    )


def cmd_status(args: argparse.Namespace) -> int:
    settings = Settings()
    state = read_state(settings)
    if not state or not pid_alive(state["supervisor_pid"]):
        console.print(f"alignloop is not running (home: {settings.home})")
        return 3
    probes = {c.name: c.probe for c in components.infrastructure(settings) + components.services(settings)}
    table = Table(title=f"alignloop (supervisor pid {state['supervisor_pid']}); logs in {settings.logs_dir}/")
    for col in ("component", "pid", "process", "ready", "address", "log"):
        table.add_column(col, overflow="fold")
    healthy = True
    for c in state["components"]:
        alive = pid_alive(c["pid"])
        ready = alive and probes.get(c["name"], lambda: False)()
        healthy &= ready
        table.add_row(c["name"], str(c["pid"]), "[green]running[/]" if alive else "[red]gone[/]",
                      "[green]yes[/]" if ready else "[red]no[/]", c["url"], Path(c["log"]).name)
    console.print(table)
    return 0 if healthy else 1


def cmd_down(args: argparse.Namespace) -> int:
    settings = Settings()
    state = read_state(settings)
    if not state:
        console.print("alignloop is not running")
        return 0
    sup_pid = state["supervisor_pid"]
    if pid_alive(sup_pid):
        os.kill(sup_pid, signal.SIGTERM)
        with console.status("stopping alignloop"):
            deadline = time.monotonic() + args.timeout
            while pid_alive(sup_pid) and time.monotonic() < deadline:
                time.sleep(0.2)
    # Whatever the supervisor did not get to (it was killed, or timed out) goes now.
    stop_groups([c["pid"] for c in state["components"] if pid_alive(c["pid"])], 10)
    (settings.run_dir / "stack.json").unlink(missing_ok=True)
    console.print("alignloop stopped")
    return 0


@contextlib.contextmanager
def _tracking_server(settings: Settings) -> Iterator[None]:
    """With the embedded tracking server not running, starts it for the duration of the block."""
    temporary = None
    if settings.embedded_mlflow and not components.http_ok(f"{settings.tracking_uri}/health"):
        temporary = Supervisor(settings, console)
    try:
        if temporary:
            mlflow = components.mlflow_server(settings)
            temporary.check_ports([mlflow])
            temporary.bring_up([mlflow])
        yield
    finally:
        if temporary:
            temporary.stop_all()


def cmd_models_init(args: argparse.Namespace) -> int:
    from pipelines.models_init import init_models, init_reward_model

    settings = Settings()
    settings.ensure_dirs()
    try:
        with _tracking_server(settings):
            ref = init_models(settings, tiny=args.tiny, force=args.force)
            console.print(f"{ref.name} version {ref.version} is @champion and @reference")
            # The reward service needs a champion too; a placeholder until `alignloop reward train` replaces it.
            init_reward_model(settings, tiny=args.tiny, force=args.force, console=console)
    except StackError as exc:
        console.print(f"[red]✗ {exc}[/]")
        return 1
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from pipelines.feedback_export import StoreNotReady, export_feedback

    settings = Settings()
    settings.ensure_dirs()
    try:
        with contextlib.nullcontext() if args.no_mlflow else _tracking_server(settings):
            # Its progress on stderr: with --json, stdout carries the summary alone.
            result = export_feedback(settings, out=args.out, since=args.since, log_mlflow=not args.no_mlflow,
                                     console=Console(stderr=True, soft_wrap=True))
    except (StackError, StoreNotReady, FileExistsError) as exc:
        console.print(f"[red]✗ {exc}[/]")
        return 1
    c = result.counts
    if args.json:
        import json

        print(json.dumps({"folder": str(result.folder), "hash": result.hash, "counts": c,
                          "mlflow_run_id": result.mlflow_run_id}))
        return 0
    console.print(
        f"[green]✓[/] feedback export {result.hash}\n"
        f"  folder          {result.folder}/\n"
        f"  pairs           {c['pairs']}\n"
        f"  pointwise       {c['pointwise']}\n"
        f"  demonstrations  {c['demonstrations']}\n"
        f"  feedback        {c['feedback']} read, {c['skipped']} skipped (completion not in the store), "
        f"{c['invalid']} invalid\n"
        f"  MLflow run      {result.mlflow_run_id or '- (--no-mlflow)'}"
    )
    return 0


def _snapshot(args: argparse.Namespace, settings: Settings, err: Console, instead: str) -> Path | None:
    """--snapshot, else the newest snapshot (said on stderr), else None after telling the user what to do;
    `instead` names the command's other data flags."""
    from pipelines.snapshots import newest_snapshot

    folder = args.snapshot or newest_snapshot(settings.home)
    if folder is None:
        err.print(f"[red]✗ no snapshot under {settings.home / 'datasets'}: run `alignloop feedback export`, "
                  f"or give --snapshot DIR or {instead}[/]")
    elif not args.snapshot:
        err.print(f"no --snapshot given: using the newest, {folder}")
    return folder


def cmd_reward_train(args: argparse.Namespace) -> int:
    import json

    from transformers.utils import logging as hf_logging

    from pipelines.reward.datasets import load_hh, load_snapshot
    from pipelines.reward.train import Args, BackboneMismatch, run

    settings = Settings()
    settings.ensure_dirs()
    err = Console(stderr=True, soft_wrap=True)  # progress and notes; stdout ends with the JSON summary
    hf_logging.disable_progress_bar()
    if (args.train is None) != (args.eval is None) or (args.train and args.snapshot):
        err.print("[red]✗ give either --snapshot DIR, or both --train and --eval (HH-RLHF files)[/]")
        return 2
    # Unset flags keep Args' defaults (pipelines/reward/train.py), which are documented there, once.
    names = ("backbone", "epochs", "lr", "batch_size", "max_length", "pointwise_weight", "freeze_layers",
             "seed", "eval_fraction", "limit", "eval_limit")
    given = {k: getattr(args, k) for k in names}
    hyper = Args(**{k: v for k, v in given.items() if v is not None})
    if args.train:
        data = load_hh(args.train, args.eval, limit=args.limit, eval_limit=args.eval_limit)
    else:
        folder = _snapshot(args, settings, err, "--train/--eval files")
        if folder is None:
            return 1
        data = load_snapshot(folder, eval_fraction=hyper.eval_fraction, limit=args.limit,
                             eval_limit=args.eval_limit)
    if not data.train_groups and not (data.train_pointwise and hyper.pointwise_weight > 0):
        err.print(f"[red]✗ nothing to train on in {data.source} (no preference pairs"
                  f"{'' if hyper.pointwise_weight > 0 else ', and --pointwise-weight is 0'})[/]")
        return 1
    try:
        # MLflow is needed to register, and to start from a registered RM (--backbone @ALIAS).
        needs_mlflow = not args.no_register or (args.backbone or "").startswith("@")
        with _tracking_server(settings) if needs_mlflow else contextlib.nullcontext():
            summary = run(settings, data, hyper, register=not args.no_register,
                          gate_tolerance=args.gate_tolerance, out=args.out, console=err,
                          promote=not args.no_promote)
    except StackError as exc:
        err.print(f"[red]✗ {exc}[/]")
        return 1
    except BackboneMismatch as exc:
        err.print(f"[red]✗ {exc}[/]")
        return 2
    print(json.dumps(summary))
    return 0


def _dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> list[str]:
    """One --flag per field of dataclass `cls` (defaults and their reasons stay in the dataclass: unset flags
    are None and keep them). Returns the field names."""
    import dataclasses

    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = str(f.type).replace(" | None", "")
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif kind in ("int", "float", "str"):
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[kind],
                                help=f"(default {f.default})")
        else:
            continue
        names.append(f.name)
    return names


def _training_command(args: argparse.Namespace, args_cls, fields: list[str], check=None):
    """What every training command starts with: `args_cls` from the flags given (unset flags keep the
    dataclass defaults), refused by `check` (a ValueError naming the field) before anything slow is imported,
    then settings (state folders made), a stderr console for progress (stdout ends with the JSON summary) and
    transformers' own bars off."""
    hyper = args_cls(**{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    if check is not None:
        check(hyper)
    from transformers.utils import logging as hf_logging

    settings = Settings()
    settings.ensure_dirs()
    hf_logging.disable_progress_bar()
    return settings, Console(stderr=True, soft_wrap=True), hyper


def cmd_ppo_train(args: argparse.Namespace) -> int:
    import json
    import os

    from pipelines.ppo.args import Args, validate

    try:
        # A configuration error costs a second, not the import of torch and a model load.
        settings, err, hyper = _training_command(args, Args, args.ppo_fields, check=validate)
    except ValueError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]✗ {exc}[/]")
        return 2
    from pipelines.ppo.job import Sources, run

    sources = Sources(policy=args.policy, reference=args.reference, reward=args.reward,
                      prompt_file=args.prompt_file, store_prompts=not args.no_store_prompts,
                      ptx_file=args.ptx_file, value_from_reward=args.value_from_reward)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    uses_registry = not args.no_register or any(x.startswith("@") for x in (args.policy, args.reference)) \
        or args.reward == "inprocess"
    try:
        # Under torchrun every rank needs the registry; a tracking server is started only by a single process.
        server = _tracking_server(settings) if uses_registry and not distributed else contextlib.nullcontext()
        with server:
            summary = run(settings, hyper, sources, out=args.out, resume=not args.no_resume,
                          register=not args.no_register, console=err)
    except (StackError, ValueError, FileNotFoundError) as exc:
        err.print(f"[red]✗ {exc}[/]")
        return 2 if isinstance(exc, ValueError) else 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def cmd_ppo_evaluate(args: argparse.Namespace) -> int:
    import json

    from alignloop import progress
    from alignloop.console_progress import stamped
    from alignloop.registry import fetch_version
    from pipelines import promotion
    from pipelines.ppo.evaluate import STAGES, Gates, evaluate
    from pipelines.ppo.job import Sources, load_prompts, open_reward, resolve_policy

    settings = Settings()
    settings.ensure_dirs()
    err = Console(stderr=True, soft_wrap=True)
    name = settings.policy_model_name
    try:
        with _tracking_server(settings):
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
            version = args.candidate or max((int(v.version) for v in
                                             client.search_model_versions(f"name='{name}'")), default=None)
            if version is None:
                raise ValueError(f"{name} has no registered version")
            from alignloop.registry import ModelVersionRef

            candidate_dir = fetch_version(settings.tracking_uri, ModelVersionRef(name, str(version), None, ""),
                                          settings.models_dir)
            champion_dir, champion = resolve_policy(settings, "@champion")
            reference_dir, _ = resolve_policy(settings, "@reference")
            _, held_out = load_prompts(settings, Sources(prompt_file=args.prompt_file,
                                                          store_prompts=not args.no_store_prompts))
            reward, _ = open_reward(settings, args.reward)
            gates = Gates(args.min_win_rate, args.min_reward_gain, None if args.max_kl < 0 else args.max_kl)
            # Each stage as a line in the step's log and as a share of the pipeline runner's progress.
            stages = progress.Stages(**dict.fromkeys(STAGES, 1.0))

            def on_stage(name: str) -> None:
                err.print(stamped(f"ppo evaluate: {name}"), markup=False, highlight=False)
                stages.update(name, 0, None)

            err.print(f"{name} v{version} vs champion v{champion.version} on {min(len(held_out), args.max_prompts)}"
                      f" held-out prompts")
            try:
                result = evaluate(candidate_dir, champion_dir, reference_dir, held_out[:args.max_prompts], reward,
                                  gates, samples_per_prompt=args.samples_per_prompt,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  engine_env=vllm_cpu_environment(settings), on_stage=on_stage)
            finally:
                reward.close()
            for key, value in {"alignloop.eval_win_rate": f"{result.win_rate:.4f}",
                               "alignloop.eval_reward": f"{result.reward_candidate:.4f}",
                               "alignloop.eval_kl": f"{result.kl_candidate:.4f}",
                               "alignloop.eval_against": champion.version,
                               "alignloop.eval_passed": str(result.passed).lower()}.items():
                client.set_model_version_tag(name, str(version), key, value)
            summary = result.as_dict() | {"candidate_version": str(version), "champion_version": champion.version,
                                          "promoted": False}
            if args.promote and result.passed and str(version) != champion.version:
                promotion.promote(settings, name, str(version), reason="ppo evaluate: gates passed")
                summary["promoted"] = True
                err.print(f"[green]{name}@champion -> version {version}[/]")
            elif not result.passed:
                err.print(f"[yellow]gates failed: {'; '.join(result.reasons)}[/]")
    except (StackError, ValueError, LookupError, FileNotFoundError) as exc:
        err.print(f"[red]✗ {exc}[/]")
        return 2
    print(json.dumps(summary))
    return 0 if result.passed else 3


def cmd_models_move(args: argparse.Namespace) -> int:
    """`models promote NAME VERSION` and `models rollback NAME`."""
    from pipelines import promotion

    settings = Settings()
    try:
        with _tracking_server(settings):
            if args.models_command == "promote":
                move = promotion.promote(settings, args.name, args.version, reason=args.reason)
            else:
                move = promotion.rollback(settings, args.name)
    except (StackError, LookupError) as exc:
        console.print(f"[red]✗ {exc}[/]")
        return 1
    console.print(f"{move.name}@champion: {move.previous or '-'} -> {move.current}"
                  + (" (rolled back)" if args.models_command == "rollback" else ""))
    return 0


def cmd_sft_train(args: argparse.Namespace) -> int:
    import json

    from pipelines import demonstrations
    from pipelines.sft.args import Args
    from pipelines.sft.train import run

    settings, err, hyper = _training_command(args, Args, args.sft_fields)
    if args.file:
        conversations, source = demonstrations.from_file(args.file), str(args.file)
    else:
        folder = _snapshot(args, settings, err, "--file PATH")
        if folder is None:
            return 1
        conversations = demonstrations.from_snapshot(folder, min_rating=args.min_rating,
                                                     thumbs_up=args.thumbs_up)
        source = str(folder)
    aliases = tuple(a for a in (args.aliases or "").split(",") if a)
    try:
        needs_mlflow = not args.no_register or args.base.startswith("@")
        with _tracking_server(settings) if needs_mlflow else contextlib.nullcontext():
            summary = run(settings, conversations, hyper, base=args.base, aliases=aliases,
                          register=not args.no_register, out=args.out, source=source, console=err)
    except (StackError, ValueError, FileNotFoundError, LookupError) as exc:
        err.print(f"[red]✗ {exc}[/]")
        return 2 if isinstance(exc, ValueError) else 1
    print(json.dumps(summary))
    return 0


def cmd_store_upgrade(args: argparse.Namespace) -> int:
    settings = Settings()
    settings.ensure_dirs()
    _upgrade_store(settings)
    return 0


def cmd_store_prune(args: argparse.Namespace) -> int:
    import json
    from datetime import UTC, datetime

    from alignloop import store
    from alignloop.store.retention import Policy, prune

    if min(args.retention_days or 0, args.unlabeled_retention_days or 0) < 0:
        console.print("[red]✗[/] a retention period is a number of days, 0 or more")
        return 2
    settings = Settings()
    policy = Policy(settings.store_retention_days if args.retention_days is None else args.retention_days,
                    settings.store_unlabeled_retention_days if args.unlabeled_retention_days is None
                    else args.unlabeled_retention_days)
    if not policy.enabled:
        console.print("[red]✗[/] no retention period: set ALIGNLOOP_STORE_RETENTION_DAYS or "
                      "ALIGNLOOP_STORE_UNLABELED_RETENTION_DAYS, or pass --retention-days / "
                      "--unlabeled-retention-days")
        return 2
    engine = store.connect(settings.store)
    try:
        with console.status("counting" if args.dry_run else "deleting") as status:
            done: dict[str, int] = {}

            def on_batch(kind: str, rows: int) -> None:
                done[kind] = done.get(kind, 0) + rows
                status.update(f"deleting: {', '.join(f'{n:,} {k}' for k, n in done.items())}")

            pruned = prune(engine, policy, datetime.now(UTC), dry_run=args.dry_run, on_batch=on_batch)
    finally:
        engine.dispose()
    verb = "would delete" if args.dry_run else "deleted"
    counts = ", ".join(f"{n:,} {kind.replace('_', ' ')}" for kind, n in pruned.as_dict().items())
    console.print(f"{verb}: {counts}")
    print(json.dumps({"dry_run": args.dry_run, **pruned.as_dict()}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the local stack in the foreground (Ctrl-C stops it)").set_defaults(func=cmd_up)
    sub.add_parser("status", help="show the running stack").set_defaults(func=cmd_status)
    down = sub.add_parser("down", help="stop a stack started by `alignloop up`")
    down.add_argument("--timeout", type=float, default=60.0)
    down.set_defaults(func=cmd_down)
    models = sub.add_parser("models", help="model registry commands").add_subparsers(dest="models_command",
                                                                                    required=True)
    init = models.add_parser("init", help="register the base policy as alignloop-policy v1 (@champion, @reference)")
    init.add_argument("--tiny", action="store_true", help="a tiny random model, for tests (seconds)")
    init.add_argument("--force", action="store_true", help="register a new version even if one exists")
    init.set_defaults(func=cmd_models_init)
    promote = models.add_parser("promote", help="point NAME@champion at VERSION (serving follows)")
    promote.add_argument("name", help="e.g. alignloop-policy or alignloop-reward")
    promote.add_argument("version")
    promote.add_argument("--reason", default="operator")
    promote.set_defaults(func=cmd_models_move)
    rollback = models.add_parser("rollback", help="point NAME@champion back at the previous champion")
    rollback.add_argument("name")
    rollback.set_defaults(func=cmd_models_move)
    models_cli.add_commands(models)
    keys_cli.add_commands(sub)
    usage_cli.add_commands(sub)
    store = sub.add_parser("store", help="feedback store commands").add_subparsers(dest="store_command",
                                                                                  required=True)
    store.add_parser("upgrade", help="apply the store's migrations (ALIGNLOOP_STORE_URL, default SQLite)"
                     ).set_defaults(func=cmd_store_upgrade)
    prune_p = store.add_parser("prune", help="delete what is past the retention period now (the materializer "
                               "also does it every ALIGNLOOP_STORE_PRUNE_INTERVAL_S); the last line is JSON")
    prune_p.add_argument("--retention-days", type=int, metavar="N",
                         help="everything older (default ALIGNLOOP_STORE_RETENTION_DAYS)")
    prune_p.add_argument("--unlabeled-retention-days", type=int, metavar="N",
                         help="completions no feedback is about, older (default "
                              "ALIGNLOOP_STORE_UNLABELED_RETENTION_DAYS)")
    prune_p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    prune_p.set_defaults(func=cmd_store_prune)
    feedback = sub.add_parser("feedback", help="feedback commands").add_subparsers(dest="feedback_command",
                                                                                  required=True)
    export = feedback.add_parser("export", help="snapshot the store as training data (pairs, pointwise "
                                 "labels, demonstrations) in Parquet, logged to MLflow as a dataset")
    export.add_argument("--out", type=Path,
                        help="output folder (default ALIGNLOOP_HOME/datasets/feedback-TS-HASH/)")
    export.add_argument("--no-mlflow", action="store_true",
                        help="write the folder only, log nothing to MLflow")
    export.add_argument("--since", type=date.fromisoformat, metavar="YYYY-MM-DD",
                        help="only feedback created on or after this UTC day")
    export.add_argument("--json", action="store_true", help="print one JSON line (folder, hash, counts)")
    export.set_defaults(func=cmd_feedback_export)
    reward = sub.add_parser("reward", help="reward model commands").add_subparsers(dest="reward_command",
                                                                                  required=True)
    rtrain = reward.add_parser(
        "train", help="train a reward model on a feedback snapshot (default: the newest) or HH-RLHF files, "
        "register it and make it @champion if it is at least as accurate on the held-out pairs",
        description="Hyper-parameters left out take the defaults of Args in pipelines/reward/train.py. "
        "The last line on stdout is a JSON summary.")
    data = rtrain.add_mutually_exclusive_group()
    data.add_argument("--snapshot", type=Path, metavar="DIR", help="an `alignloop feedback export` folder")
    data.add_argument("--train", type=Path, nargs="+", metavar="PATH",
                      help="HH-RLHF-format .jsonl[.gz] files to train on (with --eval)")
    rtrain.add_argument("--eval", type=Path, nargs="+", metavar="PATH", help="HH-RLHF-format held-out files")
    rtrain.add_argument("--backbone", metavar="PATH|@ALIAS",
                        help="a transformers folder, a saved reward model (fine-tune it), or @ALIAS of the "
                             "registered RM (default: all-MiniLM-L6-v2 from its wheel)")
    rtrain.add_argument("--epochs", type=int)
    rtrain.add_argument("--lr", type=float)
    rtrain.add_argument("--batch-size", type=int,
                        help="preference groups (a whole ranking each) per step")
    rtrain.add_argument("--max-length", type=int, help="tokens per answer")
    rtrain.add_argument("--pointwise-weight", type=float,
                        help="weight of the logistic loss on unpaired thumbs and ratings (0: pairs only)")
    rtrain.add_argument("--freeze-layers", type=int, metavar="N",
                        help="keep the embeddings and the first N transformer blocks as pretrained")
    rtrain.add_argument("--eval-fraction", type=float,
                        help="snapshots: share of groups held out")
    rtrain.add_argument("--seed", type=int)
    rtrain.add_argument("--limit", type=int, help="at most N training pairs (whole groups)")
    rtrain.add_argument("--eval-limit", type=int, help="at most N held-out pairs")
    rtrain.add_argument("--gate-tolerance", type=float,
                        help="promote if new accuracy >= champion's - this "
                             "(default ALIGNLOOP_REWARD_GATE_TOLERANCE)")
    rtrain.add_argument("--no-register", action="store_true",
                        help="train and save the folder only: nothing is logged to MLflow, no gate")
    rtrain.add_argument("--no-promote", action="store_true",
                        help="register and judge the new version (gate_passed in the summary), but leave "
                             "@champion where it is (the pipeline runner promotes at the end of a run)")
    rtrain.add_argument("--out", type=Path, help="keep the model folder here (default with --no-register: "
                        "ALIGNLOOP_HOME/runs/reward-TS/)")
    rtrain.set_defaults(func=cmd_reward_train)

    ppo = sub.add_parser("ppo", help="PPO (RLHF step 3) commands").add_subparsers(dest="ppo_command",
                                                                                required=True)
    ptrain = ppo.add_parser(
        "train", help="optimise the policy against the reward model with a KL penalty; register the result",
        description="Hyper-parameters left out take the defaults of Args in pipelines/ppo/train.py. Run it "
        "data-parallel with `torchrun --nproc_per_node=N -m alignloop.cli ppo train ...`. The last line on "
        "stdout is a JSON summary.")
    from pipelines.ppo.args import Args as PPOArgs  # no torch: the dataclass only

    ptrain.set_defaults(func=cmd_ppo_train, ppo_fields=_dataclass_flags(ptrain, PPOArgs))
    ptrain.add_argument("--policy", default="@champion", metavar="@ALIAS|DIR",
                        help="the policy to start from (default @champion)")
    ptrain.add_argument("--reference", default="@reference", metavar="@ALIAS|DIR",
                        help="π_ref of the KL penalty (default @reference, the SFT/base model)")
    ptrain.add_argument("--reward", default="service", metavar="service|inprocess|fn:MODULE:CALLABLE",
                        help="the reward service (default), the champion RM loaded in this process, or a "
                             "Python function")
    ptrain.add_argument("--prompt-file", type=Path, help="JSON lines of {messages} or {prompt}, mixed with "
                        "the prompts users sent")
    ptrain.add_argument("--no-store-prompts", action="store_true",
                        help="do not read prompts from the feedback store (use --prompt-file only)")
    ptrain.add_argument("--ptx-file", type=Path, help="demonstrations for PPO-ptx (with --gamma-ptx)")
    ptrain.add_argument("--value-from-reward", action="store_true",
                        help="initialise the critic from the RM (InstructGPT), when it reads the policy's "
                             "tokens")
    ptrain.add_argument("--out", type=Path, help="checkpoints and the final folder (default "
                        "ALIGNLOOP_HOME/runs/ppo-PROMPTSETHASH/)")
    ptrain.add_argument("--no-resume", action="store_true", help="ignore checkpoints under --out")
    ptrain.add_argument("--no-register", action="store_true", help="log nothing to MLflow, register nothing")
    sft = sub.add_parser("sft", help="supervised fine-tuning (RLHF step 1)").add_subparsers(
        dest="sft_command", required=True)
    strain = sft.add_parser(
        "train", help="fine-tune the policy on demonstrations (users' corrections and top-rated answers from a "
        "feedback snapshot, or a file) and register it as a policy version",
        description="The last line on stdout is a JSON summary.")
    from pipelines.sft.args import Args as SFTArgs

    strain.set_defaults(func=cmd_sft_train, sft_fields=_dataclass_flags(strain, SFTArgs))
    sdata = strain.add_mutually_exclusive_group()
    sdata.add_argument("--snapshot", type=Path, metavar="DIR", help="a feedback export (default: the newest)")
    sdata.add_argument("--file", type=Path, help="JSON lines of {messages} ending with the assistant's answer, "
                       "or {prompt, response}")
    strain.add_argument("--base", default="@champion", metavar="@ALIAS|DIR", help="the policy to fine-tune")
    strain.add_argument("--min-rating", type=int, default=6, help="ratings (1-7) that count as demonstrations")
    strain.add_argument("--thumbs-up", action="store_true", help="thumbs-up answers count as demonstrations")
    strain.add_argument("--aliases", default="", help="comma-separated aliases to move to the new version, "
                        "e.g. champion,reference")
    strain.add_argument("--no-register", action="store_true")
    strain.add_argument("--out", type=Path, help="with --no-register: where the folder goes")
    peval = ppo.add_parser(
        "evaluate", help="a candidate policy vs the champion on held-out prompts (RM reward, win rate, KL to "
        "the reference); with --promote, the candidate becomes @champion if the gates pass",
        description="The last line on stdout is a JSON summary; the exit status is 0 when the gates pass.")
    peval.add_argument("--candidate", default=None, metavar="VERSION",
                       help="the policy version to judge (default: the newest registered version)")
    peval.add_argument("--reward", default="service", metavar="service|inprocess|fn:MODULE:CALLABLE")
    peval.add_argument("--prompt-file", type=Path)
    peval.add_argument("--no-store-prompts", action="store_true")
    peval.add_argument("--max-prompts", type=int, default=64)
    peval.add_argument("--samples-per-prompt", type=int, default=2)
    peval.add_argument("--max-new-tokens", type=int, default=64)
    peval.add_argument("--min-win-rate", type=float, default=0.5)
    peval.add_argument("--min-reward-gain", type=float, default=0.0)
    peval.add_argument("--max-kl", type=float, default=50.0, help="nats per answer (negative: no bound)")
    peval.add_argument("--seed", type=int, default=0)
    peval.add_argument("--promote", action="store_true", help="move @champion to the candidate if it passes")
    peval.set_defaults(func=cmd_ppo_evaluate)
    pipeline_cli.add_parser(sub)
    simulate_cli.add_parser(sub)
    demo_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
