"""Data capture: Model Monitor's JSON Lines records, spooled on disk before each answer and uploaded to S3.

Records go to `<destination>/{endpoint}/AllTraffic/YYYY/MM/DD/HH/` in S3 (boto3 honours `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`). Like SageMaker, files of records are uploaded in the background, every
UPLOAD_INTERVAL_SECONDS and when the server stops, not an object per request. A sampled request is answered only
once its record is a complete line in a spool file, written to the OS in one call, so every answer a client
received has its record even if the server is killed then (not if the machine crashes: nothing is fsynced); the
next server started on the same spool folder uploads what was left as it starts (see CaptureSpool).

A multi-megabyte photo is 4/3 as many bytes of base64 in its record: those are spliced into the JSON line rather
than run through the JSON encoder (see record_line), and the server encodes a large request body while the model
works on it (see server.Endpoint), so that what is left on the answer's path is the spool write.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import sys
import threading
import uuid
from datetime import datetime
from pathlib import Path

import boto3

from local.endpoint.handler import media_type
from local.endpoint.spec import VARIANT_NAME, CaptureSpec
from monitoring.captures import split_s3_uri

UPLOAD_INTERVAL_SECONDS = 0.2  # how often spooled capture records are uploaded to S3


class CaptureError(Exception):
    """A capture record could not be stored."""


class SpoolBusy(RuntimeError):
    """Another endpoint server spools captures in the folder."""


def capture_record(
    spec: CaptureSpec,
    request: bytes,
    request_type: str,
    answer: bytes,
    answer_type: str,
    inference_id: str | None,
    inference_time: datetime,
    endpoint_input: dict | None = None,
) -> dict:
    """One Model Monitor capture record, its keys in the order SageMaker writes them; `endpoint_input`, if given,
    is `captured(spec, request, request_type, "INPUT")` computed beforehand."""
    data = {}
    if "Input" in spec.modes:
        data["endpointInput"] = endpoint_input or captured(spec, request, request_type, "INPUT")
    if "Output" in spec.modes:
        data["endpointOutput"] = captured(spec, answer, answer_type, "OUTPUT")
    metadata = {"eventId": str(uuid.uuid4())}
    if inference_id:
        metadata["inferenceId"] = inference_id
    metadata["inferenceTime"] = inference_time.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"captureData": data, "eventMetadata": metadata, "eventVersion": "0"}


def captured(spec: CaptureSpec, body: bytes, content_type: str, mode: str) -> dict:
    """The record's `endpointInput` (mode "INPUT") or `endpointOutput` ("OUTPUT") for a body."""
    kind = media_type(content_type)
    encoding = (
        "JSON"
        if kind in _lowered(spec.json_content_types)
        else "CSV"
        if kind in _lowered(spec.csv_content_types)
        else "BASE64"
    )
    try:
        data = body.decode("utf-8") if encoding != "BASE64" else None
    except UnicodeDecodeError:
        data = None
    if data is None:
        encoding, data = "BASE64", base64.b64encode(body).decode("ascii")
    return {"observedContentType": content_type, "mode": mode, "data": data, "encoding": encoding}


def _lowered(content_types: tuple[str, ...]) -> set[str]:
    return {content_type.lower() for content_type in content_types}


def record_line(record: dict) -> list[bytes]:
    """The record as one JSON line, the bytes of `json.dumps(record, separators=(",", ":")) + "\n"`, in pieces.

    Base64 data (as `captured` makes it: only letters, digits, "+", "/" and "=", which JSON never escapes) is
    spliced in as it is, not run through the JSON encoder, which takes about 5 ns a character holding the GIL:
    20 ms or more for the 4 MB of a 3 MB photo."""
    token = uuid.uuid4().hex
    spliced, parts = [], {}
    for name, part in record.get("captureData", {}).items():
        if part.get("encoding") == "BASE64":
            parts[name] = {**part, "data": f"{token}{len(spliced)}"}
            spliced.append(part["data"].encode("ascii"))
        else:
            parts[name] = part
    text = json.dumps({**record, "captureData": parts} if spliced else record, separators=(",", ":")) + "\n"
    pieces = []
    for number, data in enumerate(spliced):
        before, text = text.split(f'"{token}{number}"', 1)
        pieces += [f'{before}"'.encode(), data, b'"']
    return [*pieces, text.encode("utf-8")]


class CaptureSpool:
    """An endpoint's capture records: each appended to a spool file before its request is answered, uploaded to S3
    in the background.

    A record is one line written by one `writev` call under a lock, so it is complete on disk (in the OS's page
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
        self._encryption = (
            {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": spec.kms_key_id} if spec.kms_key_id else {}
        )
        self._s3 = boto3.session.Session().client("s3")
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        # Held open for the server's life (closed in close()): one server at a time appends to and uploads these files.
        self._owner = open(directory / ".lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._owner.close()
            raise SpoolBusy(f"another endpoint server spools captures in {directory}") from None
        self._spool: tuple[int, str] | None = None  # the open spool file: its descriptor and hour
        self._write_lock = threading.Lock()
        self._upload_lock = threading.Lock()
        self._last_error = ""
        self._closing = threading.Event()
        self._upload_logging_errors()  # what a server that was killed left
        self._thread = threading.Thread(target=self._upload_periodically, name=f"capture-{endpoint_name}", daemon=True)
        self._thread.start()

    def write(self, record: dict, inference_time: datetime) -> None:
        """Append the record to the spool; raises CaptureError if it could not be written whole."""
        line = record_line(record)
        size = sum(map(len, line))
        hour = f"{inference_time:%Y-%m-%d-%H}"
        with self._write_lock:
            try:
                if self._spool is None or self._spool[1] != hour:
                    self._close_spool()
                    name = (
                        f"{hour}-{inference_time:%M-%S}-{inference_time.microsecond // 1000:03d}-{uuid.uuid4()}.jsonl"
                    )
                    self._spool = os.open(self._directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND), hour
                written = os.writev(self._spool[0], line)  # one call: the line is whole or cut short, never split
                if written == size:
                    return
                failure = f"{written} of {size} bytes written"
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
                raise CaptureError(
                    f"capture records not stored in s3://{self._bucket}/{self._prefix} "
                    f"(kept in {self._directory}): {'; '.join(failures)}"
                )

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
        body = body[: body.rfind(b"\n") + 1]  # without a line whose write was cut short
        if body:
            key = f"{self._prefix}/{path.name[:13].replace('-', '/')}/{path.name[14:]}"
            self._s3.put_object(
                Bucket=self._bucket, Key=key, Body=body, ContentType="application/jsonl", **self._encryption
            )
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
                print(
                    f"local.endpoint: {error}; retrying every {UPLOAD_INTERVAL_SECONDS}s", file=sys.stderr, flush=True
                )
            self._last_error = str(error)
