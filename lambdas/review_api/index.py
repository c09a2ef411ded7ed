"""The review API and its page, behind API Gateway's HTTP API (payload format 2.0 events).

- `GET /`: the page (page.html: HTML, CSS and JS in one file, under a strict Content-Security-Policy). It holds
  no data; it signs in with Cognito (or takes `#token=...` from its URL locally) and calls the API.
- `GET /api/tasks?limit=N&after=ID`, `POST /api/answers`, `GET /api/recent?limit=N`, `POST /api/corrections`
  (answers.py). Every `/api/` route needs the JWT claims API Gateway's authorizer puts in
  `requestContext.authorizer.jwt.claims` (401 without); the reviewer is their `email`, else
  `cognito:username`, else `sub`.
- `{"action": "publish_queue_metrics"}` (the schedule's event): the EMF line of the waiting tasks.
Errors answer `{"error": "<what to do>"}` with a 4xx status. Each request prints one JSON log line.
"""

import base64
import hashlib
import html
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

from common import InvalidEvent, setting

from review_api import answers
from review_api.answers import HttpError

PAGE = (Path(__file__).parent / "page.html").read_text()


def _hash(tag: str) -> str:
    (content,) = re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, re.DOTALL)
    return "'sha256-" + base64.b64encode(hashlib.sha256(content.encode()).digest()).decode() + "'"


SCRIPT_HASH, STYLE_HASH = _hash("script"), _hash("style")


def response(status: int, body, content_type: str = "application/json", headers: dict | None = None) -> dict:
    return {
        "statusCode": status,
        "headers": {
            "content-type": content_type,
            "cache-control": "no-store",
            "x-content-type-options": "nosniff",
            **(headers or {}),
        },
        "body": body if isinstance(body, str) else json.dumps(body),
    }


def page() -> dict:
    region = setting("USER_POOL_REGION")
    photos = urlsplit(answers.s3_client().meta.endpoint_url)
    # Photos come from S3 by presigned URL: any https origin (the bucket's virtual host), or the local S3's
    # own http origin when the API runs against a local AWS.
    image_sources = "https:" + (f" {photos.scheme}://{photos.netloc}" if photos.scheme == "http" else "")
    policy = (
        f"default-src 'none'; script-src {SCRIPT_HASH}; style-src {STYLE_HASH}; img-src {image_sources}; "
        f"connect-src 'self' https://cognito-idp.{region}.amazonaws.com; form-action 'none'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    text = PAGE.replace("__USER_POOL_CLIENT_ID__", html.escape(setting("USER_POOL_CLIENT_ID"))).replace(
        "__USER_POOL_REGION__", html.escape(region)
    )
    headers = {"content-security-policy": policy, "referrer-policy": "no-referrer", "x-frame-options": "DENY"}
    return response(200, text, "text/html; charset=utf-8", headers)


def reviewer(event: dict) -> str:
    claims = (((event.get("requestContext") or {}).get("authorizer") or {}).get("jwt") or {}).get("claims")
    if not isinstance(claims, dict):
        raise HttpError(401, "Sign in first: the review API answers requests with a Cognito user pool token only.")
    for name in ("email", "cognito:username", "sub"):
        if claims.get(name):
            return str(claims[name])
    raise HttpError(401, "The token names no user (no email, cognito:username or sub claim): sign in again.")


def json_body(event: dict) -> dict:
    text = event.get("body") or ""
    try:
        if event.get("isBase64Encoded"):
            text = base64.b64decode(text).decode()
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise HttpError(400, 'The body is not a JSON object: send JSON such as {"task": "...", "class": "..."}.')
    return body


def limit(event: dict, default: int, maximum: int) -> int:
    text = (event.get("queryStringParameters") or {}).get("limit")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise HttpError(400, f"limit={text!r}: give a whole number from 1 to {maximum}.")
    return int(text)


def get_tasks(event: dict, who: str) -> dict:
    after = (event.get("queryStringParameters") or {}).get("after") or None
    if after is not None and len(after) > 300:
        raise HttpError(400, "after is longer than a task id: give the `next` of the page before.")
    return answers.list_tasks(limit(event, 25, 100), after)


def get_recent(event: dict, who: str) -> dict:
    return answers.recent(limit(event, 20, 50))


ROUTES = {
    "/api/tasks": {"GET": get_tasks},
    "/api/answers": {"POST": lambda event, who: answers.answer_task(json_body(event), who)},
    "/api/recent": {"GET": get_recent},
    "/api/corrections": {"POST": lambda event, who: answers.correct(json_body(event), who)},
}


def route(event: dict, method: str, path: str) -> tuple[dict, str | None]:
    if path == "/":
        if method != "GET":
            raise HttpError(405, f"{method} / is not served: the page is GET /.")
        return page(), None
    if not path.startswith("/api/"):
        raise HttpError(404, f"No page at {path}: the review page is at /.")
    who = reviewer(event)
    methods = ROUTES.get(path.rstrip("/"))
    if methods is None:
        raise HttpError(404, f"No API route {path}: the routes are {', '.join(ROUTES)}.")
    if method not in methods:
        raise HttpError(405, f"{method} {path} is not served: use {' or '.join(methods)}.")
    return response(200, methods[method](event, who)), who


def request_path(event: dict) -> str:
    path = event.get("rawPath") or "/"
    stage = (event.get("requestContext") or {}).get("stage")
    if stage and stage != "$default" and path.startswith(f"/{stage}/"):
        path = path[len(stage) + 1 :]
    return path


def handler(event, context):
    if isinstance(event, dict) and "action" in event:
        if event["action"] != "publish_queue_metrics":
            raise InvalidEvent(f"Unknown action {event['action']!r}: the schedule sends publish_queue_metrics.")
        line = answers.queue_metrics(setting("METRIC_NAMESPACE"))
        print(line)
        return json.loads(line)
    if not isinstance(event, dict) or "requestContext" not in event:
        raise InvalidEvent("review_api takes API Gateway HTTP API events (payload format 2.0) or the schedule's.")
    method = event["requestContext"].get("http", {}).get("method", "GET")
    path, who = request_path(event), None
    try:
        answer, who = route(event, method, path)
    except HttpError as error:
        answer = response(error.status, {"error": str(error)})
    print(json.dumps({"method": method, "path": path, "status": answer["statusCode"], "reviewer": who}))
    return answer
