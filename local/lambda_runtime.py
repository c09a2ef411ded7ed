"""A Lambda runtime for moto without Docker: handlers run in the moto server's own process.

moto keeps every function it was given through the ordinary Lambda API (`CreateFunction` with the
asset's zip), but without Docker it cannot run one. `install()` replaces the invoke of moto's Lambda
backends with a call of the function's real handler, loaded from the function's own zip, with the
environment the template gave it. Errors come back as Lambda reports them (`errorType` is the
exception's class name), which is what Step Functions turns into the execution's error name.

The Step Functions engine's Lambda tasks call the handler through `EngineLambdaClient` rather than through
moto's Lambda API over boto3: the same answer (StatusCode 200, the payload, FunctionError "Unhandled" with
the error payload) without encoding, signing, routing and decoding the request and the image it carries.

Limits, by design: one process serves every function, so two functions may not set one environment
variable to different values (a clear error says so); there is no timeout enforcement or memory cap.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import traceback
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moto.awslambda.models import LambdaBackend, lambda_backends
from moto.awslambda_simple.models import LambdaSimpleBackend
from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.botocore_stubber import MockRawResponse

_lock = threading.Lock()
_handlers: dict[str, Callable[[Any, Any], Any]] = {}
_environment: dict[str, str] = {}
_code_root = Path(tempfile.mkdtemp(prefix="scones-lambda-"))
atexit.register(shutil.rmtree, _code_root, ignore_errors=True)


class EnvironmentConflict(RuntimeError):
    """Two functions set the same environment variable differently; in one process they cannot both hold."""


class Context:
    """The parts of Lambda's context object that handlers commonly read."""

    def __init__(self, function) -> None:
        self.function_name = function.function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = function.function_arn
        self.memory_limit_in_mb = int(function.memory_size)
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


def _load_handler(code: bytes, handler: str) -> Callable[[Any, Any], Any]:
    """Import `handler` ("package.module.function") from the zip, isolated from other functions' modules."""
    digest = hashlib.sha256(code).hexdigest()
    key = f"{digest}:{handler}"
    if key in _handlers:
        return _handlers[key]
    folder = _code_root / digest
    if not folder.exists():
        with zipfile.ZipFile(io.BytesIO(code)) as archive:
            staging = Path(tempfile.mkdtemp(dir=_code_root))
            archive.extractall(staging)
            staging.rename(folder)
    tops = {entry.name.removesuffix(".py") for entry in folder.iterdir()}
    module_name, function_name = handler.rsplit(".", 1)
    is_ours = lambda name: name.split(".")[0] in tops  # noqa: E731
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if is_ours(name)}
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if is_ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
    _handlers[key] = getattr(module, function_name)
    return _handlers[key]


def _apply_environment(function) -> None:
    for name, value in function.environment_vars.items():
        if _environment.get(name, value) != value:
            raise EnvironmentConflict(
                f"{function.function_name} sets {name}={value!r} but another function set {_environment[name]!r}; "
                "the local Lambda runtime runs every function in one process"
            )
        _environment[name] = value
        os.environ[name] = value


def _invoke(
    backend: LambdaBackend, function_name: str, qualifier: str | None, body: Any, headers: Any, response_headers: Any
) -> bytes:
    function = backend.get_function(function_name, qualifier)
    try:
        with _lock:
            handler = _load_handler(function.code_bytes, function.handler)
            _apply_environment(function)
        event = json.loads(body) if body else {}
        result = handler(event, Context(function))
        payload = json.dumps(result)
    except Exception as error:
        response_headers["x-amz-function-error"] = "Unhandled"
        payload = json.dumps(
            {
                "errorMessage": str(error),
                "errorType": type(error).__name__,
                "stackTrace": traceback.format_tb(error.__traceback__),
            }
        )
    return payload.encode()


# moto's Lambda API answers a payload over 6,000,000 bytes with this error in the payload's place
_TOO_LARGE = {
    "errorMessage": "Response payload size exceeded maximum allowed payload size (6291556 bytes).",
    "errorType": "Function.ResponseSizeTooLarge",
}


class EngineLambdaClient:
    """The `invoke` of a boto3 Lambda client for the Step Functions engine in this process: a synchronous
    invocation of a function this process holds runs its handler here; anything else (another invocation
    type, an unknown function) goes to `fallback`, the boto3 client, as before."""

    def __init__(self, fallback, region: str) -> None:
        self._fallback = fallback
        self._region = region

    def invoke(self, **parameters):
        name = parameters.get("FunctionName", "")
        direct = set(parameters) <= {"FunctionName", "Payload", "Qualifier", "InvocationType"}
        if not direct or parameters.get("InvocationType", "RequestResponse") != "RequestResponse":
            return self._fallback.invoke(**parameters)
        parts = name.split(":")  # arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER], or a plain name
        region, account = (parts[3], parts[4]) if name.startswith("arn:") and len(parts) >= 7 else (self._region, None)
        backend = lambda_backends[account or DEFAULT_ACCOUNT_ID][region]
        try:
            backend.get_function(name, parameters.get("Qualifier"))
        except Exception:  # moto's own answer (ResourceNotFoundException...) is the boto3 client's to give
            return self._fallback.invoke(**parameters)
        response_headers: dict[str, str] = {}
        payload = _invoke(backend, name, parameters.get("Qualifier"), parameters.get("Payload"), {}, response_headers)
        answer = {"StatusCode": 200}
        if len(payload) > 6_000_000:
            payload, response_headers["x-amz-function-error"] = json.dumps(_TOO_LARGE).encode(), "Unhandled"
        if "x-amz-function-error" in response_headers:
            answer["FunctionError"] = response_headers["x-amz-function-error"]
        return {**answer, "Payload": MockRawResponse(payload)}


def install() -> None:
    """Make moto's Lambda backends run handlers in this process, loaded afresh: a local AWS started earlier in
    this process (a test module's) had other functions, and the handlers it loaded keep the boto3 clients they
    made for its address."""
    LambdaBackend.invoke = _invoke
    LambdaSimpleBackend.invoke = _invoke
    with _lock:
        _handlers.clear()
        _environment.clear()
