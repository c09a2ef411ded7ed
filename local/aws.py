"""The local AWS: moto's server on 127.0.0.1 with Step Functions execution (child executions included) and
the in-process Lambda runtime.

Requests that this process sends to its own server (the Step Functions engine invoking Lambda, a handler
reading S3) are served by the server's WSGI application in the sending thread, without the socket, the
thread per connection and the HTTP parsing on both sides; other processes' requests come over HTTP as before.

`python -m local.aws --port N --ready-file FILE` serves it until SIGTERM: the background process `python -m local up`
starts.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import signal
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import botocore.endpoint
from botocore.awsrequest import AWSResponse
from moto.core import responses as moto_responses
from moto.core.botocore_stubber import MockRawResponse
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from moto.server import ThreadedMotoServer
from urllib3 import HTTPHeaderDict

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


def _dispatch_methods_once() -> None:
    """moto lists a response class's methods with `inspect.getmembers` on every request; classes do not change."""
    names = moto_responses.method_names_from_class
    if not getattr(names, "cache_info", None):
        moto_responses.method_names_from_class = functools.lru_cache(maxsize=None)(names)


def _environ(request, netloc: str) -> dict:
    """The WSGI environ werkzeug's server would make of `request` (botocore's AWSPreparedRequest)."""
    url = urlsplit(request.url)
    target = url.path + (f"?{url.query}" if url.query else "")
    body = request.body
    if hasattr(body, "read"):
        body = body.read()
    elif isinstance(body, str):
        body = body.encode()
    host, port = netloc.rsplit(":", 1)
    environ = {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": url.scheme,
        "wsgi.input": io.BytesIO(body or b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(url.path).encode().decode("latin-1"),
        "QUERY_STRING": url.query.encode().decode("latin-1"),
        "REQUEST_URI": target.encode().decode("latin-1"),
        "RAW_URI": target.encode().decode("latin-1"),
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": 0,
        "SERVER_NAME": host,
        "SERVER_PORT": port,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": netloc,
        "CONTENT_LENGTH": str(len(body or b"")),
    }
    for key, value in request.headers.items():
        key = key.upper().replace("-", "_")
        value = value.decode("latin-1") if isinstance(value, bytes) else value  # as the server reads them
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH", "HOST"):
            environ[key if key != "HOST" else "HTTP_HOST"] = value
        else:
            environ[f"HTTP_{key}"] = value
    return environ


class _OwnRequests:
    """Serves the requests this process sends to its own server with that server's application, in the
    sending thread; a request to anywhere else goes through botocore's HTTP session as usual."""

    netlocs: frozenset[str] = frozenset()
    application = None

    @classmethod
    def serve(cls, bound_port: int) -> None:
        # one local AWS per process at a time: a later start (a test module's) replaces the earlier one's address
        cls.netlocs = frozenset({f"127.0.0.1:{bound_port}", f"localhost:{bound_port}"})
        if cls.application is None:
            cls.application = DomainDispatcherApplication(create_backend_app)
            send = botocore.endpoint.Endpoint._send

            def send_or_serve(endpoint, request):
                netloc = urlsplit(request.url).netloc
                return cls.respond(request, netloc) if netloc in cls.netlocs else send(endpoint, request)

            botocore.endpoint.Endpoint._send = send_or_serve

    @classmethod
    def respond(cls, request, netloc: str) -> AWSResponse:
        started: list = []
        chunks = cls.application(
            _environ(request, netloc), lambda status, headers, *_: started.extend([status, headers])
        )
        try:
            body = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        status, headers = started
        return AWSResponse(request.url, int(status.split()[0]), HTTPHeaderDict(headers), MockRawResponse(body))


def start(port: int = 0) -> tuple[ThreadedMotoServer, str]:
    """Start moto in this process; handlers invoked by Step Functions run here too. Returns (server, url)."""
    lambda_runtime.install()
    stepfunctions_engine.install()
    _route_hosts_once()
    _dispatch_methods_once()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _, bound = server.get_host_and_port()
    url = f"http://127.0.0.1:{bound}"
    # The Step Functions engine calls Lambda at localhost:$MOTO_PORT.
    os.environ["MOTO_PORT"] = str(bound)
    _OwnRequests.serve(bound)
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
