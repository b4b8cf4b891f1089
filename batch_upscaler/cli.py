"""The command line: parses flags, merges configuration once, dispatches, and maps errors to exit codes.

This is the only place that reads the environment (``BATCH_UPSCALER_CONFIG``, and the AWS set-up
people already have: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's region,
``AWS_ENDPOINT_URL[_BEDROCK_RUNTIME]``) or decides which config file applies; everything below
receives a frozen JobSettings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from tqdm.contrib.logging import logging_redirect_tqdm

from batch_upscaler import __version__
from batch_upscaler.catalogue import ModelName
from batch_upscaler.checkpoint import Checkpoint
from batch_upscaler.errors import ExitCode, Interrupted, UpscalerError, UsageError
from batch_upscaler.logformat import JsonFormatter, text_formatter
from batch_upscaler.manifest import (
    AwsEnvironment,
    Layers,
    build_settings,
    configured_profile,
    default_layers,
    manifest_layers,
    parse_duration,
)
from batch_upscaler.settings import Backend, JobSettings, RunOptions
from batch_upscaler.signals import StopSignals

log = logging.getLogger("batch_upscaler")
DEFAULT_CONFIG = Path("config/batch-upscaler.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch-upscaler", description="Upscale image collections with "
                                     "Stability AI models on Amazon Bedrock, resumably.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub.add_parser("run", help="run (or resume) the job a manifest describes"))
    plan = sub.add_parser("plan", help="what a run would do now: counts, requests, cost and time (sends nothing)")
    _job_args(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--retry-failed", action="store_true", help="plan as if run with --retry-failed")
    _add_max_images(plan, "plan at most N images")
    report = sub.add_parser("report", help="rewrite the report from the checkpoint")
    _job_args(report)
    report.add_argument("--merge", action="store_true",
                        help="one report over every shard's report (exit 0 all done, 1 failures, 75 shards "
                             "missing or unfinished)")
    _job_args(sub.add_parser("status", help="counts per state from the checkpoint"))
    _add_doctor(sub.add_parser("doctor", help="check the AWS set-up: credentials, region, inference profile, "
                               "model access (sends no upscale request, pays nothing)"))
    # Listed for --help only: main() hands "emulator ..." to the emulator's own command line.
    sub.add_parser("emulator", help="run the Bedrock-compatible emulator alone "
                                    "(batch-upscaler emulator --help for its options)")
    return parser


def _add_run(run: argparse.ArgumentParser) -> None:
    _job_args(run)
    run.add_argument("--retry-failed", action="store_true", help="make failed items pending again first")
    run.add_argument("--only", type=Path, metavar="FILE-LIST",
                     help="process just the files listed (one path per line, as in failed.txt); "
                          "listed failed files are retried")
    _add_max_images(run, "start at most N images in this run (exit 75 if work remains)")
    run.add_argument("--max-duration", type=_duration, help="start no new image after this long, e.g. 5h30m, "
                     "90m, 3600 (seconds); exit 75 so the next run resumes")
    run.add_argument("--grace", type=_duration, default=120.0,
                     help="after a stop, how long requests in flight may take (default 120s)")
    run.add_argument("--progress-interval", type=_duration, default=60.0,
                     help="without a terminal: one progress line this often (default 60s; 0: none)")
    run.add_argument("--concurrency", type=_positive_int, help="requests in flight (limits.concurrency)")
    run.add_argument("--rpm", type=_rate, help="requests started per minute, or 'auto' to find the quota "
                     "(limits.requests_per_minute)")
    run.add_argument("--backend", choices=("bedrock", "emulator"), help="override the manifest's backend")
    run.add_argument("--max-cost", type=float, help="stop starting requests once this run's estimated spend "
                     "would pass this many USD (limits.max_cost_usd); exit 75")
    run.add_argument("--endpoint-url", help="a Bedrock-compatible endpoint (bedrock.endpoint_url)")
    run.add_argument("--region", help="AWS region (bedrock.region; beats AWS_REGION and the profile's region)")
    run.add_argument("--profile", help="AWS named profile (bedrock.profile)")
    run.add_argument("--metrics-file", type=Path, help="Prometheus textfile to keep up to date "
                     "(default: <report_dir>/metrics.prom; point it into node_exporter's textfile directory)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show the progress bar (default: only on a terminal)")
    run.add_argument("--verify-outputs", action="store_true",
                     help="redo finished images whose output file is no longer byte-for-byte what was written "
                          "(default: a present output is kept, edited or not)")
    run.add_argument("--strict-exit", action="store_true",
                     help="exit 1 whenever any item is failed, not only when this run produced new failures")


def _add_max_images(parser: argparse.ArgumentParser, text: str) -> None:
    """``--max-images N`` as documented; ``--limit`` still works but is no longer shown."""
    parser.add_argument("--max-images", dest="limit", metavar="N", type=_positive_int, help=text)
    parser.add_argument("--limit", dest="limit", type=_positive_int, help=argparse.SUPPRESS)


def _add_doctor(doctor: argparse.ArgumentParser) -> None:
    doctor.add_argument("manifest", type=Path, nargs="?", help="the job's manifest (YAML): check for its model, "
                        "region and endpoint; without it, the defaults and --model")
    doctor.add_argument("--config", type=Path)
    doctor.add_argument("--region", help="default: the manifest's, else AWS_REGION, AWS_DEFAULT_REGION or the "
                        "profile's region, else us-east-1")
    doctor.add_argument("--profile", help="AWS named profile")
    doctor.add_argument("--model", choices=[m.value for m in ModelName], default="conservative",
                        help="without a manifest: which model to check")
    doctor.add_argument("--endpoint-url", help="bedrock-runtime endpoint (e.g. the emulator; default: the manifest's, "
                        "else AWS_ENDPOINT_URL_BEDROCK_RUNTIME or AWS_ENDPOINT_URL, else AWS's)")
    doctor.add_argument("--control-endpoint-url", help="endpoint for STS and the bedrock control plane (default: "
                        "AWS_ENDPOINT_URL_STS / AWS_ENDPOINT_URL, else the region's AWS endpoints)")
    doctor.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of internal errors")
    doctor.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def _job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="the job's manifest (YAML); relative paths in it are "
                        "relative to its folder")
    parser.add_argument("--config", type=Path, help=f"deployment config file (default: ${'{'}BATCH_UPSCALER_CONFIG"
                        f"{'}'} or ./{DEFAULT_CONFIG} if present)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of internal errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one object per line (timestamp, level, job, event, file, attempt, error_code)")
    parser.add_argument("--shard-count", type=_positive_int, metavar="N",
                        help="split the job into N shards (shards.count); 1, the default, is one whole job")
    parser.add_argument("--shard-index", type=int, metavar="I",
                        help="this machine's shard, 0..N-1 (default: AWS_BATCH_JOB_ARRAY_INDEX or "
                             "JOB_COMPLETION_INDEX, which AWS Batch and Kubernetes Indexed Jobs set)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _duration(text: str) -> float:
    """Seconds from '3600', '90s', '45m', '6h' or '1h30m'."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def config_path(explicit: Path | None) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise UsageError(f"--config: {explicit} not found")
        return explicit
    from_env = os.environ.get("BATCH_UPSCALER_CONFIG")
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def aws_environment(profile: str | None) -> AwsEnvironment:
    """What the AWS environment says, read the way botocore reads it (``AWS_CONFIG_FILE`` included).

    The region: ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else the ``region`` of the profile in
    use (``profile``, i.e. bedrock.profile / --profile, else ``AWS_PROFILE``, else ``default``).
    The endpoint variables are read to be shown only: botocore reads them itself when a client gets
    no explicit endpoint (and ignores them when ``ignore_configured_endpoint_urls`` is set).
    """
    import botocore.session
    from botocore.exceptions import BotoCoreError

    session = botocore.session.Session(profile=profile)
    region, region_source = _region_variable()
    try:
        if region is None:
            region, region_source = session.get_scoped_config().get("region"), f"profile {session.profile or 'default'}"
        ignored = bool(session.get_config_variable("ignore_configured_endpoint_urls"))
    except BotoCoreError:  # a missing profile or broken config file: the run or doctor reports it
        ignored = False
    endpoint, endpoint_source = (None, "default") if ignored else _endpoint_variable()
    return AwsEnvironment(region=region or None, region_source=region_source, profile=session.profile,
                          endpoint_url=endpoint, endpoint_source=endpoint_source)


def _region_variable() -> tuple[str | None, str]:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            return os.environ[name], name
    return None, "default"


def _endpoint_variable() -> tuple[str | None, str]:
    for name in ("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name], name
    return None, "default"


def settings_from(layers: Layers) -> JobSettings:
    """The one merge: the layers read from files and flags, over what the AWS environment says."""
    return build_settings(layers, aws_environment(configured_profile(layers)))


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line flags as a configuration layer (the highest one)."""
    flags: dict[str, Any] = {}
    limits = {k: v for k, v in (("concurrency", args.concurrency), ("requests_per_minute", args.rpm),
                                ("max_cost_usd", args.max_cost)) if v is not None}
    bedrock = {k: v for k, v in (("endpoint_url", args.endpoint_url), ("region", args.region),
                                 ("profile", args.profile)) if v is not None}
    if limits:
        flags["limits"] = limits
    if bedrock:
        flags["bedrock"] = bedrock
    if args.backend:
        flags["backend"] = args.backend
    return flags


def _settings(args: argparse.Namespace, *, need_index: bool = True) -> JobSettings:
    flags = flag_overrides(args) if args.command == "run" else {}
    if args.shard_count is not None:
        flags["shards"] = {"count": args.shard_count}
    settings = settings_from(manifest_layers(args.manifest, config_path(args.config), flags))
    count = settings.shard.count
    if count == 1:
        return settings
    index = shard_index(args.shard_index)
    if index is None:
        if need_index:
            raise UsageError(f"{count} shards: which one is this? Pass --shard-index, or run under AWS Batch "
                             "(AWS_BATCH_JOB_ARRAY_INDEX) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX)")
        return settings
    if not 0 <= index < count:
        raise UsageError(f"shard index {index} is not in 0..{count - 1} (shards.count {count})")
    return dataclasses.replace(settings, shard=dataclasses.replace(settings.shard, index=index))


def shard_index(flag: int | None) -> int | None:
    """This machine's shard: --shard-index beats the engines' variables (AWS Batch, then Kubernetes)."""
    if flag is not None:
        return flag
    for name in ("AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit():
                raise UsageError(f"{name}={value!r} is not a shard index")
            return int(value)
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from batch_upscaler.runner import run_job  # imports aiobotocore: keep `--help` fast

    settings = _settings(args)
    options = RunOptions(limit=args.limit, retry_failed=args.retry_failed, show_progress=args.progress,
                         only=_read_list(args.only) if args.only else None,
                         max_duration_s=args.max_duration, grace_s=args.grace, heartbeat_s=args.progress_interval,
                         metrics_path=args.metrics_file, verify_outputs=args.verify_outputs,
                         strict_exit=args.strict_exit)
    signals: StopSignals = args.signals
    if signals.requested:
        raise Interrupted(f"{signals.first} before the run started; nothing was done")
    with logging_redirect_tqdm(loggers=[log]):
        return int(run_job(settings, options, signals=signals).exit_code)


def _read_list(path: Path) -> frozenset[str]:
    """Paths from a file list: one per line; blank lines and '#' comments ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--only: cannot read {path}: {exc}") from None
    return frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def _job_name(args: argparse.Namespace) -> str | None:
    """The job name for log lines, read early and leniently (validation comes later, with errors)."""
    manifest = getattr(args, "manifest", None)
    if manifest is None:
        return None
    try:
        doc = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    name = doc.get("name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) else None


def cmd_plan(args: argparse.Namespace) -> int:
    from batch_upscaler.planner import plan_job, plan_shards, render_plan, render_shards

    settings = _settings(args, need_index=False)
    options = RunOptions(limit=args.limit, retry_failed=args.retry_failed)
    if settings.shard.count > 1 and shard_index(args.shard_index) is None:  # every shard, one line each
        plans = plan_shards(settings, options)
        print(json.dumps([p.to_json() for p in plans], indent=2) if args.json else render_shards(plans))
        return ExitCode.OK
    plan = plan_job(settings, options)
    print(json.dumps(plan.to_json(), indent=2) if args.json else render_plan(plan))
    return ExitCode.OK


def cmd_report(args: argparse.Namespace) -> int:
    from batch_upscaler.report import publish_report

    if args.merge:
        return _merge(args)
    settings = _settings(args)
    checkpoint = _existing_checkpoint(settings)
    try:
        print(publish_report(settings, checkpoint))
    finally:
        checkpoint.close()
    return ExitCode.OK


def _merge(args: argparse.Namespace) -> int:
    from batch_upscaler.merge import merge_reports

    settings = _settings(args, need_index=False)
    result = merge_reports(settings)
    for label in result.missing:
        log.warning("shard %s has not finished a run (no done.json in its report folder)", label)
    for label in result.unfinished:
        log.warning("shard %s stopped early in its last run (exit 75): run it again", label)
    log.info("merged %d shard(s): %d item(s), %d failed; report in %s", settings.shard.count, result.items,
             result.failed, result.where)
    print(result.where)
    return int(result.exit_code)


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    checkpoint = _existing_checkpoint(settings)
    try:
        counts = {state.value: n for state, n in checkpoint.counts().items()}
    finally:
        checkpoint.close()
    print(json.dumps({"job": settings.name, "checkpoint": str(settings.checkpoint_path), "counts": counts}, indent=2))
    return ExitCode.OK


def _existing_checkpoint(settings: JobSettings) -> Checkpoint:
    if not settings.checkpoint_path.exists():
        raise UsageError(f"job {settings.name!r} has no checkpoint yet ({settings.checkpoint_path}); run it first")
    return Checkpoint.open(settings.checkpoint_path, settings.name)


def cmd_doctor(args: argparse.Namespace) -> int:
    from batch_upscaler.doctor import check_storage, exit_code, options_from_settings, render, run_checks

    flags = {k: v for k, v in (("region", args.region), ("profile", args.profile),
                               ("endpoint_url", args.endpoint_url)) if v is not None}
    if args.manifest is not None:
        layers = manifest_layers(args.manifest, config_path(args.config), {"bedrock": flags} if flags else {})
    else:
        layers = default_layers(args.model, config_path(args.config), flags)
    settings = settings_from(layers)
    if settings.backend is Backend.EMULATOR:
        print(f"note: {args.manifest} uses the embedded emulator and needs no AWS; "
              "these checks are for backend: bedrock")
    results = run_checks(options_from_settings(settings, control_endpoint_url=args.control_endpoint_url))
    results += check_storage(settings)
    print(render(results))
    return exit_code(results)


def configure_logging(verbose: bool, quiet: bool, log_format: str = "text", job: str | None = None) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(job) if log_format == "json" else text_formatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "report": cmd_report, "status": cmd_status, "doctor": cmd_doctor}


def main(argv: Sequence[str] | None = None, signals: StopSignals | None = None) -> int:
    """Run one command; ``signals`` are the stop handlers the entry point installed first thing
    (installed here, and put back afterwards, when main is called in-process)."""
    own = signals is None
    signals = signals or StopSignals().install()
    try:
        return _main(list(sys.argv[1:] if argv is None else argv), signals)
    finally:
        if own:
            signals.restore()


def _main(argv: list[str], signals: StopSignals) -> int:
    if argv[:1] == ["emulator"]:  # one emulator command line, whichever way it is started
        signals.restore()  # the emulator server handles its own signals
        from batch_upscaler.emulator.__main__ import main as emulator_main

        emulator_main(argv[1:])
        return int(ExitCode.OK)
    args = build_parser().parse_args(argv)
    args.signals = signals
    if args.command != "run":  # only a run drains; other commands stop on Ctrl-C as usual
        signals.restore()
        if signals.requested:
            return int(ExitCode.INTERRUPTED)
    configure_logging(getattr(args, "verbose", False), getattr(args, "quiet", False),
                      getattr(args, "log_format", "text"), _job_name(args))
    try:
        return COMMANDS[args.command](args)
    except UpscalerError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to resume")
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # a bug: say so in one line; the traceback only when asked for
        log.error("internal error: %s: %s%s", type(exc).__name__, exc,
                  "" if getattr(args, "verbose", False) else " (run with -v for the traceback)")
        log.debug("traceback", exc_info=True)
        return int(ExitCode.INTERNAL)


def entry_point() -> None:
    sys.exit(main())
