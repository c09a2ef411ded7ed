"""The review page on this machine (`make run` prints its URL) and `python -m local review` in the shell.

`python -m local.review --function NAME --ready-file FILE` serves http://127.0.0.1:<port>/ until SIGTERM,
in place of the review stack's HTTP API: where API Gateway checks a reviewer's Cognito token, it checks a
token of its own (made at start, written to the ready file, given to the browser in the page URL's fragment),
then invokes the review API Lambda in the local AWS with the payload-format-2.0 event API Gateway sends, and
answers what the Lambda answered. A request to `/api/...` without the token gets API Gateway's 401.

`python -m local review` lists the waiting tasks through that server, as the page does, and
`python -m local review --answer TASK CLASS` answers one (TASK: its id, or its execution's name or a unique start
of it).
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import boto3

from local.services import BackgroundService

SERVICE = "review"  # the background service's name: its ready file is <state dir>/review.json
API_HANDLER = "review_api.index.handler"
LOCAL_CLAIMS = {"sub": "local", "email": "local reviewer"}
UNAUTHORIZED = {"message": "Unauthorized"}  # what API Gateway's JWT authorizer answers
LAMBDA_FAILED = {"message": "Internal Server Error"}  # what API Gateway answers when the integration fails


class ReviewError(Exception):
    """The review page is not up, or a request to it failed; the message says what to do."""


def api_event(method: str, target: str, headers: dict[str, str], body: bytes, claims: dict | None) -> dict:
    """The event API Gateway's HTTP API sends a Lambda integration (payload format 2.0)."""
    path, _, query = target.partition("?")
    event = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": {name.lower(): value for name, value in headers.items()},
        "requestContext": {
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1"},
            "stage": "$default",
            "timeEpoch": int(time.time() * 1000),
        },
        "isBase64Encoded": False,
    }
    if query:
        event["queryStringParameters"] = {name: ",".join(values) for name, values in parse_qs(query).items()}
    if body:
        try:
            event["body"] = body.decode()
        except UnicodeDecodeError:
            event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
    if claims is not None:
        event["requestContext"]["authorizer"] = {"jwt": {"claims": claims, "scopes": None}}
    return event


def http_answer(payload: dict | list | str | None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of what the Lambda answered, read as API Gateway reads format 2.0 answers."""
    if isinstance(payload, dict) and "statusCode" in payload:
        body = payload.get("body") or ""
        data = base64.b64decode(body) if payload.get("isBase64Encoded") else body.encode()
        return int(payload["statusCode"]), dict(payload.get("headers") or {}), data
    return 200, {"content-type": "application/json"}, json.dumps(payload).encode()


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, function_name: str, token: str) -> None:
        super().__init__(("127.0.0.1", port), ReviewRequest)
        self.function_name = function_name
        self.token = token
        self.lambda_client = boto3.client("lambda")

    def invoke(self, event: dict) -> tuple[int, dict[str, str], bytes]:
        answer = self.lambda_client.invoke(FunctionName=self.function_name, Payload=json.dumps(event).encode())
        payload = json.loads(answer["Payload"].read() or b"null")
        if answer.get("FunctionError"):
            print(f"review API failed: {payload}", file=sys.stderr, flush=True)
            return 500, {"content-type": "application/json"}, json.dumps(LAMBDA_FAILED).encode()
        return http_answer(payload)


class ReviewRequest(BaseHTTPRequestHandler):
    server: ReviewServer
    protocol_version = "HTTP/1.1"

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        claims = None
        if self.path.startswith("/api/"):
            given = self.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode()):
                self.reply(401, {"content-type": "application/json"}, json.dumps(UNAUTHORIZED).encode())
                return
            claims = LOCAL_CLAIMS
        event = api_event(self.command, self.path, dict(self.headers), body, claims)
        self.reply(*self.server.invoke(event))

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "connection"):
                self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = forward

    def log_message(self, *args) -> None:
        pass


def serve_page(service: BackgroundService, functions: list[str], say, started: list) -> dict | None:
    """Start the page server for the review API among the deployed `functions` (found by its handler; appended to
    `started` when started), or reuse the one running; None when the stacks have no review API (`-c review=false`)."""
    lam = boto3.client("lambda")
    api = next(
        (name for name in functions if lam.get_function_configuration(FunctionName=name)["Handler"] == API_HANDLER),
        None,
    )
    if api is None:
        service.stop()
        return None
    info = service.info()
    if info and info["function"] == api:
        say("review", f"reusing the review page at {info['url']}")
        return info
    service.stop()
    info = service.start(["-m", "local.review", "--port", "0", "--function", api])
    started.append(service)
    say("review", f"serving the review page at {info['url']} (the review API Lambda {api} behind it)")
    return info


def page_url(info: dict) -> str:
    return f"{info['url']}/#token={info['token']}"


# ------------------------------------------------------------------------------------------ the shell


def request(info: dict, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"authorization": f"Bearer {info['token']}", "content-type": "application/json"}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(info["url"] + path, data=data, method=method, headers=headers), timeout=30
        ) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        message = json.loads(error.read() or b"{}")
        raise ReviewError(f"{method} {path}: {error.code} {message.get('error') or message.get('message')}") from None
    except urllib.error.URLError as error:
        raise ReviewError(
            f"the review page at {info['url']} does not answer ({error.reason}): run `make run`"
        ) from None


def waiting_tasks(info: dict) -> list[dict]:
    """Every waiting task, oldest first, a page at a time as the page reads them."""
    tasks, after = [], None
    while True:
        query = {"limit": 100, **({"after": after} if after else {})}
        page = request(info, "GET", f"/api/tasks?{urlencode(query)}")
        tasks += page["tasks"]
        after = page.get("next")
        if not after:
            return tasks


def find_task(tasks: list[dict], wanted: str) -> dict:
    matches = [task for task in tasks if wanted in (task["id"], task["execution"])]
    matches = matches or [task for task in tasks if task["execution"].startswith(wanted)]
    if len(matches) != 1:
        found = "no waiting task" if not matches else f"{len(matches)} waiting tasks"
        raise ReviewError(f"{found} matches {wanted!r}: give a task id or execution name from `python -m local review`")
    return matches[0]


def describe(task: dict) -> str:
    waited = datetime.now(UTC) - datetime.fromisoformat(task["requested_at"].replace("Z", "+00:00"))
    probabilities = ", ".join(f"{name} {p:.2f}" for name, p in zip(task["classes"], task["inferences"], strict=False))
    return (
        f"{task['execution']}  waiting {int(waited.total_seconds())} s  model: {task['model_class']} "
        f"({probabilities}, neither {task['neither']:.2f})  {task['s3_key']}"
    )


def run(args, running_info) -> int:
    """`python -m local review`: `running_info(state_dir)` answers the page server's ready file, or None."""
    info = running_info(args.state_dir)
    if info is None:
        raise ReviewError("the review page is not up: run `make run` (with review on, the default) first")
    tasks = waiting_tasks(info)
    if args.answer:
        wanted, answer_class = args.answer
        task = find_task(tasks, wanted)
        answered = request(info, "POST", "/api/answers", {"task": task["id"], "class": answer_class})
        print(f"{task['execution']}: answered {answered['class']}; label at {answered['label']}")
        return 0
    if args.json:
        print(json.dumps(tasks, indent=1))
        return 0
    print(f"{len(tasks)} waiting for review, oldest first; the page: {page_url(info)}")
    for task in tasks:
        print(f"  {describe(task)}")
    if tasks:
        print("answer one: python -m local review --answer EXECUTION bicycle|motorcycle|neither")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--answer", nargs=2, metavar=("TASK", "CLASS"), help="answer a waiting task: bicycle, motorcycle or neither"
    )
    parser.add_argument("--json", action="store_true", help="print the waiting tasks as JSON")


# ------------------------------------------------------------------------------------------ the server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local.review", description=__doc__.split("\n\n")[1])
    parser.add_argument("--port", type=int, default=0, help="0 (the default): any free port")
    parser.add_argument("--function", required=True, help="the review API Lambda's name in the local AWS")
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)
    server = ReviewServer(args.port, args.function, secrets.token_urlsafe(24))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    url = f"http://127.0.0.1:{server.server_address[1]}"
    info = {"pid": os.getpid(), "url": url, "token": server.token, "function": args.function}
    args.ready_file.touch(mode=0o600)
    args.ready_file.write_text(json.dumps(info))
    server.serve_forever()


if __name__ == "__main__":
    main()
