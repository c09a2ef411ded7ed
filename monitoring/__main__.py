"""python -m monitoring baseline|report: build the baseline, report on captured traffic against it.

    python -m monitoring baseline --model model.tar.gz --data STAGED_DIR --out BASELINE_DIR
    python -m monitoring report PREFIX --baseline BASELINE_DIR --out REPORT_DIR [--window 1h]
                                [--since ISO] [--until ISO] [--fail-on-violation] [--no-progress]

PREFIX is a folder or s3://bucket/prefix holding capture files (any depth: every hour folder is read).
Exit status: 0 done, 2 a usage error (one line on stderr), 3 violations found with --fail-on-violation.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

VIOLATION_EXIT = 3


def iso_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO time such as 2026-11-25T08:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def window_length(text: str) -> str:
    from monitoring.report import window_seconds

    try:
        window_seconds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="python -m monitoring",
                                          description="Model Monitor-style report on the endpoint's data capture.")
    commands = main_parser.add_subparsers(dest="command", required=True)
    baseline = commands.add_parser("baseline", help="statistics.json and constraints.json of the model's "
                                                    "validation answers and training images")
    baseline.add_argument("--model", type=Path, required=True, help="model.tar.gz with code/inference.py")
    baseline.add_argument("--data", type=Path, required=True, help="staged data folder (python -m training.etl)")
    baseline.add_argument("--out", type=Path, required=True, help="folder for statistics.json, constraints.json")

    report = commands.add_parser("report", help="check captured records against the baseline, write report.html")
    report.add_argument("captures", help="folder or s3://bucket/prefix of capture files (.jsonl, .jsonl.gz)")
    report.add_argument("--baseline", type=Path, required=True, help="folder holding statistics.json, constraints.json")
    report.add_argument("--out", type=Path, required=True, help="folder for report.html and the other results")
    report.add_argument("--window", type=window_length, default="1h", help="length of the checked windows: 30m, 1h, 1d... (default 1h)")
    report.add_argument("--since", type=iso_time, help="first inference time read (ISO, UTC unless stated)")
    report.add_argument("--until", type=iso_time, help="end of the inference times read (excluded)")
    report.add_argument("--fail-on-violation", action="store_true",
                        help=f"exit with status {VIOLATION_EXIT} when any check is violated")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    return main_parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Imported here so that --help answers fast; torch and matplotlib take seconds to import.
    from monitoring import baseline, report
    from monitoring.captures import CaptureError, read_captures

    try:
        if args.command == "baseline":
            started = time.perf_counter()
            statistics, constraints = baseline.compute(args.model, args.data)
            baseline.write(statistics, constraints, args.out)
            print(f"baseline of {statistics['dataset']['item_count']} validation answers and "
                  f"{statistics['dataset']['image_count']} training images in {time.perf_counter() - started:.1f}s: "
                  f"{args.out / 'statistics.json'}, {args.out / 'constraints.json'}")
            return 0
        statistics, constraints = baseline.load(args.baseline)
        captures = read_captures(args.captures, args.since, args.until, progress=not args.no_progress)
        summary = report.build(captures, statistics, constraints, args.out, args.window, args.captures)
    except (baseline.BaselineError, CaptureError) as error:
        print(f"monitoring: error: {error}", file=sys.stderr)
        return 2
    print(f"{summary['records']} records, {summary['violations']} violation(s): {args.out / 'report.html'}")
    return VIOLATION_EXIT if args.fail_on_violation and summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
