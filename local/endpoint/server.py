"""The endpoints and the HTTP server that answers for them.

It answers where boto3's `sagemaker-runtime` client sends `invoke_endpoint` when
`AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME` points at it (`POST /endpoints/{name}/invocations`), and at the container
paths `GET /ping` and `POST /invocations`.

Errors are those of the real service. On the runtime path, the container's own errors reach the caller as
SageMaker passes them on: `ModelError`, HTTP 424, with `OriginalStatusCode`; `/invocations` answers them
directly. An unknown endpoint is a 400 `ValidationError`, a body over 6 MiB a 413. A request whose capture record
could not be written is answered 503 `ServiceUnavailable` (retried by boto3) instead of 200, where SageMaker
would answer and lose the record. `POST /local/upload-captures` (not SageMaker's) uploads every record written so
far, for a caller about to read them.

The container's own errors: 415 for a content type other than an image; an error the inference toolkit answers
itself (a BaseInferenceToolkitError, see handler.toolkit_error) with its status and message; otherwise 400 when
`input_fn` cannot read the body (the toolkit would answer 500) and 500 when the model fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import re
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from local.endpoint.batching import PredictionBatcher
from local.endpoint.capture import CaptureError, CaptureSpool, capture_record, captured
from local.endpoint.handler import InvocationError, answer_of, load_inference_handler, media_type, toolkit_error
from local.endpoint.spec import VARIANT_NAME, EndpointSpec

ACCOUNT_ID = "123456789012"  # moto's default account; the real service names the caller's in "not found" errors
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker's InvokeEndpoint limit
CONTENT_TYPES = ("image/png", "image/jpeg", "application/x-image")
DEFAULT_ACCEPT = "application/json"  # the inference toolkit's default when the caller sends no Accept
DEFAULT_WORKERS = 32
IDLE_TIMEOUT_SECONDS = 5  # frees a worker held by an idle keep-alive connection
DISCARD_LIMIT_BYTES = 64 * 1024 * 1024  # an oversized body up to this is read and dropped so the 413 reaches the client
# A sampled request body this large is base64-encoded for its capture record on another thread while the model
# works (decoding a photo and predicting let go of the GIL): 3 MB take 8 ms or more. A smaller one is encoded after,
# on the request's thread, where the hand-off would cost more than the encoding.
CAPTURE_AHEAD_BYTES = 256 * 1024


class Endpoint:
    """One endpoint: its model, loaded from a private copy of model.tar.gz, and its data capture."""

    def __init__(self, spec: EndpointSpec, inference_slots: threading.Semaphore, spool_dir: Path):
        self.spec = spec
        self._inference_slots = inference_slots
        self._model_dir = Path(tempfile.mkdtemp(prefix=f"scones-endpoint-{spec.name}-"))
        self._batcher = self._capture = self._capture_ahead = None
        try:
            with tarfile.open(spec.model_data) as archive:
                archive.extractall(self._model_dir, filter="data")
            if not (self._model_dir / "code" / "inference.py").is_file():
                raise ValueError(f"{spec.model_data} has no code/inference.py")
            module_name = f"scones_endpoint_{re.sub(r'[^0-9a-zA-Z_]', '_', spec.name)}_{uuid.uuid4().hex[:8]}"
            self._handler = load_inference_handler(self._model_dir / "code", module_name)
            self._model = self._handler.model_fn(str(self._model_dir))
            self._batcher = PredictionBatcher(self._handler.predict_fn, self._model, spec.name)
            if spec.capture:
                self._capture = CaptureSpool(spec.capture, spec.name, spool_dir / quote(spec.name, safe=""))
                self._capture_ahead = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"capture-{spec.name}")
        except BaseException:
            self.close()
            raise

    def invoke(self, body: bytes, content_type: str, accept: str, inference_id: str | None = None) -> tuple[bytes, str]:
        """The model's answer (body, content type), captured if sampled; raises InvocationError or CaptureError."""
        if media_type(content_type) not in CONTENT_TYPES:
            raise InvocationError(
                415, f"content type {content_type!r} is not supported: send one of {', '.join(CONTENT_TYPES)}"
            )
        capture = self.spec.capture
        sampled = capture is not None and random.random() * 100 < capture.sampling_percentage
        endpoint_input: Future | None = None
        if sampled and "Input" in capture.modes and len(body) >= CAPTURE_AHEAD_BYTES:
            endpoint_input = self._capture_ahead.submit(captured, capture, body, content_type, "INPUT")
        answer, answer_type = self._predict(body, content_type, accept)
        if sampled:
            now = datetime.now(UTC)
            record = capture_record(
                capture,
                body,
                content_type,
                answer,
                answer_type,
                inference_id,
                now,
                endpoint_input=endpoint_input and endpoint_input.result(),
            )
            self._capture.write(record, now)
        return answer, answer_type

    def upload_captures(self) -> None:
        if self._capture:
            self._capture.upload()

    def _predict(self, body: bytes, content_type: str, accept: str) -> tuple[bytes, str]:
        prediction = None
        # The slots bound how many bodies are decoded at once, and so the memory a flood of large images takes.
        with self._inference_slots:
            try:
                data = self._handler.input_fn(body, content_type)
            except InvocationError:
                raise
            except Exception as error:
                raise toolkit_error(error) or InvocationError(
                    400, f"input_fn could not read the request body: {type(error).__name__}: {error}"
                ) from error
            batched = self._batcher.takes(data)
            if not batched:
                try:
                    prediction = self._handler.predict_fn(data, self._model)
                except Exception as error:
                    raise _model_failed(error) from error
        try:
            if batched:
                prediction = self._batcher.predict(data)
            return answer_of(self._handler.output_fn(prediction, accept), accept)
        except Exception as error:
            raise _model_failed(error) from error

    def close(self) -> None:
        """Stop, once every capture record is uploaded; raises CaptureError if some could not be."""
        try:
            if self._batcher:
                self._batcher.close()
            if self._capture_ahead:
                self._capture_ahead.shutdown()
            if self._capture:
                self._capture.close()
        finally:
            shutil.rmtree(self._model_dir, ignore_errors=True)


def _model_failed(error: Exception) -> InvocationError:
    return toolkit_error(error) or InvocationError(500, f"the model failed: {type(error).__name__}: {error}")


_RUNTIME_PATH = re.compile(r"/endpoints/(?P<name>[^/]+)/invocations")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects
    server_version = "scones-endpoint"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    timeout = IDLE_TIMEOUT_SECONDS
    server: _PooledHTTPServer

    def do_GET(self):
        if urlsplit(self.path).path == "/ping":
            self._answer(200, b"", "text/plain")
        else:
            self._error(404, "UnknownOperationException", f"no operation at GET {self.path}")

    def do_POST(self):
        path = urlsplit(self.path).path
        endpoints = self.server.endpoints
        if match := _RUNTIME_PATH.fullmatch(path):
            name = unquote(match["name"])
            if name not in endpoints:
                return self._error(400, "ValidationError", f"Endpoint {name} of account {ACCOUNT_ID} not found.")
            self._invoke(endpoints[name], runtime_path=True)
        elif path == "/invocations":
            if len(endpoints) != 1:
                return self._error(
                    400,
                    "ValidationError",
                    f"this server serves {len(endpoints)} endpoints: POST /endpoints/{{name}}/invocations",
                )
            self._invoke(next(iter(endpoints.values())), runtime_path=False)
        elif path == "/local/upload-captures":  # not SageMaker's: a local caller about to read every record
            if self._read_body() is None:
                return
            try:
                _each(Endpoint.upload_captures, endpoints.values())
            except CaptureError as error:
                return self._error(503, "ServiceUnavailable", str(error))
            self._answer(200, b"{}", "application/json")
        else:
            self._error(404, "UnknownOperationException", f"no operation at POST {self.path}")

    def handle_expect_100(self):
        # A client that waits for "100 Continue" is refused an oversized body before sending any of it.
        if self._declared_length() > MAX_PAYLOAD_BYTES:
            self._refuse_oversized()
            return False
        return super().handle_expect_100()

    def _invoke(self, endpoint: Endpoint, runtime_path: bool) -> None:
        body = self._read_body()
        if body is None:
            return
        accept = self.headers.get("Accept") or DEFAULT_ACCEPT
        try:
            answer, answer_type = endpoint.invoke(
                body,
                self.headers.get("Content-Type", ""),
                DEFAULT_ACCEPT if accept == "*/*" else accept,
                self.headers.get("X-Amzn-SageMaker-Inference-Id"),
            )
        except InvocationError as error:
            if runtime_path:
                side = "client" if error.status < 500 else "server"
                self._error(
                    424,
                    "ModelError",
                    f'Received {side} error ({error.status}) from primary with message "{error.message}". '
                    "See the local endpoint server's log for more information.",
                    OriginalStatusCode=error.status,
                    OriginalMessage=error.message,
                )
            else:
                self._answer(
                    error.status,
                    json.dumps({"code": error.status, "message": error.message}).encode(),
                    "application/json",
                )
                self.log_message("%s answered %d: %s", self.requestline, error.status, error.message)
        except CaptureError as error:
            self._error(
                503,
                "ServiceUnavailable",
                f"{error}; the answer is withheld so that every answer has its record: try again",
            )
        else:
            self._answer(200, answer, answer_type, {"x-Amzn-Invoked-Production-Variant": VARIANT_NAME})

    def _declared_length(self) -> int:
        try:
            return int(self.headers.get("Content-Length", ""))
        except ValueError:
            return -1

    def _read_body(self) -> bytes | None:
        length = self._declared_length()
        if length < 0:
            self.close_connection = True
            self._error(411, "ValidationError", "a request body with a Content-Length header is required")
            return None
        if length > MAX_PAYLOAD_BYTES:
            if length <= DISCARD_LIMIT_BYTES:
                self._discard(length)
            self._refuse_oversized()
            return None
        return self.rfile.read(length)

    def _discard(self, length: int) -> None:
        while length > 0 and (chunk := self.rfile.read(min(length, 65536))):
            length -= len(chunk)

    def _refuse_oversized(self) -> None:
        self.close_connection = True
        # No error type: botocore then names the error by its status, as it does the real service's 413.
        self._error(413, None, f"HTTP content length exceeded {MAX_PAYLOAD_BYTES} bytes.")

    def _error(self, status: int, error_type: str | None, message: str, **fields) -> None:
        self.log_message("%s answered %d %s: %s", self.requestline, status, error_type or "", message)
        headers = {"x-amzn-ErrorType": error_type} if error_type else {}
        self._answer(status, json.dumps({"Message": message, **fields}).encode(), "application/json", headers)

    def _answer(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        pass  # errors are logged with their message by _error; successes are not logged

    def log_error(self, format, *args):
        if not format.startswith("Request timed out"):  # an idle keep-alive connection was closed: routine
            super().log_error(format, *args)


class _PooledHTTPServer(HTTPServer):
    """An HTTPServer whose connections are served by a fixed pool of threads, so a flood cannot exhaust memory:
    at most `workers` requests are read at once, `workers` more connections wait, the rest wait in the backlog."""

    request_queue_size = 128  # the listen backlog: socketserver's 5 overflows when clients connect at once

    def __init__(self, address: tuple[str, int], endpoints: dict[str, Endpoint], workers: int):
        super().__init__(address, _Handler)
        self.endpoints = endpoints
        self._accepted: queue.Queue[tuple[socket.socket, tuple] | None] = queue.Queue(maxsize=workers)
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._serve_connections, name=f"endpoint-worker-{number}", daemon=True)
            for number in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def process_request(self, request, client_address):
        self._accepted.put((request, client_address))

    def _serve_connections(self) -> None:
        while (accepted := self._accepted.get()) is not None:
            request, client_address = accepted
            with self._lock:
                self._connections.add(request)
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                with self._lock:
                    self._connections.discard(request)
                self.shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client gone is no news
            super().handle_error(request, client_address)

    def stop_workers(self) -> None:
        """End every connection once its current answer is out, and the workers with them."""
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RD)  # a worker waiting for the next request sees the end
        for _ in self._workers:
            self._accepted.put(None)
        for worker in self._workers:
            worker.join()


class EndpointServer:
    """Endpoints served over HTTP in a background thread until `close` (also a context manager).

    Capture records are spooled in `spool_dir`, a folder per endpoint, until uploaded (see CaptureSpool): a
    server started on the folder of one that was killed uploads what it left. Without one, a temporary folder
    is used, removed on close once its records are uploaded.
    """

    def __init__(
        self,
        specs: Iterable[EndpointSpec],
        port: int = 0,
        host: str = "127.0.0.1",
        workers: int = DEFAULT_WORKERS,
        spool_dir: Path | None = None,
    ):
        inference_slots = threading.Semaphore(os.cpu_count() or 1)
        self._temporary_spool = spool_dir is None
        self._spool_dir = Path(tempfile.mkdtemp(prefix="scones-endpoint-spool-") if spool_dir is None else spool_dir)
        self._endpoints: dict[str, Endpoint] = {}
        try:
            for spec in specs:
                if spec.name in self._endpoints:
                    raise ValueError(f"two endpoints are named {spec.name}")
                self._endpoints[spec.name] = Endpoint(spec, inference_slots, self._spool_dir)
            try:
                self._httpd = _PooledHTTPServer((host, port), self._endpoints, workers)
            except OSError as error:
                raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
        except BaseException:
            self._close_endpoints()
            raise
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="endpoint-server", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}"

    def upload_captures(self) -> None:
        """Store every capture record written so far in S3; raises CaptureError if some could not be."""
        _each(Endpoint.upload_captures, self._endpoints.values())

    def close(self) -> None:
        """Stop accepting, finish the requests in progress, upload their captures, remove the model copies;
        raises CaptureError if some records could not be uploaded (they stay in the spool folder)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.stop_workers()
        self._close_endpoints()

    def _close_endpoints(self) -> None:
        _each(Endpoint.close, self._endpoints.values())
        if self._temporary_spool:
            shutil.rmtree(self._spool_dir, ignore_errors=True)

    def __enter__(self) -> EndpointServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _each(action: Callable[[Endpoint], None], endpoints: Iterable[Endpoint]) -> None:
    """The action on every endpoint, even when it fails on some; raises CaptureError if it failed on any."""
    failures = []
    for endpoint in endpoints:
        try:
            action(endpoint)
        except CaptureError as error:
            failures.append(str(error))
    if failures:
        raise CaptureError("; ".join(failures))
