"""A local stand-in for SageMaker real-time endpoints, with Model Monitor's data capture.

An HTTP server on 127.0.0.1 serves one or more endpoints, each a model.tar.gz run by its own `code/inference.py`
under the handler contract of SageMaker's PyTorch inference container (`model_fn`, `input_fn`, `predict_fn`,
`output_fn`). It answers where boto3's `sagemaker-runtime` client sends `invoke_endpoint` when
`AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME` points at it (`POST /endpoints/{name}/invocations`), and at the container
paths `GET /ping` and `POST /invocations`.

Errors are those of the real service. On the runtime path, the container's own errors (415 for a content type
other than an image, 400 when `input_fn` cannot read the body, 500 when the model fails) reach the caller as
SageMaker passes them on: `ModelError`, HTTP 424, with `OriginalStatusCode`; `/invocations` answers them
directly. An unknown endpoint is a 400 `ValidationError`, a body over 6 MiB a 413.

Requests that arrive while the model is busy are predicted together: for a model whose input_fn answers a torch
tensor holding a batch of one, as the container's convention has it, one thread runs predict_fn on the inputs
waiting, concatenated, and gives each request its row (see PredictionBatcher; a predict_fn seen not to answer a
batch row by row gets its inputs one at a time). SageMaker's model server serves concurrent requests with
several worker processes; here one process serves them by batching, one batch at a time.

Data capture writes Model Monitor's JSON Lines records to `<destination>/{endpoint}/AllTraffic/YYYY/MM/DD/HH/`
in S3 (boto3 honours `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`). Like SageMaker, it uploads files of records in
the background, every UPLOAD_INTERVAL_SECONDS and when the server stops, not an object per request. A sampled
request is answered only once its record is a complete line in a spool file, written to the OS in one call, so
every answer a client received has its record even if the server is killed then (not if the machine crashes:
nothing is fsynced); the next server started on the same spool folder uploads what was left as it starts (see
CaptureSpool). A request whose record could not be written is answered 503 `ServiceUnavailable` (retried by
boto3) instead of 200, where SageMaker would answer and lose the record. `POST /local/upload-captures` (not
SageMaker's) uploads every record written so far, for a caller about to read them.

Run it as `python -m local.endpoint --spec FILE --spool-dir DIR [--port N] [--ready-file FILE]`; see `main`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import importlib.util
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable
from urllib.parse import quote, unquote, urlsplit

import boto3

from monitoring.captures import split_s3_uri

VARIANT_NAME = "AllTraffic"
ACCOUNT_ID = "123456789012"  # moto's default account; the real service names the caller's in "not found" errors
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker's InvokeEndpoint limit
CONTENT_TYPES = ("image/png", "image/jpeg", "application/x-image")
DEFAULT_ACCEPT = "application/json"  # the inference toolkit's default when the caller sends no Accept
CAPTURE_MODES = ("Input", "Output")
DEFAULT_WORKERS = 32
IDLE_TIMEOUT_SECONDS = 5  # frees a worker held by an idle keep-alive connection
UPLOAD_INTERVAL_SECONDS = 0.2  # how often spooled capture records are uploaded to S3
MAX_BATCH_SIZE = 16  # inputs predicted together at most
DISCARD_LIMIT_BYTES = 64 * 1024 * 1024  # an oversized body up to this is read and dropped so the 413 reaches the client


# ------------------------------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class CaptureSpec:
    """An endpoint's data capture, as its EndpointConfig's DataCaptureConfig sets it."""

    destination: str  # DestinationS3Uri, e.g. "s3://bucket/data_capture"
    sampling_percentage: int = 100  # InitialSamplingPercentage
    modes: tuple[str, ...] = CAPTURE_MODES
    json_content_types: tuple[str, ...] = ()  # captured as text with encoding "JSON"; other types as "BASE64"
    csv_content_types: tuple[str, ...] = ()  # captured as text with encoding "CSV"
    kms_key_id: str | None = None  # KmsKeyId: captures are written with SSE-KMS under this key

    def __post_init__(self):
        if not self.destination.startswith("s3://") or not split_s3_uri(self.destination)[0]:
            raise ValueError(f"capture destination {self.destination!r} is not an s3://bucket[/prefix] URI")
        if not 0 <= self.sampling_percentage <= 100:
            raise ValueError(f"sampling percentage {self.sampling_percentage} is outside 0..100")
        if not self.modes or not set(self.modes) <= set(CAPTURE_MODES):
            raise ValueError(f"capture modes {self.modes} are not a non-empty subset of {CAPTURE_MODES}")

    @classmethod
    def from_data_capture_config(cls, config: dict | None) -> CaptureSpec | None:
        """The capture a DataCaptureConfig (CloudFormation or API shape) asks for; None when it is off."""
        if not config or not config.get("EnableCapture", True):
            return None
        modes = set()
        for option in config["CaptureOptions"]:
            mode = option["CaptureMode"]
            modes.update(CAPTURE_MODES if mode == "InputAndOutput" else (mode,))
        header = config.get("CaptureContentTypeHeader") or {}
        return cls(destination=config["DestinationS3Uri"],
                   sampling_percentage=int(config["InitialSamplingPercentage"]),
                   modes=tuple(mode for mode in CAPTURE_MODES if mode in modes),
                   json_content_types=tuple(header.get("JsonContentTypes", ())),
                   csv_content_types=tuple(header.get("CsvContentTypes", ())),
                   kms_key_id=config.get("KmsKeyId"))


@dataclass(frozen=True)
class EndpointSpec:
    name: str  # EndpointName
    model_data: Path  # a local model.tar.gz
    capture: CaptureSpec | None = None


def spec_from_json(data: dict) -> EndpointSpec:
    """An EndpointSpec from its JSON form (as `spec_to_json` writes it)."""
    capture = data.get("capture")
    if capture is not None:
        capture = CaptureSpec(**{key: tuple(value) if isinstance(value, list) else value
                                 for key, value in capture.items()})
    return EndpointSpec(name=data["name"], model_data=Path(data["model_data"]), capture=capture)


def spec_to_json(spec: EndpointSpec) -> dict:
    capture = spec.capture
    return {"name": spec.name, "model_data": str(spec.model_data),
            "capture": None if capture is None else {
                "destination": capture.destination, "sampling_percentage": capture.sampling_percentage,
                "modes": list(capture.modes), "json_content_types": list(capture.json_content_types),
                "csv_content_types": list(capture.csv_content_types), "kms_key_id": capture.kms_key_id}}


# ----------------------------------------------------------------------------------------- model handler

class InvocationError(Exception):
    """The container's answer to a request it could not serve: an HTTP status and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class InferenceHandler:
    """The functions of a model's inference.py, with the toolkit's defaults where it defines none."""

    model_fn: Callable
    input_fn: Callable
    predict_fn: Callable
    output_fn: Callable


def default_input_fn(request_body, content_type):
    # The toolkit's default decoders read JSON, CSV and NPY but no image type: SageMaker answers 415 as well.
    raise InvocationError(415, f"the model's inference.py defines no input_fn to read {content_type}")


def default_predict_fn(data, model):
    import torch
    with torch.no_grad():
        return model(data)


def default_output_fn(prediction, accept):
    return json.dumps(prediction.tolist() if hasattr(prediction, "tolist") else prediction), "application/json"


def load_inference_handler(code_dir: Path, module_name: str) -> InferenceHandler:
    """Import `code_dir/inference.py` as `module_name`, with `code_dir` on sys.path while it imports."""
    module_spec = importlib.util.spec_from_file_location(module_name, code_dir / "inference.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(code_dir))
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        sys.path.remove(str(code_dir))
    return _handler_of(module)


def _handler_of(module: ModuleType) -> InferenceHandler:
    if not hasattr(module, "model_fn"):
        raise ValueError(f"{module.__file__} defines no model_fn")
    if hasattr(module, "transform_fn"):
        raise ValueError(f"{module.__file__} defines transform_fn, which this server does not support")
    return InferenceHandler(model_fn=module.model_fn,
                            input_fn=getattr(module, "input_fn", default_input_fn),
                            predict_fn=getattr(module, "predict_fn", default_predict_fn),
                            output_fn=getattr(module, "output_fn", default_output_fn))


def _answer_of(output, accept: str) -> tuple[bytes, str]:
    """output_fn's result as (body, content type): the toolkit takes a body alone, typed as Accept, or a pair."""
    body, content_type = output if isinstance(output, tuple) else (output, accept)
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray)):
        raise TypeError(f"output_fn returned {type(body).__name__}, not bytes or str")
    return bytes(body), content_type


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


# ---------------------------------------------------------------------------------------------- capture

class CaptureError(Exception):
    """A capture record could not be stored."""


def capture_record(spec: CaptureSpec, request: bytes, request_type: str, answer: bytes, answer_type: str,
                   inference_id: str | None, inference_time: datetime) -> dict:
    """One Model Monitor capture record, its keys in the order SageMaker writes them."""
    data = {}
    if "Input" in spec.modes:
        data["endpointInput"] = _captured(request, request_type, "INPUT", spec)
    if "Output" in spec.modes:
        data["endpointOutput"] = _captured(answer, answer_type, "OUTPUT", spec)
    metadata = {"eventId": str(uuid.uuid4())}
    if inference_id:
        metadata["inferenceId"] = inference_id
    metadata["inferenceTime"] = inference_time.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"captureData": data, "eventMetadata": metadata, "eventVersion": "0"}


def _captured(body: bytes, content_type: str, mode: str, spec: CaptureSpec) -> dict:
    kind = media_type(content_type)
    encoding = ("JSON" if kind in _lowered(spec.json_content_types)
                else "CSV" if kind in _lowered(spec.csv_content_types) else "BASE64")
    try:
        data = body.decode("utf-8") if encoding != "BASE64" else None
    except UnicodeDecodeError:
        data = None
    if data is None:
        encoding, data = "BASE64", base64.b64encode(body).decode("ascii")
    return {"observedContentType": content_type, "mode": mode, "data": data, "encoding": encoding}


def _lowered(content_types: tuple[str, ...]) -> set[str]:
    return {content_type.lower() for content_type in content_types}


class CaptureSpool:
    """An endpoint's capture records: each appended to a spool file before its request is answered, uploaded to S3
    in the background.

    A record is one line written by one `write` call under a lock, so it is complete on disk (in the OS's page
    cache) before `write` returns, and survives the server's death. Spool files are named after the S3 objects
    they become, `YYYY-MM-DD-HH-MM-SS-mmm-{uuid}.jsonl` for `{prefix}/YYYY/MM/DD/HH/MM-SS-mmm-{uuid}.jsonl`, after
    their first record's time; a file holds records of one hour only. Every UPLOAD_INTERVAL_SECONDS, and on
    `upload`, the file being appended to is closed and every closed file is stored as its object (one PutObject,
    so no line is ever partial; the same key if an upload is repeated) and deleted. A file left by a server that
    was killed is uploaded when a server takes the directory again; a line it left incomplete (a write cut short,
    whose request was answered 503) is dropped then.
    """

    def __init__(self, spec: CaptureSpec, endpoint_name: str, directory: Path):
        self._bucket, prefix = split_s3_uri(spec.destination)
        self._prefix = "/".join(part for part in (prefix.strip("/"), endpoint_name, VARIANT_NAME) if part)
        self._encryption = ({"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": spec.kms_key_id}
                            if spec.kms_key_id else {})
        self._s3 = boto3.session.Session().client("s3")
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._owner = open(directory / ".lock", "w")  # one server at a time appends to and uploads these files
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._owner.close()
            raise RuntimeError(f"another endpoint server spools captures in {directory}") from None
        self._spool: tuple[int, str] | None = None  # the open spool file: its descriptor and hour
        self._write_lock = threading.Lock()
        self._upload_lock = threading.Lock()
        self._last_error = ""
        self._closing = threading.Event()
        self._upload_logging_errors()  # what a server that was killed left
        self._thread = threading.Thread(target=self._upload_periodically, name=f"capture-{endpoint_name}",
                                        daemon=True)
        self._thread.start()

    def write(self, record: dict, inference_time: datetime) -> None:
        """Append the record to the spool; raises CaptureError if it could not be written whole."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        hour = f"{inference_time:%Y-%m-%d-%H}"
        with self._write_lock:
            try:
                if self._spool is None or self._spool[1] != hour:
                    self._close_spool()
                    name = (f"{hour}-{inference_time:%M-%S}-{inference_time.microsecond // 1000:03d}-"
                            f"{uuid.uuid4()}.jsonl")
                    self._spool = os.open(self._directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND), hour
                written = os.write(self._spool[0], line)
                if written == len(line):
                    return
                failure = f"{written} of {len(line)} bytes written"
            except OSError as error:
                failure = str(error)
            self._close_spool()  # the next record starts a new file; an incomplete line here is dropped on upload
        raise CaptureError(f"the capture record was not written to {self._directory}: {failure}")

    def upload(self) -> None:
        """Store every record written so far in S3; raises CaptureError if some are still only in the spool."""
        with self._upload_lock:
            with self._write_lock:
                self._close_spool()
                paths = sorted(self._directory.glob("*.jsonl"))
            failures = []
            for path in paths:
                try:
                    self._store(path)
                except Exception as error:  # kept in the spool for the next upload
                    failures.append(f"{path.name}: {error}")
            if failures:
                raise CaptureError(f"capture records not stored in s3://{self._bucket}/{self._prefix} "
                                   f"(kept in {self._directory}): {'; '.join(failures)}")

    def close(self) -> None:
        """Upload every record written, then stop; raises CaptureError if some could not be."""
        self._closing.set()
        self._thread.join()
        try:
            self.upload()
        finally:
            self._owner.close()

    def _close_spool(self) -> None:
        if self._spool is not None:
            with contextlib.suppress(OSError):
                os.close(self._spool[0])
            self._spool = None

    def _store(self, path: Path) -> None:
        body = path.read_bytes()
        body = body[:body.rfind(b"\n") + 1]  # without a line whose write was cut short
        if body:
            key = f"{self._prefix}/{path.name[:13].replace('-', '/')}/{path.name[14:]}"
            self._s3.put_object(Bucket=self._bucket, Key=key, Body=body, ContentType="application/jsonl",
                                **self._encryption)
        path.unlink()

    def _upload_periodically(self) -> None:
        while not self._closing.wait(UPLOAD_INTERVAL_SECONDS):
            self._upload_logging_errors()

    def _upload_logging_errors(self) -> None:
        try:
            self.upload()
            self._last_error = ""
        except CaptureError as error:
            if str(error) != self._last_error:  # once, not every interval while the store is down
                print(f"local.endpoint: {error}; retrying every {UPLOAD_INTERVAL_SECONDS}s", file=sys.stderr,
                      flush=True)
            self._last_error = str(error)


# ------------------------------------------------------------------------------------------------ batching

class _Waiting:
    """An input waiting for its prediction."""

    def __init__(self, data):
        self.data = data
        self.prediction = None
        self.error: Exception | None = None
        self.done = threading.Event()


class PredictionBatcher:
    """Runs a model's predict_fn on batches: every input waiting when the model is free, stacked.

    It takes the inputs that input_fn answers as a torch tensor holding a batch of one (the PyTorch container's
    convention): predict_fn gets those waiting concatenated along the first dimension, and each input gets back
    its row, a batch of one, as predict_fn would answer for it alone. No input waits for others to come: a lone
    request is predicted alone, on its own thread (a hand-off to the batching thread costs a millisecond or two
    here), and the requests that arrive while the model is busy form the next batch. Batching stops
    for good, each input then predicted alone, once predict_fn is seen not to batch: its first batch's answer is
    checked against those for each input alone, and a batch it fails on while each input alone succeeds counts.
    """

    def __init__(self, predict_fn: Callable, model, name: str):
        self._predict_fn = predict_fn
        self._model = model
        self._name = name
        self._queue: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._model_lock = threading.Lock()  # held while predict_fn runs: one batch at a time
        self._batching = True
        self._checked = False  # a batch's answer was found equal to the answers for its inputs alone
        self._thread = threading.Thread(target=self._run, name=f"predict-{name}", daemon=True)
        self._thread.start()

    @staticmethod
    def takes(data) -> bool:
        torch = sys.modules.get("torch")  # a model that answers tensors has imported it
        return torch is not None and isinstance(data, torch.Tensor) and data.dim() > 0 and data.shape[0] == 1

    def predict(self, data):
        """predict_fn's answer for `data`; raises what predict_fn raised for it."""
        waiting = _Waiting(data)
        if self._model_lock.acquire(blocking=False):
            try:
                self._predict_group([waiting])
            finally:
                self._model_lock.release()
        else:
            self._queue.put(waiting)
            waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.prediction

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            with self._model_lock:
                groups = {}  # inputs of one shape and type are stacked together
                for waiting in [first, *self._waiting(MAX_BATCH_SIZE - 1)]:
                    data = waiting.data
                    groups.setdefault((data.shape, data.dtype, data.device), []).append(waiting)
                for group in groups.values():
                    self._predict_group(group)

    def _predict_group(self, group: list[_Waiting]) -> None:
        try:
            self._predict(group)
        except BaseException as error:  # even predict_fn calling sys.exit() must fail only its own requests
            failure = error if isinstance(error, Exception) else RuntimeError(f"predict_fn raised {error!r}")
            for waiting in group:
                if waiting.prediction is None and waiting.error is None:
                    waiting.error = failure
        finally:
            for waiting in group:
                waiting.done.set()

    def _waiting(self, most: int) -> list[_Waiting]:
        taken = []
        while len(taken) < most:
            try:
                waiting = self._queue.get_nowait()
            except queue.Empty:
                break
            if waiting is None:  # closing: for the loop to end after this batch
                self._queue.put(None)
                break
            taken.append(waiting)
        return taken

    def _predict(self, group: list[_Waiting]) -> None:
        if not self._batching or len(group) == 1:
            for waiting in group:
                self._predict_alone(waiting)
            return
        torch = sys.modules["torch"]
        try:
            predictions = self._predict_fn(torch.cat([waiting.data for waiting in group]), self._model)
        except Exception:
            predictions = None  # predicting each input alone tells whether an input or the batching failed
        rows = (isinstance(predictions, torch.Tensor) and predictions.dim() > 0
                and predictions.shape[0] == len(group))
        if rows and self._checked:
            for number, waiting in enumerate(group):
                waiting.prediction = predictions[number:number + 1]
            return
        for waiting in group:
            self._predict_alone(waiting)
        if rows:
            self._checked = self._batching = all(_same(waiting.prediction, predictions[number:number + 1])
                                                 for number, waiting in enumerate(group))
        elif predictions is not None or all(waiting.error is None for waiting in group):
            self._batching = False
        if not self._batching:
            print(f"local.endpoint: {self._name}: predict_fn does not answer a batch as its inputs one by one: "
                  "each input is predicted alone", file=sys.stderr, flush=True)

    def _predict_alone(self, waiting: _Waiting) -> None:
        try:
            waiting.prediction = self._predict_fn(waiting.data, self._model)
        except Exception as error:
            waiting.error = error


def _same(alone, row) -> bool:
    torch = sys.modules["torch"]
    try:
        return (isinstance(alone, torch.Tensor) and alone.shape == row.shape
                and torch.allclose(alone, row, rtol=1e-4, atol=1e-6))
    except RuntimeError:
        return False


# --------------------------------------------------------------------------------------------- endpoint

class Endpoint:
    """One endpoint: its model, loaded from a private copy of model.tar.gz, and its data capture."""

    def __init__(self, spec: EndpointSpec, inference_slots: threading.Semaphore, spool_dir: Path):
        self.spec = spec
        self._inference_slots = inference_slots
        self._model_dir = Path(tempfile.mkdtemp(prefix=f"scones-endpoint-{spec.name}-"))
        self._batcher = self._capture = None
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
        except BaseException:
            self.close()
            raise

    def invoke(self, body: bytes, content_type: str, accept: str, inference_id: str | None = None) -> tuple[bytes, str]:
        """The model's answer (body, content type), captured if sampled; raises InvocationError or CaptureError."""
        if media_type(content_type) not in CONTENT_TYPES:
            raise InvocationError(415, f"content type {content_type!r} is not supported: send one of "
                                       f"{', '.join(CONTENT_TYPES)}")
        capture = self.spec.capture
        answer, answer_type = self._predict(body, content_type, accept)
        if capture is not None and random.random() * 100 < capture.sampling_percentage:
            now = datetime.now(timezone.utc)
            self._capture.write(capture_record(capture, body, content_type, answer, answer_type, inference_id, now),
                                now)
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
                raise InvocationError(400, f"input_fn could not read the request body: "
                                           f"{type(error).__name__}: {error}") from error
            batched = self._batcher.takes(data)
            if not batched:
                try:
                    prediction = self._handler.predict_fn(data, self._model)
                except Exception as error:
                    raise _model_failed(error) from error
        try:
            if batched:
                prediction = self._batcher.predict(data)
            return _answer_of(self._handler.output_fn(prediction, accept), accept)
        except Exception as error:
            raise _model_failed(error) from error

    def close(self) -> None:
        """Stop, once every capture record is uploaded; raises CaptureError if some could not be."""
        try:
            if self._batcher:
                self._batcher.close()
            if self._capture:
                self._capture.close()
        finally:
            shutil.rmtree(self._model_dir, ignore_errors=True)


def _model_failed(error: Exception) -> InvocationError:
    return InvocationError(500, f"the model failed: {type(error).__name__}: {error}")


# ------------------------------------------------------------------------------------------------- HTTP

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
                return self._error(400, "ValidationError", f"this server serves {len(endpoints)} endpoints: "
                                                           "POST /endpoints/{name}/invocations")
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
            answer, answer_type = endpoint.invoke(body, self.headers.get("Content-Type", ""),
                                                  DEFAULT_ACCEPT if accept == "*/*" else accept,
                                                  self.headers.get("X-Amzn-SageMaker-Inference-Id"))
        except InvocationError as error:
            if runtime_path:
                side = "client" if error.status < 500 else "server"
                self._error(424, "ModelError",
                            f'Received {side} error ({error.status}) from primary with message "{error.message}". '
                            "See the local endpoint server's log for more information.",
                            OriginalStatusCode=error.status, OriginalMessage=error.message)
            else:
                self._answer(error.status, json.dumps({"code": error.status, "message": error.message}).encode(),
                             "application/json")
                self.log_message("%s answered %d: %s", self.requestline, error.status, error.message)
        except CaptureError as error:
            self._error(503, "ServiceUnavailable",
                        f"{error}; the answer is withheld so that every answer has its record: try again")
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
        self._workers = [threading.Thread(target=self._serve_connections, name=f"endpoint-worker-{number}",
                                          daemon=True) for number in range(workers)]
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
                try:
                    connection.shutdown(socket.SHUT_RD)  # a worker waiting for the next request sees the end
                except OSError:
                    pass
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

    def __init__(self, specs: Iterable[EndpointSpec], port: int = 0, host: str = "127.0.0.1",
                 workers: int = DEFAULT_WORKERS, spool_dir: Path | None = None):
        inference_slots = threading.Semaphore(os.cpu_count() or 1)
        self._temporary_spool = spool_dir is None
        self._spool_dir = Path(tempfile.mkdtemp(prefix="scones-endpoint-spool-") if spool_dir is None else spool_dir)
        self._endpoints: dict[str, Endpoint] = {}
        try:
            for spec in specs:
                if spec.name in self._endpoints:
                    raise ValueError(f"two endpoints are named {spec.name}")
                self._endpoints[spec.name] = Endpoint(spec, inference_slots, self._spool_dir)
            self._httpd = _PooledHTTPServer((host, port), self._endpoints, workers)
        except BaseException:
            self._close_endpoints()
            raise
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="endpoint-server", daemon=True)
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


# -------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m local.endpoint",
        description="Serve SageMaker endpoints locally until SIGTERM or SIGINT.")
    parser.add_argument("--spec", type=Path, required=True,
                        help='JSON file {"endpoints": [spec, ...]}, each spec as local.endpoint.spec_to_json writes it')
    parser.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"threads serving connections (default {DEFAULT_WORKERS})")
    parser.add_argument("--spool-dir", type=Path, required=True,
                        help="folder where capture records are written before their answers and kept until uploaded "
                             "to S3; a server started on the folder of one that was killed uploads what it left")
    parser.add_argument("--ready-file", type=Path,
                        help='once serving, write {"port": N, "pid": P} here; removed when the server stops')
    args = parser.parse_args(argv)

    # One torch thread: the images are 32x32 and concurrent requests are batched; OpenMP's threads would
    # compete with the request threads for the cores (2 here: p50 at concurrency 1 went from 4 to 10 ms).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    specs = [spec_from_json(entry) for entry in json.loads(args.spec.read_text())["endpoints"]]
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    with EndpointServer(specs, port=args.port, host=args.host, workers=args.workers,
                        spool_dir=args.spool_dir) as server:
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


if __name__ == "__main__":
    main()
