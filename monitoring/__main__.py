"""python -m monitoring baseline|report: build the baseline, report on captured traffic against it.

    python -m monitoring baseline --model MODEL --data STAGED_DIR --out BASELINE
    python -m monitoring report PREFIX --baseline BASELINE --out REPORT_DIR [--window 1h]
                                [--since ISO] [--until ISO] [--last 1h] [--fail-on-violation] [--no-progress]
                                [--publish-metrics NAMESPACE --endpoint-name NAME] [--allow-empty]
                                [--filter-threshold P] [--reviews REVIEWS]

PREFIX is a folder or s3://bucket/prefix holding capture files (any depth: every hour folder is read).
MODEL is a model.tar.gz file or its s3:// URI; BASELINE a folder or an s3://bucket/prefix/; REVIEWS the folder or
s3://bucket/reviews/ of the reviewers' answers (their Reviews section; in the same time range as the captures).
Exit status: 0 done, 2 a usage error (one line on stderr), 3 violations found with --fail-on-violation,
4 the metrics could not be published.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

VIOLATION_EXIT = 3
PUBLISH_FAILED_EXIT = 4


def iso_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO time such as 2026-11-25T08:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def window_length(text: str) -> str:
    from monitoring.report import window_seconds

    try:
        window_seconds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="python -m monitoring", description="Model Monitor-style report on the endpoint's data capture."
    )
    commands = main_parser.add_subparsers(dest="command", required=True)
    baseline = commands.add_parser(
        "baseline", help="statistics.json and constraints.json of the model's validation answers and training images"
    )
    baseline.add_argument("--model", required=True, help="model.tar.gz with code/inference.py (a file or s3://...)")
    baseline.add_argument("--data", type=Path, required=True, help="staged data folder (python -m training.etl)")
    baseline.add_argument(
        "--out", required=True, help="folder or s3://bucket/prefix/ for statistics.json and constraints.json"
    )

    report = commands.add_parser("report", help="check captured records against the baseline, write report.html")
    report.add_argument("captures", help="folder or s3://bucket/prefix of capture files (.jsonl, .jsonl.gz)")
    report.add_argument(
        "--baseline", required=True, help="folder or s3://bucket/prefix/ holding statistics.json and constraints.json"
    )
    report.add_argument("--out", type=Path, required=True, help="folder for report.html and the other results")
    report.add_argument(
        "--window", type=window_length, default="1h", help="length of the checked windows: 30m, 1h, 1d... (default 1h)"
    )
    report.add_argument("--since", type=iso_time, help="first inference time read (ISO, UTC unless stated)")
    report.add_argument("--until", type=iso_time, help="end of the inference times read (excluded)")
    report.add_argument(
        "--last",
        type=window_length,
        help="read only the last whole period of this length ended by --until (default: now), "
        "e.g. 1h at 10:10 reads 09:00 to 10:00; instead of --since",
    )
    report.add_argument(
        "--fail-on-violation", action="store_true", help=f"exit with status {VIOLATION_EXIT} when any check is violated"
    )
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    report.add_argument(
        "--publish-metrics",
        metavar="NAMESPACE",
        help="put the violations into CloudWatch (DriftViolations in total and per check type, "
        "DriftCheckedRecords, NeitherShare), dimension EndpointName",
    )
    report.add_argument("--endpoint-name", help="the EndpointName dimension of the published metrics")
    report.add_argument(
        "--allow-empty",
        action="store_true",
        help="no capture in the range is a quiet period, not an error: exit 0 (and publish zeros)",
    )
    report.add_argument(
        "--filter-threshold",
        type=probability,
        metavar="P",
        help="the threshold the workflow's filter applied, named in the report (the checks use the model's own, "
        "which the baseline holds)",
    )
    report.add_argument(
        "--reviews",
        metavar="REVIEWS",
        help="folder or s3://bucket/reviews/ of the reviewers' answers (YYYY/MM/DD/<execution>.json): the report "
        "shows how often they overruled the model, per class (without: no reviewed answers yet)",
    )
    return main_parser


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability between 0 and 1")
    return value


def last_period(length: str, until: datetime | None) -> tuple[datetime, datetime]:
    """[since, until) of the last whole period of `length` (aligned on the epoch, as the windows are)."""
    from monitoring.report import window_seconds

    seconds = window_seconds(length)
    end = (until or datetime.now(UTC)).timestamp()
    start = (end // seconds - 1) * seconds
    return datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(start + seconds, UTC)


def main(argv: list[str] | None = None) -> int:
    command_parser = parser()
    args = command_parser.parse_args(argv)
    if args.command == "report":
        if args.publish_metrics and not args.endpoint_name:
            command_parser.error("--publish-metrics needs --endpoint-name (the metrics' EndpointName dimension)")
        if args.last:
            if args.since:
                command_parser.error("--last and --since exclude each other")
            args.since, args.until = last_period(args.last, args.until)
    # Imported here so that --help answers fast; torch and matplotlib take seconds to import.
    from monitoring import baseline, report
    from monitoring.captures import CaptureError, NoCaptures, read_captures
    from monitoring.reviews import ReviewError, read_reviews

    try:
        if args.command == "baseline":
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="scones-model-") as folder:
                statistics, constraints = baseline.compute(baseline.fetch_model(args.model, Path(folder)), args.data)
            baseline.write(statistics, constraints, args.out)
            where = args.out.rstrip("/") + "/" if args.out.startswith("s3://") else f"{Path(args.out)}{os.sep}"
            print(
                f"baseline of {statistics['dataset']['item_count']} validation answers and "
                f"{statistics['dataset']['image_count']} training images in {time.perf_counter() - started:.1f}s: "
                f"{where}statistics.json, {where}constraints.json"
            )
            return 0
        report.prepare_out(args.out)
        statistics, constraints = baseline.load(args.baseline)
        answers = read_reviews(args.reviews, args.since, args.until) if args.reviews else None
        try:
            captures = read_captures(args.captures, args.since, args.until, progress=not args.no_progress)
            summary = report.build(
                captures, statistics, constraints, args.out, args.window, args.captures, args.filter_threshold, answers
            )
        except NoCaptures as error:
            if not args.allow_empty:
                raise
            summary = {"records": 0, "violations": 0, "results": []}
            print(f"nothing to check: {error}")
    except (baseline.BaselineError, CaptureError, report.ReportError, ReviewError) as error:
        print(f"monitoring: error: {error}", file=sys.stderr)
        return 2
    if args.publish_metrics:
        from botocore.exceptions import BotoCoreError, ClientError

        from monitoring import metrics

        try:
            metrics.publish(args.publish_metrics, args.endpoint_name, summary)
        except (BotoCoreError, ClientError) as error:
            print(f"monitoring: error: cannot publish the metrics to CloudWatch: {error}", file=sys.stderr)
            return PUBLISH_FAILED_EXIT
        print(
            f"published {summary['violations']} violation(s) as {args.publish_metrics}/{metrics.VIOLATIONS} "
            f"for EndpointName={args.endpoint_name}"
        )
    if summary["records"]:
        print(f"{summary['records']} records, {summary['violations']} violation(s): {args.out / 'report.html'}")
    if summary.get("reviews"):
        counts = summary["reviews"]
        print(
            f"{counts['answers']} reviewed answer(s), {counts['overruled']} overruled the model, "
            f"{counts['unreadable_lines']} unreadable line(s)"
        )
    return VIOLATION_EXIT if args.fail_on_violation and summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
