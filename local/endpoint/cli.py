"""`python -m local.endpoint --spec FILE --spool-dir DIR [--port N] [--ready-file FILE]`: serve until SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tarfile
import threading
from pathlib import Path

from local.endpoint.capture import SpoolBusy
from local.endpoint.server import DEFAULT_WORKERS, EndpointServer
from local.endpoint.spec import spec_from_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m local.endpoint", description="Serve SageMaker endpoints locally until SIGTERM or SIGINT."
    )
    parser.add_argument(
        "--spec",
        type=Path,
        required=True,
        help='JSON file {"endpoints": [spec, ...]}, each spec as local.endpoint.spec_to_json writes it',
    )
    parser.add_argument(
        "--port", type=_number(0, 65535), default=8080, help="port to listen on; 0 picks a free one (default 8080)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--workers",
        type=_number(1, 1024),
        default=DEFAULT_WORKERS,
        help=f"threads serving connections (default {DEFAULT_WORKERS})",
    )
    parser.add_argument(
        "--spool-dir",
        type=Path,
        required=True,
        help="folder where capture records are written before their answers and kept until uploaded "
        "to S3; a server started on the folder of one that was killed uploads what it left",
    )
    parser.add_argument(
        "--ready-file", type=Path, help='once serving, write {"port": N, "pid": P} here; removed when the server stops'
    )
    args = parser.parse_args(argv)

    # One torch thread: concurrent requests are batched; OpenMP's threads would compete with the request threads
    # for the cores (2 here, with the 32-px network: p50 at concurrency 1 went from 4 to 10 ms).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        specs = [spec_from_json(entry) for entry in json.loads(args.spec.read_text())["endpoints"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return _failed(f"{args.spec} is not a readable endpoint spec file: {type(error).__name__}: {error}")
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    try:
        server = EndpointServer(specs, port=args.port, host=args.host, workers=args.workers, spool_dir=args.spool_dir)
    except (OSError, tarfile.TarError, SpoolBusy) as error:
        return _failed(str(error))
    with server:
        print(f"serving {', '.join(spec.name for spec in specs)} at {server.url}", flush=True)
        if args.ready_file:
            partial = args.ready_file.with_name(f".{args.ready_file.name}.{os.getpid()}")
            partial.write_text(json.dumps({"port": server.port, "pid": os.getpid()}) + "\n")
            partial.replace(args.ready_file)
        try:
            stop.wait()
        finally:
            if args.ready_file:
                args.ready_file.unlink(missing_ok=True)
    return 0


def _failed(message: str) -> int:
    print(f"local.endpoint: error: {message}", file=sys.stderr)
    return 2


def _number(lowest: int, highest: int):
    def number(text: str) -> int:
        if not text.isdigit() or not lowest <= int(text) <= highest:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {lowest} to {highest}")
        return int(text)

    return number
