"""The local SageMaker endpoint: boto3's sagemaker-runtime client against the real server, captures in moto's S3."""

import base64
import http.client
import io
import json
import os
import random
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer
from PIL import Image, ImageStat

import local.endpoint.capture as capture_module
from local.endpoint import (
    MAX_PAYLOAD_BYTES,
    CaptureError,
    CaptureSpec,
    CaptureSpool,
    EndpointServer,
    EndpointSpec,
    spec_from_json,
    spec_to_json,
)
from local.endpoint.batching import PredictionBatcher
from local.endpoint.capture import capture_record, record_line
from local.endpoint.handler import load_inference_handler
from local.endpoint.server import CAPTURE_AHEAD_BYTES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "scones-endpoint-tests"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

# A tiny model: p_bicycle is the image's mean red, 0..1. An image of CRASH_SIZE makes predict_fn fail.
TINY_INFERENCE = """
import io, json
from PIL import Image
from shares import red_share  # a sibling module in code/

def model_fn(model_dir):
    with open(f"{model_dir}/model.json") as settings:
        return json.load(settings)

def input_fn(request_body, content_type):
    with Image.open(io.BytesIO(request_body)) as image:
        return image.convert("RGB")

def predict_fn(image, model):
    if list(image.size) == model["crash_size"]:
        raise RuntimeError("the model crashed")
    share = red_share(image)
    return [share, 1 - share]

def output_fn(prediction, accept):
    return json.dumps(prediction), "application/json"
"""
TINY_SHARES = """
from PIL import ImageStat

def red_share(image):
    return ImageStat.Stat(image).mean[0] / 255
"""
CRASH_SIZE = (3, 5)


# ---------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png(color=(204, 10, 10), size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def unique_png(number: int) -> bytes:
    """A 32x32 PNG that no other number gives."""
    pixels = bytearray(random.Random(number).randbytes(32 * 32 * 3))
    pixels[:4] = number.to_bytes(4, "big")
    buffer = io.BytesIO()
    Image.frombytes("RGB", (32, 32), bytes(pixels)).save(buffer, "PNG")
    return buffer.getvalue()


def noise_png(number: int, side: int) -> bytes:
    """A side x side PNG of random pixels (incompressible: about 3 * side**2 bytes)."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(number).randbytes(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared_png(width: int, height: int, rows: bytes) -> bytes:
    """A greyscale PNG declaring width x height, with `rows` (filter byte + pixels per row) as its image data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def model_archive(directory: Path, files: dict[str, str]) -> Path:
    """A model.tar.gz holding `files` (path: text)."""
    archive_path = directory / f"model-{uuid.uuid4().hex[:6]}.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return archive_path


def new_destination() -> str:
    return f"s3://{BUCKET}/captures-{uuid.uuid4().hex[:8]}"


def stored_objects(s3, destination: str) -> dict[str, bytes]:
    prefix = destination.removeprefix(f"s3://{BUCKET}/")
    keys = [
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for item in page.get("Contents", [])
    ]
    return {key: s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def stored_records(s3, destination: str) -> list[dict]:
    records = []
    for body in stored_objects(s3, destination).values():
        assert body.endswith(b"\n")
        records += [json.loads(line) for line in body.decode().splitlines()]
    return records


def start_server_process(spec: EndpointSpec, spool_dir: Path, tmp_path: Path, **popen) -> tuple[subprocess.Popen, int]:
    """`python -m local.endpoint` serving spec, once it is ready: the process and its port."""
    spec_file = tmp_path / "endpoints.json"
    spec_file.write_text(json.dumps({"endpoints": [spec_to_json(spec)]}))
    ready_file = tmp_path / "endpoint.ready.json"
    ready_file.unlink(missing_ok=True)  # a killed server leaves its own
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "local.endpoint",
            "--spec",
            str(spec_file),
            "--port",
            "0",
            "--spool-dir",
            str(spool_dir),
            "--ready-file",
            str(ready_file),
        ],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        **popen,
    )  # where its model copy is left
    deadline = time.monotonic() + 60
    while not ready_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the endpoint server did not start")
        time.sleep(0.05)
    ready = json.loads(ready_file.read_text())
    assert ready["pid"] == process.pid
    return process, ready["port"]


def post(port: int, path: str, body: bytes, content_type: str | None = "image/png") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type} if content_type else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def ping(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/ping")
        return connection.getresponse().status
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3():
    """moto's S3 on a free port, with the AWS variables pointing boto3 (and child processes) at it."""
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        }.items():
            env.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
        server.stop()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return model_archive(
        tmp_path_factory.mktemp("tiny"),
        {
            "model.json": json.dumps({"crash_size": list(CRASH_SIZE)}),
            "code/inference.py": TINY_INFERENCE,
            "code/shares.py": TINY_SHARES,
        },
    )


@pytest.fixture
def serve(s3, tiny_model):
    """Start an EndpointServer for specs (default: the tiny model as "scones"); closed after the test."""
    servers = []

    def start(*specs: EndpointSpec, capture: CaptureSpec | None = None) -> EndpointServer:
        server = EndpointServer(specs or [EndpointSpec("scones", tiny_model, capture)])
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def runtime(monkeypatch):
    """A sagemaker-runtime client for a server, found through AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME; no retries."""

    def client(server: EndpointServer):
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", server.url)
        return boto3.client(
            "sagemaker-runtime", config=Config(retries={"mode": "standard", "max_attempts": 1}, max_pool_connections=16)
        )

    return client


# ------------------------------------------------------------------------------------------------ tests


def test_boto3_invocation_is_answered_and_captured_in_model_monitor_format(serve, runtime, s3):
    destination = new_destination()
    server = serve(capture=CaptureSpec(destination, json_content_types=("application/json",)))
    image = png(color=(204, 10, 10))

    response = runtime(server).invoke_endpoint(
        EndpointName="scones", ContentType="image/png", Body=image, InferenceId="order-17"
    )
    answer = response["Body"].read()
    assert post(server.port, "/local/upload-captures", b"", None) == (200, b"{}")

    assert json.loads(answer) == pytest.approx([0.8, 0.2])
    assert response["ContentType"] == "application/json"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    [(key, body)] = stored_objects(s3, destination).items()
    prefix = destination.removeprefix(f"s3://{BUCKET}/")
    layout = re.fullmatch(
        rf"{prefix}/scones/AllTraffic/(\d{{4}}/\d\d/\d\d/\d\d)/(\d\d-\d\d)-\d{{3}}-{UUID}\.jsonl", key
    )
    assert layout, key
    assert body.endswith(b"\n") and body.count(b"\n") == 1
    line = body.decode().rstrip("\n")
    record = json.loads(line)
    assert line == json.dumps(record, separators=(",", ":"))
    assert record == {
        "captureData": {
            "endpointInput": {
                "observedContentType": "image/png",
                "mode": "INPUT",
                "data": base64.b64encode(image).decode(),
                "encoding": "BASE64",
            },
            "endpointOutput": {
                "observedContentType": "application/json",
                "mode": "OUTPUT",
                "data": answer.decode(),
                "encoding": "JSON",
            },
        },
        "eventMetadata": {
            "eventId": record["eventMetadata"]["eventId"],
            "inferenceId": "order-17",
            "inferenceTime": record["eventMetadata"]["inferenceTime"],
        },
        "eventVersion": "0",
    }
    assert list(record) == ["captureData", "eventMetadata", "eventVersion"]
    assert list(record["captureData"]["endpointInput"]) == ["observedContentType", "mode", "data", "encoding"]
    assert list(record["eventMetadata"]) == ["eventId", "inferenceId", "inferenceTime"]
    assert re.fullmatch(UUID, record["eventMetadata"]["eventId"])
    inference_time = datetime.strptime(record["eventMetadata"]["inferenceTime"], "%Y-%m-%dT%H:%M:%SZ")
    assert layout.groups() == (f"{inference_time:%Y/%m/%d/%H}", f"{inference_time:%M-%S}")


def test_concurrent_requests_share_capture_objects_and_each_has_its_record(serve, runtime, s3):
    destination = new_destination()
    server = serve(capture=CaptureSpec(destination))
    client = runtime(server)
    images = [unique_png(number) for number in range(64)]

    with ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(
                lambda image: client.invoke_endpoint(EndpointName="scones", ContentType="image/png", Body=image)[
                    "Body"
                ].read(),
                images,
            )
        )

    assert all(len(json.loads(answer)) == 2 for answer in answers)
    server.upload_captures()
    objects = stored_objects(s3, destination)
    captured = [
        base64.b64decode(record["captureData"]["endpointInput"]["data"]) for record in stored_records(s3, destination)
    ]
    assert sorted(captured) == sorted(images)
    assert len(objects) < len(images)  # records written between two uploads share an object
    for key, body in objects.items():
        first = json.loads(body.splitlines()[0])["eventMetadata"]["inferenceTime"]
        assert re.search(r"/(\d{4}/\d\d/\d\d/\d\d/\d\d-\d\d)-\d{3}-", key)[1] == (
            f"{datetime.strptime(first, '%Y-%m-%dT%H:%M:%SZ'):%Y/%m/%d/%H/%M-%S}"
        )


def test_large_photos_are_captured_whole_in_the_json_encoders_line(serve, runtime, s3):
    # Bodies of CAPTURE_AHEAD_BYTES or more are base64-encoded while the model works; every record's base64 is
    # spliced into its line, which must still be the JSON encoder's line, byte for byte.
    destination = new_destination()
    server = serve(capture=CaptureSpec(destination, json_content_types=("application/json",)))
    client = runtime(server)
    large = [noise_png(number, 400) for number in range(4)]
    assert min(map(len, large)) >= CAPTURE_AHEAD_BYTES
    images = large + [unique_png(number) for number in range(4)]

    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda image: client.invoke_endpoint(EndpointName="scones", ContentType="image/png", Body=image)[
                    "Body"
                ].read(),
                images,
            )
        )

    server.upload_captures()
    records = {
        base64.b64decode(record["captureData"]["endpointInput"]["data"]): record
        for record in stored_records(s3, destination)
    }
    assert sorted(records) == sorted(images)
    for image, answer in zip(images, answers, strict=True):
        assert records[image]["captureData"]["endpointInput"]["observedContentType"] == "image/png"
        assert records[image]["captureData"]["endpointOutput"]["data"] == answer.decode()
    for body in stored_objects(s3, destination).values():
        for line in body.splitlines(keepends=True):
            assert line == (json.dumps(json.loads(line), separators=(",", ":")) + "\n").encode()


@pytest.mark.parametrize(
    "request_body, request_type",
    [(png(), "image/png"), (b'{"caf\xc3\xa9": 1}', "application/json"), (b"\xff\xfe not UTF-8", "application/json")],
)
def test_record_line_is_the_json_encoders_line(request_body, request_type):
    spec = CaptureSpec("s3://bucket/prefix", json_content_types=("application/json",), csv_content_types=("text/csv",))
    for answer, answer_type in (('["\u00e9t\u00e9", "\\"]'.encode(), "application/json"), (b"0.5,0.5", "text/csv")):
        record = capture_record(
            spec, request_body, request_type, answer, answer_type, "order-1", datetime(2026, 12, 3, tzinfo=UTC)
        )
        expected = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        assert b"".join(record_line(record)) == expected


def test_clients_connecting_at_once_are_all_served(serve):
    server = serve()
    start = threading.Barrier(100)

    def connect_and_post(_) -> int:
        start.wait()
        return post(server.port, "/endpoints/scones/invocations", png())[0]

    with ThreadPoolExecutor(100) as pool:
        assert list(pool.map(connect_and_post, range(100))) == [200] * 100


@pytest.mark.parametrize(
    "sampling, modes, json_types, expected",
    [
        (0, ("Input", "Output"), ("application/json",), None),
        (100, ("Input",), ("application/json",), {"endpointInput"}),
        (100, ("Output",), (), {"endpointOutput"}),
    ],
)
def test_sampling_and_modes_decide_what_is_captured(serve, runtime, s3, sampling, modes, json_types, expected):
    destination = new_destination()
    server = serve(capture=CaptureSpec(destination, sampling, modes, json_content_types=json_types))
    client = runtime(server)
    answers = [
        client.invoke_endpoint(EndpointName="scones", ContentType="image/png", Body=unique_png(number))["Body"].read()
        for number in range(10)
    ]

    server.upload_captures()
    records = stored_records(s3, destination)
    if expected is None:
        assert records == []
        return
    assert len(records) == 10 and all(set(record["captureData"]) == expected for record in records)
    if "endpointOutput" in expected:  # application/json is not listed as JSON here: captured as base64
        outputs = [record["captureData"]["endpointOutput"] for record in records]
        assert {output["encoding"] for output in outputs} == {"BASE64"}
        assert sorted(base64.b64decode(output["data"]) for output in outputs) == sorted(answers)


def test_errors_reach_boto3_as_the_real_service_sends_them(serve, runtime, s3):
    destination = new_destination()
    server = serve(capture=CaptureSpec(destination))
    client = runtime(server)

    def error_of(**call) -> dict:
        with pytest.raises(ClientError) as raised:
            client.invoke_endpoint(**{"EndpointName": "scones", "ContentType": "image/png", **call})
        return raised.value.response

    unknown = error_of(EndpointName="nope", Body=png())
    assert unknown["Error"] == {
        "Code": "ValidationError",
        "Message": "Endpoint nope of account 123456789012 not found.",
    }
    assert unknown["ResponseMetadata"]["HTTPStatusCode"] == 400

    for call, original_status in [
        ({"Body": png(), "ContentType": "text/csv"}, 415),
        ({"Body": b"not an image"}, 400),
        ({"Body": b"\0" * MAX_PAYLOAD_BYTES}, 400),
        ({"Body": png(size=CRASH_SIZE)}, 500),
    ]:
        error = error_of(**call)
        assert error["Error"]["Code"] == "ModelError"
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 424
        assert error["OriginalStatusCode"] == original_status
        side = "client" if original_status < 500 else "server"
        assert error["Error"]["Message"].startswith(f"Received {side} error ({original_status}) from primary")

    too_large = error_of(Body=b"\0" * (MAX_PAYLOAD_BYTES + 1))
    assert too_large["Error"] == {"Code": "413", "Message": f"HTTP content length exceeded {MAX_PAYLOAD_BYTES} bytes."}

    assert client.invoke_endpoint(EndpointName="scones", ContentType="image/png", Body=png())["Body"].read()
    server.upload_captures()
    assert len(stored_records(s3, destination)) == 1  # failed invocations are not captured


def test_an_oversized_body_is_refused_before_it_is_sent_when_the_client_waits_for_continue(serve):
    server = serve()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/endpoints/scones/invocations")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(MAX_PAYLOAD_BYTES + 1))
    connection.putheader("Expect", "100-continue")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert response.getheader("Connection") == "close"
    connection.close()


def test_container_paths_answer_the_container_statuses(serve, s3, tiny_model):
    server = serve()
    assert ping(server.port) == 200
    status, answer = post(server.port, "/invocations", png(color=(51, 0, 0)))
    assert status == 200 and json.loads(answer) == pytest.approx([0.2, 0.8])
    for body, content_type, expected in [
        (png(), "text/plain", 415),
        (b"garbage", "image/png", 400),
        (png(size=CRASH_SIZE), "image/jpeg", 500),
    ]:
        status, answer = post(server.port, "/invocations", body, content_type)
        assert (status, json.loads(answer)["code"]) == (expected, expected)
    assert post(server.port, "/elsewhere", png())[0] == 404

    two = serve(EndpointSpec("left", tiny_model), EndpointSpec("right", tiny_model))
    assert post(two.port, "/invocations", png())[0] == 400
    assert post(two.port, "/endpoints/left/invocations", png())[0] == 200
    assert post(two.port, "/endpoints/right/invocations", png())[0] == 200


def test_fuzzed_requests_get_no_5xx_and_leave_the_server_alive(serve, s3):
    server = serve(capture=CaptureSpec(new_destination()))
    generator = random.Random(11)
    valid = png()
    flipped = [bytearray(valid) for _ in range(20)]
    for body in flipped:
        for _ in range(3):
            body[generator.randrange(len(body))] = generator.randrange(256)
    width = 10_000  # 100 million pixels: above Pillow's warning limit, below its error limit
    cases = (
        [(b"", "image/png"), (valid, None)]
        + [(generator.randbytes(generator.randrange(1, 5000)), "image/png") for _ in range(20)]
        + [(valid[:cut], "image/png") for cut in range(0, len(valid), 9)]
        + [(bytes(body), "image/png") for body in flipped]
        + [
            (declared_png(200_000, 200_000, b"\0" * 201), "image/png"),
            (declared_png(width, width, bytes(width + 1) * width), "image/png"),
            (declared_png(width, width, bytes(width + 1) * 10), "image/png"),
        ]
        + [
            (valid, content_type)
            for content_type in (
                "text/plain",
                "image/gif",
                "",
                "application/json",
                "multipart/form-data; boundary=x",
                "IMAGE/PNG",
                "image",
            )
        ]
    )
    for body, content_type in cases:
        for path in ("/endpoints/scones/invocations", "/invocations"):
            status, answer = post(server.port, path, body, content_type)
            assert status < 500, (path, content_type, body[:40], answer)
            if status == 424:
                assert json.loads(answer)["OriginalStatusCode"] < 500, (path, content_type, body[:40], answer)
    assert ping(server.port) == 200
    assert post(server.port, "/endpoints/scones/invocations", valid)[0] == 200


def test_records_wait_in_the_spool_while_s3_cannot_store_them(serve, runtime, s3):
    bucket = f"scones-missing-{uuid.uuid4().hex[:8]}"
    server = serve(capture=CaptureSpec(f"s3://{bucket}/captures"))
    client = runtime(server)

    client.invoke_endpoint(EndpointName="scones", ContentType="image/png", Body=png())  # answered: it is spooled
    with pytest.raises(CaptureError, match="NoSuchBucket"):
        server.upload_captures()
    assert post(server.port, "/local/upload-captures", b"", None)[0] == 503

    s3.create_bucket(Bucket=bucket)  # once the store is back, the records kept are stored
    client.invoke_endpoint(EndpointName="scones", ContentType="image/png", Body=png())
    server.upload_captures()
    objects = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert sum(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().count(b"\n") for item in objects) == 2


def test_a_record_that_cannot_be_written_whole_fails_its_request_with_503(s3, tiny_model, tmp_path):
    """The server's files may not grow past 40 kB: a record of a larger image is written in part, or not at all."""
    destination = new_destination()

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # Python ignores SIGXFSZ: writes fail instead

    process, port = start_server_process(
        EndpointSpec("scones", tiny_model, CaptureSpec(destination)), tmp_path / "spool", tmp_path, preexec_fn=limited
    )
    try:
        small, large = [noise_png(number, 32) for number in range(5)], [noise_png(number, 120) for number in range(5)]
        for image in large + small:  # records of about 58 kB (do not fit) and of about 4 kB (fit)
            assert post(port, "/endpoints/scones/invocations", image)[0] == (503 if image in large else 200)
    finally:
        process.terminate()  # uploads what is spooled
        assert process.wait(timeout=60) == 0
    captured = [
        base64.b64decode(record["captureData"]["endpointInput"]["data"]) for record in stored_records(s3, destination)
    ]  # every stored line is whole
    assert sorted(captured) == sorted(small)


def test_records_are_stored_under_the_hour_of_their_inference(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(capture_module, "UPLOAD_INTERVAL_SECONDS", 60)  # uploaded on close only
    destination = new_destination()
    spool = CaptureSpool(CaptureSpec(destination), "scones", tmp_path / "spool")
    with pytest.raises(RuntimeError, match="another endpoint server"):
        CaptureSpool(CaptureSpec(destination), "scones", tmp_path / "spool")
    for number, moment in enumerate(
        [
            datetime(2026, 11, 25, 10, 59, 59, 998_000, UTC),
            datetime(2026, 11, 25, 11, 0, 0, 1_000, UTC),
            datetime(2026, 11, 25, 11, 0, 1, 0, UTC),
        ]
    ):
        spool.write({"number": number}, moment)
    spool.close()

    prefix = destination.removeprefix(f"s3://{BUCKET}/")
    objects = {re.sub(UUID, "ID", key): body for key, body in stored_objects(s3, destination).items()}
    assert objects == {
        f"{prefix}/scones/AllTraffic/2026/11/25/10/59-59-998-ID.jsonl": b'{"number":0}\n',
        f"{prefix}/scones/AllTraffic/2026/11/25/11/00-00-001-ID.jsonl": b'{"number":1}\n{"number":2}\n',
    }
    assert list((tmp_path / "spool").glob("*.jsonl")) == []


# A torch model answering an image's mean red, green and blue, 0..1, slowly, so that requests pile up.
TORCH_INFERENCE = """
import io, json, time
import numpy, torch
from PIL import Image

def model_fn(model_dir):
    with open(f"{model_dir}/model.json") as settings:
        return json.load(settings)

def input_fn(request_body, content_type):
    with Image.open(io.BytesIO(request_body)) as image:
        pixels = torch.as_tensor(numpy.asarray(image.convert("RGB"), dtype=numpy.float32))
    return pixels.reshape(-1, 3).mean(0, keepdim=True)

def predict_fn(data, model):
    with open(model["log"], "a") as log:
        log.write(f"{len(data)}\\n")
    time.sleep(0.02)
    if (data[:, 0] == 255).any():
        raise RuntimeError("the model crashed")
    means = data / 255
    if model["kind"] == "batch_dependent":
        return means + len(data) - 1
    return means.tolist() if model["kind"] == "not_a_tensor" else means

def output_fn(prediction, accept):
    return json.dumps(torch.as_tensor(prediction)[0].tolist()), "application/json"
"""


def torch_model(directory: Path, kind: str) -> tuple[Path, Path]:
    """The torch model archive and the file where its predict_fn logs each call's batch size."""
    log = directory / f"batches-{kind}.log"
    return model_archive(
        directory, {"model.json": json.dumps({"kind": kind, "log": str(log)}), "code/inference.py": TORCH_INFERENCE}
    ), log


def channel_means(image: bytes) -> list[float]:
    with Image.open(io.BytesIO(image)) as decoded:
        return [mean / 255 for mean in ImageStat.Stat(decoded.convert("RGB")).mean]


def invoke_all(server: EndpointServer, endpoint: str, images: list[bytes]) -> list[tuple[int, bytes]]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda image: post(server.port, f"/endpoints/{endpoint}/invocations", image), images))


def test_requests_that_arrive_together_are_predicted_together(serve, tmp_path):
    archive, log = torch_model(tmp_path, "rows")
    server = serve(EndpointSpec("batched", archive))
    images = [unique_png(number) for number in range(64)]
    crash = png(color=(255, 0, 0))

    answers = invoke_all(server, "batched", images[:32] + [crash] + images[32:])

    status, answer = answers.pop(32)
    assert (status, json.loads(answer)["OriginalStatusCode"]) == (424, 500)  # the others of its batch are answered
    for image, (status, answer) in zip(images, answers, strict=True):
        assert status == 200 and json.loads(answer) == pytest.approx(channel_means(image))
    assert max(int(size) for size in log.read_text().split()) > 1


@pytest.mark.parametrize("kind", ["batch_dependent", "not_a_tensor"])
def test_a_predict_fn_that_does_not_batch_row_by_row_gets_each_input_alone(serve, tmp_path, kind):
    archive, log = torch_model(tmp_path, kind)
    server = serve(EndpointSpec("alone", archive))
    images = [unique_png(number) for number in range(48)]

    answers = invoke_all(server, "alone", images)

    for image, (status, answer) in zip(images, answers, strict=True):
        assert status == 200 and json.loads(answer) == pytest.approx(channel_means(image))
    assert sum(int(size) > 1 for size in log.read_text().split()) == 1  # the batch that showed it


def test_captures_are_encrypted_with_the_configured_kms_key(serve, runtime, s3):
    key_arn = boto3.client("kms", endpoint_url=s3.meta.endpoint_url).create_key()["KeyMetadata"]["Arn"]
    destination = new_destination()
    server = serve(capture=CaptureSpec(destination, kms_key_id=key_arn))
    runtime(server).invoke_endpoint(EndpointName="scones", ContentType="image/png", Body=png())
    server.upload_captures()

    [key] = stored_objects(s3, destination)
    head = s3.head_object(Bucket=BUCKET, Key=key)
    assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", key_arn)


def test_missing_handler_functions_fall_back_to_the_toolkit_defaults(serve, tmp_path):
    without_predict_and_output = model_archive(
        tmp_path,
        {
            "code/inference.py": (
                "def model_fn(model_dir):\n    return lambda data: [len(data), 0.5]\n"
                "def input_fn(request_body, content_type):\n    return request_body\n"
            )
        },
    )
    without_input = model_archive(tmp_path, {"code/inference.py": "def model_fn(model_dir):\n    return None\n"})
    server = serve(EndpointSpec("defaults", without_predict_and_output), EndpointSpec("no-input", without_input))

    assert post(server.port, "/endpoints/defaults/invocations", b"1234") == (200, b"[4, 0.5]")
    status, answer = post(server.port, "/endpoints/no-input/invocations", png())
    assert (status, json.loads(answer)["OriginalStatusCode"]) == (424, 415)

    without_model_fn = model_archive(tmp_path, {"code/inference.py": "def input_fn(body, content_type):\n    pass\n"})
    with pytest.raises(ValueError, match="defines no model_fn"):
        EndpointServer([EndpointSpec("broken", without_model_fn)])


def test_specs_come_from_the_endpoint_config_and_round_trip_through_json(tiny_model):
    capture = CaptureSpec.from_data_capture_config(
        {
            "EnableCapture": True,
            "InitialSamplingPercentage": 40,
            "DestinationS3Uri": "s3://bucket/data_capture",
            "KmsKeyId": "arn:aws:kms:us-east-1:123456789012:key/k",
            "CaptureOptions": [{"CaptureMode": "Output"}, {"CaptureMode": "Input"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
        }
    )
    assert capture == CaptureSpec(
        "s3://bucket/data_capture",
        40,
        ("Input", "Output"),
        ("application/json",),
        (),
        "arn:aws:kms:us-east-1:123456789012:key/k",
    )
    assert CaptureSpec.from_data_capture_config({"EnableCapture": False}) is None
    spec = EndpointSpec("scones", tiny_model, capture)
    assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec
    for not_a_bucket_uri in ("https://bucket.s3.amazonaws.com/x", "s3:///data_capture", "s3://"):
        with pytest.raises(ValueError, match="is not an s3://bucket"):
            CaptureSpec(not_a_bucket_uri)


def test_every_answered_request_has_its_record_after_sigkill_under_load(s3, tiny_model, tmp_path):
    """Killed under load, the server leaves each answered request's record in the spool; the next server
    started on that folder uploads them before it serves."""
    destination = new_destination()
    spec = EndpointSpec("scones", tiny_model, CaptureSpec(destination))
    process, port = start_server_process(spec, tmp_path / "spool", tmp_path)
    try:
        answered, lock = [], threading.Lock()

        def fire(thread_number: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for number in range(thread_number * 1000, thread_number * 1000 + 500):
                image = unique_png(number)
                try:
                    connection.request(
                        "POST", "/endpoints/scones/invocations", body=image, headers={"Content-Type": "image/png"}
                    )
                    response = connection.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException):
                    return
                if response.status == 200:
                    with lock:
                        answered.append(image)

        threads = [threading.Thread(target=fire, args=(number,)) for number in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(answered) < 300 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        for thread in threads:
            thread.join()
    finally:
        process.kill()
        process.wait()
    assert 300 <= len(answered) < 8 * 500

    process, _ = start_server_process(spec, tmp_path / "spool", tmp_path)  # serves once the leftovers are stored
    try:
        captured = {
            base64.b64decode(record["captureData"]["endpointInput"]["data"])
            for record in stored_records(s3, destination)
        }  # every line of every object parses
        assert [image for image in answered if image not in captured] == []
        assert list((tmp_path / "spool" / "scones").glob("*.jsonl")) == []
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0


def test_a_model_fitted_by_training_fit_is_served(serve, runtime, tmp_path):
    """One epoch of training.fit (training/train.py as SageMaker runs it) on a few images, then served."""
    fit = pytest.importorskip("training.fit", reason="training/fit.py is not there yet")
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for split, count in (("train", 64), ("validation", 32)):
        rows = []
        for index in range(count):
            image = f"train/{split}_{index}.png"
            (data / image).write_bytes(unique_png(index + 1000 * len(split)))
            rows.append(f"{index}\t{index % 2}\t{image}")
        (data / f"{split}.lst").write_text("\n".join(rows) + "\n")
    archive = fit.fit_local(data, tmp_path / "fit", architecture="resnet9", epochs=1, batch_size=32, width=8)

    server = serve(EndpointSpec("fitted", archive))
    response = runtime(server).invoke_endpoint(EndpointName="fitted", ContentType="image/png", Body=png())
    probabilities = json.loads(response["Body"].read())
    assert response["ContentType"] == "application/json"
    assert len(probabilities) == 2 and sum(probabilities) == pytest.approx(1, abs=1e-5)
    status, answer = post(server.port, "/endpoints/fitted/invocations", b"not an image")
    assert (status, json.loads(answer)["OriginalStatusCode"]) == (424, 400)


def test_a_predict_fn_that_exits_fails_its_request_and_the_batcher_answers_the_next():
    torch = pytest.importorskip("torch", reason="the batcher batches torch tensors")

    def predict_fn(data, model):
        if data.sum() < 0:
            sys.exit(3)
        return data * 2

    batcher = PredictionBatcher(predict_fn, model=None, name="exits")
    try:
        with pytest.raises(RuntimeError, match=r"predict_fn raised SystemExit\(3\)"):
            batcher.predict(torch.full((1, 2), -1.0))
        assert batcher.predict(torch.ones(1, 2)).tolist() == [[2.0, 2.0]]
    finally:
        batcher.close()


def run_server_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "local.endpoint", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_the_server_refuses_a_port_in_use_in_one_line(tmp_path):
    spec_file = tmp_path / "endpoints.json"
    spec_file.write_text(json.dumps({"endpoints": []}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server_cli("--spec", str(spec_file), "--spool-dir", str(tmp_path / "spool"), "--port", str(port))
    assert result.returncode == 2
    assert (
        result.stderr == f"local.endpoint: error: [Errno 98] cannot listen on 127.0.0.1:{port}: "
        "Address already in use\n"
    )


@pytest.mark.parametrize("spec_text", [None, "not json", '{"endpoints": [{"name": "no-model"}]}'])
def test_the_server_refuses_a_missing_or_malformed_spec_file_in_one_line(tmp_path, spec_text):
    spec_file = tmp_path / "endpoints.json"
    if spec_text is not None:
        spec_file.write_text(spec_text)
    result = run_server_cli("--spec", str(spec_file), "--spool-dir", str(tmp_path / "spool"), "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith(f"local.endpoint: error: {spec_file} is not a readable endpoint spec file: ")
    assert result.stderr.count("\n") == 1


def test_the_server_refuses_no_workers_or_a_port_out_of_range(tmp_path):
    for option, value in [("--workers", "0"), ("--port", "70000"), ("--port", "-1")]:
        result = run_server_cli("--spec", "endpoints.json", "--spool-dir", str(tmp_path), option, value)
        assert result.returncode == 2
        assert f"argument {option}: '{value}' is not a whole number from" in result.stderr
        assert "Traceback" not in result.stderr


def test_two_models_in_one_process_each_import_their_own_sibling_modules(tmp_path):
    for name, answer in (("old", 0.25), ("new", 0.75)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "network.py").write_text(f"ANSWER = {answer}\n")
        (tmp_path / name / "inference.py").write_text(
            "import network\n\ndef model_fn(model_dir):\n    return network.ANSWER\n"
        )
    old = load_inference_handler(tmp_path / "old", "scones_test_old_inference")
    new = load_inference_handler(tmp_path / "new", "scones_test_new_inference")
    assert (old.model_fn(None), new.model_fn(None)) == (0.25, 0.75)
    assert "network" not in sys.modules
