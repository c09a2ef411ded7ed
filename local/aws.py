"""The local AWS: moto's server on 127.0.0.1 with Step Functions execution (child executions included) and
the in-process Lambda runtime.

`python -m local.aws --port N --ready-file FILE` serves it until SIGTERM: the background process `python -m local up`
starts.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import threading
import urllib.request
from pathlib import Path

from moto.moto_server.werkzeug_app import DomainDispatcherApplication
from moto.server import ThreadedMotoServer

from local import lambda_runtime, stepfunctions_engine
from local.assembly import REGION

ENGINE_CONFIG = {"lambda": {"use_docker": False}, "stepfunctions": {"execute_state_machine": True}}


def client_environment(url: str) -> dict[str, str]:
    """What boto3 (ours, the handlers', the Step Functions engine's) needs to reach the local AWS."""
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }


def _route_hosts_once() -> None:
    """moto 5.2.5 finds the backend of every request's host under one lock that all requests share, by
    listing moto's package folder and matching hundreds of URL patterns: concurrent requests queue there.
    The answer depends on the host alone, so each host is routed once."""
    route = DomainDispatcherApplication.get_backend_for_host
    if getattr(route, "cache_info", None):
        return
    DomainDispatcherApplication.get_backend_for_host = functools.lru_cache(maxsize=None)(route)


def start(port: int = 0) -> tuple[ThreadedMotoServer, str]:
    """Start moto in this process; handlers invoked by Step Functions run here too. Returns (server, url)."""
    lambda_runtime.install()
    stepfunctions_engine.install()
    _route_hosts_once()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _, bound = server.get_host_and_port()
    url = f"http://127.0.0.1:{bound}"
    # The Step Functions engine calls Lambda at localhost:$MOTO_PORT.
    os.environ["MOTO_PORT"] = str(bound)
    os.environ.update(client_environment(url))
    request = urllib.request.Request(
        f"{url}/moto-api/config",
        data=json.dumps(ENGINE_CONFIG).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).close()
    return server, url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local.aws", description="Serve the local AWS until SIGTERM.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--ready-file", type=Path, required=True, help='once serving, write {"pid", "url", "sagemaker_runtime"} here'
    )
    args = parser.parse_args(argv)
    server, url = start(args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    partial = args.ready_file.with_name(f".{args.ready_file.name}.partial")
    partial.write_text(
        json.dumps(
            {"pid": os.getpid(), "url": url, "sagemaker_runtime": os.environ["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"]}
        )
    )
    partial.replace(args.ready_file)
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
