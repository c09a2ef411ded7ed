"""The three step handlers, run as Lambda runs them: S3 is moto's, the endpoint a local HTTP server
speaking the SageMaker Runtime REST API, reached by the handlers' own boto3 clients."""

import base64
import contextlib
import io
import json
import os
import random
import socket
import sys
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lambdas"))

import common
from classify_image import index as classify
from common import ThresholdConfidenceNotMet, read_body
from fake_endpoint import ENDPOINT_ERROR_STATUS, FakeEndpoint
from filter_inferences import index as filter_step
from serialize_image_data import index as serialize

from stacks.registry import DEFAULT_THRESHOLD_VALUE
from stacks.workflow_stack import TRANSIENT_ENDPOINT_ERRORS

BUCKET = "scones-test-data"
ENDPOINT = "scones-test-endpoint"
THRESHOLD_PARAMETER = "/scones/test/serving/threshold"
MODEL_PARAMETER = "/scones/test/serving/model-data-url"
MODEL_URL = "s3://scones-test-data/models/job-1/output/model.tar.gz"

# The shapes the classic state machines passed a body around in.
SHAPES = {
    "body": lambda body: body,
    "answer": lambda body: {"statusCode": 200, "body": body},
    "body as JSON": lambda body: {"body": json.dumps(body)},
    "LambdaInvoke result": lambda body: {"Payload": {"statusCode": 200, "body": body}},
    "LambdaInvoke result, body as JSON": lambda body: {"Payload": {"body": json.dumps(body)}},
}


def image_bytes(image_format: str, size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format=image_format)
    return buffer.getvalue()


def noise_jpeg(side: int) -> bytes:
    """A real JPEG of random pixels, which compresses badly: about 1.5 bytes a pixel at quality 95."""
    pixels = random.Random(0).randbytes(side * side * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def failure(handler, event) -> tuple[str, str]:
    """The name and message of the error `handler` raises for `event`."""
    with pytest.raises(Exception) as raised:
        handler(event, None)
    return type(raised.value).__name__, str(raised.value)


@pytest.fixture(autouse=True)
def lambda_environment(monkeypatch):
    """The environment Lambda gives the handlers, with fake credentials and fresh boto3 clients."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name in ("THRESHOLD", "MODEL_DATA_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("ENDPOINT_NAME", ENDPOINT)
    monkeypatch.setenv("METRIC_NAMESPACE", "SconesTest")
    # what the workflow stack gives the filter by default (tests/test_workflow_stack.py checks it does)
    monkeypatch.setenv("CLASS_NAMES", "bicycle,motorcycle")
    monkeypatch.setenv("THRESHOLD_PARAMETER", THRESHOLD_PARAMETER)
    monkeypatch.setenv("MODEL_PARAMETER", MODEL_PARAMETER)
    monkeypatch.setenv("DEFAULT_THRESHOLD", "0.93")
    fresh_clients()
    yield
    fresh_clients()


def fresh_clients():
    for client in (common.s3_client, classify.sagemaker_runtime, filter_step.ssm_client):
        client.cache_clear()
    filter_step._parameters.clear()


@pytest.fixture(autouse=True)
def aws():
    """moto's S3 and SSM, in-process; the SageMaker endpoint is the fake_endpoint fixture's real server."""
    with mock_aws():
        yield


@pytest.fixture
def s3_bucket():
    """A moto S3 bucket; put objects in it with the returned client."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    return s3


@pytest.fixture
def ssm():
    return boto3.client("ssm")


@pytest.fixture
def fake_endpoint(monkeypatch):
    with FakeEndpoint() as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", server.url)
        yield server


def classify_event(image: bytes) -> dict:
    return {"image_data": base64.b64encode(image).decode(), "s3_bucket": BUCKET, "s3_key": "bike.png", "inferences": []}


# read_body


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_read_body_unwraps_every_shape(shape):
    body = {"s3_bucket": BUCKET, "s3_key": "bike.png", "inferences": [0.1, 0.9]}
    assert read_body(shape(body), "s3_bucket") == body


def test_read_body_reads_inferences_given_as_json():
    assert read_body({"body": {"inferences": "[0.1, 0.9]"}}) == {"inferences": [0.1, 0.9]}


def test_read_body_leaves_the_event_unchanged():
    event = {"inferences": "[0.1, 0.9]"}
    read_body(event)
    assert event == {"inferences": "[0.1, 0.9]"}


@pytest.mark.parametrize(
    "event, expected",
    [
        ({"body": "{not json"}, "body is a string but not JSON"),
        ({"body": [1, 2]}, "The step's body is a list, not a JSON object"),
        ({"inferences": "0.1, 0.9"}, "inferences is a string but not JSON"),
    ],
)
def test_read_body_rejects_what_is_not_a_body(event, expected):
    name, message = failure(lambda event, context: read_body(event), event)
    assert name == "InvalidEvent"
    assert expected in message


# serialize_image_data


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_serialize_answers_the_object_base64_encoded(s3_bucket, shape, image_format):
    image = image_bytes(image_format)
    s3_bucket.put_object(Bucket=BUCKET, Key="images/bike", Body=image)

    result = serialize.handler(shape({"s3_bucket": BUCKET, "s3_key": "images/bike"}), None)

    assert result == {
        "statusCode": 200,
        "body": {
            "image_data": base64.b64encode(image).decode(),
            "s3_bucket": BUCKET,
            "s3_key": "images/bike",
            "inferences": [],
        },
    }
    assert base64.b64decode(result["body"]["image_data"]) == image


@pytest.mark.parametrize(
    "event, missing",
    [
        ({"s3_key": "bike.png"}, "no s3_bucket"),
        ({"s3_bucket": BUCKET}, "no s3_key"),
        ({"s3_bucket": BUCKET, "s3_key": ""}, "no s3_key"),
        ({}, "no s3_bucket and no s3_key"),
    ],
)
def test_serialize_names_what_the_event_lacks(event, missing):
    name, message = failure(serialize.handler, event)
    assert name == "InvalidEvent"
    assert missing in message
    assert 'The workflow starts from {"s3_bucket": "<bucket>", "s3_key": "<key of a PNG or JPEG>"}' in message


@pytest.mark.parametrize(
    "bucket, key, code",
    [
        (BUCKET, "missing.png", "NoSuchKey"),
        ("no-such-bucket", "bike.png", "NoSuchBucket"),
    ],
)
def test_serialize_fails_on_a_missing_object(s3_bucket, bucket, key, code):
    name, message = failure(serialize.handler, {"s3_bucket": bucket, "s3_key": key})
    assert name == "ImageNotFound"
    assert f"s3://{bucket}/{key} could not be read (S3 said {code})" in message


@pytest.mark.parametrize(
    "content, what",
    [
        (b"", "is empty"),
        (b"bicycle,motorcycle\n", "is not a PNG or JPEG image (it starts with b'bicycle,')"),
        (image_bytes("GIF"), "is not a PNG or JPEG image (it starts with b'GIF87a"),
    ],
    ids=["empty", "text", "GIF"],
)
def test_serialize_fails_on_what_is_not_an_image(s3_bucket, content, what):
    s3_bucket.put_object(Bucket=BUCKET, Key="labels.csv", Body=content)
    name, message = failure(serialize.handler, {"s3_bucket": BUCKET, "s3_key": "labels.csv"})
    assert name == "NotAnImage"
    assert f"s3://{BUCKET}/labels.csv {what}" in message


def test_serialize_passes_a_larger_image_by_reference_without_reading_it(s3_bucket):
    photo = noise_jpeg(500)
    assert serialize.INLINE_IMAGE_BYTES < len(photo) <= common.MAX_IMAGE_BYTES
    s3_bucket.put_object(Bucket=BUCKET, Key="photos/moto.jpg", Body=photo)

    result = serialize.handler({"s3_bucket": BUCKET, "s3_key": "photos/moto.jpg"}, None)

    assert result == {
        "statusCode": 200,
        "body": {"s3_bucket": BUCKET, "s3_key": "photos/moto.jpg", "image_bytes": len(photo), "inferences": []},
    }
    assert len(json.dumps(result)) < 1000  # what the state carries, whatever the photo's size


def test_serialize_keeps_an_image_of_exactly_the_inline_limit_inline(s3_bucket):
    image = image_bytes("PNG")
    image += b"\0" * (serialize.INLINE_IMAGE_BYTES - len(image))  # PNG decoders stop at IEND
    s3_bucket.put_object(Bucket=BUCKET, Key="edge.png", Body=image)
    body = serialize.handler({"s3_bucket": BUCKET, "s3_key": "edge.png"}, None)["body"]
    assert base64.b64decode(body["image_data"]) == image
    assert len(json.dumps(body)) < 256 * 1024  # Step Functions' cap on a state


def test_serialize_checks_the_format_of_a_large_object_from_its_first_bytes(s3_bucket):
    s3_bucket.put_object(Bucket=BUCKET, Key="video.mp4", Body=b"\0\0\0\x18ftypmp42" + bytes(500_000))
    name, message = failure(serialize.handler, {"s3_bucket": BUCKET, "s3_key": "video.mp4"})
    assert name == "NotAnImage"
    assert message == (
        f"s3://{BUCKET}/video.mp4 is not a PNG or JPEG image (it starts with b'\\x00\\x00\\x00\\x18ftyp'): "
        "point s3_key at a PNG or JPEG image."
    )


def test_serialize_refuses_an_image_over_the_endpoints_limit(s3_bucket):
    s3_bucket.put_object(Bucket=BUCKET, Key="huge.jpg", Body=b"\xff\xd8\xff" + bytes(7 * 1024 * 1024))

    name, message = failure(serialize.handler, {"s3_bucket": BUCKET, "s3_key": "huge.jpg"})

    assert name == "ImageTooLarge"
    assert message.startswith(
        f"s3://{BUCKET}/huge.jpg is {7 * 1024 * 1024 + 3:,} bytes, over the limit of 6,291,456: a SageMaker "
        "endpoint takes at most 6 MB per request. Resize or recompress the image"
    )


def test_the_image_limit_is_the_local_endpoints():
    from local.endpoint import MAX_PAYLOAD_BYTES

    assert common.MAX_IMAGE_BYTES == MAX_PAYLOAD_BYTES == 6_291_456


# classify_image


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("image_format, content_type", [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_classify_sends_the_image_and_answers_the_probabilities(fake_endpoint, shape, image_format, content_type):
    image = image_bytes(image_format)
    fake_endpoint.answer_body = b"[0.0625, 0.9375]"

    result = classify.handler(shape(classify_event(image)), None)

    assert result == {"statusCode": 200, "body": {**classify_event(image), "inferences": [0.0625, 0.9375]}}
    assert fake_endpoint.requests == [
        {"path": f"/endpoints/{ENDPOINT}/invocations", "content_type": content_type, "body": image}
    ]


def test_classify_answers_integer_probabilities_as_floats(fake_endpoint):
    fake_endpoint.answer_body = b"[0, 1]"
    inferences = classify.handler(classify_event(image_bytes("PNG")), None)["body"]["inferences"]
    assert inferences == [0.0, 1.0]
    assert all(type(p) is float for p in inferences)


@pytest.mark.parametrize("code", ENDPOINT_ERROR_STATUS)
def test_classify_raises_the_endpoint_error_by_its_code_after_one_attempt(fake_endpoint, code):
    fake_endpoint.failures = [code, code]

    name, message = failure(classify.handler, classify_event(image_bytes("PNG")))

    assert name == code
    assert message == f"Endpoint {ENDPOINT} answered {code} for s3://{BUCKET}/bike.png: fake {code} from the endpoint"
    assert len(fake_endpoint.requests) == 1


def test_classify_succeeds_when_the_state_machine_retries(fake_endpoint):
    fake_endpoint.failures = ["ServiceUnavailable"]
    event = classify_event(image_bytes("PNG"))

    assert failure(classify.handler, event)[0] == "ServiceUnavailable"
    assert classify.handler(event, None)["body"]["inferences"] == [0.25, 0.75]
    assert len(fake_endpoint.requests) == 2


def test_transient_errors_are_the_retryable_ones():
    assert {
        "ServiceUnavailable",
        "InternalFailure",
        "ThrottlingException",
        "ModelNotReadyException",
        "InternalDependencyException",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
    } <= set(TRANSIENT_ENDPOINT_ERRORS)
    assert not {"ModelError", "ValidationError", "BadEndpointAnswer"} & set(TRANSIENT_ENDPOINT_ERRORS)


def test_classify_keeps_botocores_name_for_an_unreachable_endpoint(monkeypatch):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", f"http://127.0.0.1:{port}")

    name, message = failure(classify.handler, classify_event(image_bytes("PNG")))

    assert name == "EndpointConnectionError"
    assert f"127.0.0.1:{port}/endpoints/{ENDPOINT}/invocations" in message
    assert name in TRANSIENT_ENDPOINT_ERRORS


@pytest.mark.parametrize(
    "endpoint_answer",
    [b"bicycle", b'{"bicycle": 0.9}', b'["0.9", "0.1"]', b"[]", b"[NaN, 1]", b"[true, false]", b"\xff\xfe"],
    ids=["text", "object", "strings", "empty list", "NaN", "booleans", "not UTF-8"],
)
def test_classify_fails_on_an_answer_that_is_not_probabilities(fake_endpoint, endpoint_answer):
    fake_endpoint.answer_body = endpoint_answer
    name, message = failure(classify.handler, classify_event(image_bytes("PNG")))
    assert name == "BadEndpointAnswer"
    assert message.startswith(
        f"Endpoint {ENDPOINT} answered {endpoint_answer!r} for s3://{BUCKET}/bike.png, "
        "not a JSON list of class probabilities"
    )


def test_classify_needs_the_endpoint_name(fake_endpoint, monkeypatch):
    monkeypatch.delenv("ENDPOINT_NAME")
    name, message = failure(classify.handler, classify_event(image_bytes("PNG")))
    assert name == "InvalidConfiguration"
    assert message.startswith("The environment variable ENDPOINT_NAME is not set")
    assert fake_endpoint.requests == []


@pytest.mark.parametrize(
    "event, expected",
    [
        (
            {"s3_key": "bike.png", "inferences": []},
            ("InvalidEvent", "The event has neither image_data nor s3_bucket and s3_key (it has: s3_key, inferences)"),
        ),
        (
            {**classify_event(b""), "image_data": "not base64!"},
            ("InvalidEvent", f"image_data of s3://{BUCKET}/bike.png is not base64"),
        ),
        (
            classify_event(b"GIF89a and so on"),
            (
                "NotAnImage",
                f"image_data of s3://{BUCKET}/bike.png is not a PNG or JPEG image (it starts with b'GIF89a a')",
            ),
        ),
    ],
    ids=["no image", "not base64", "not an image"],
)
def test_classify_fails_on_an_event_without_an_image(fake_endpoint, event, expected):
    name, message = failure(classify.handler, event)
    assert (name, message[: len(expected[1])]) == expected
    assert fake_endpoint.requests == []


def test_classify_reads_an_image_passed_by_reference_from_s3(s3_bucket, fake_endpoint):
    photo = noise_jpeg(500)
    s3_bucket.put_object(Bucket=BUCKET, Key="photos/moto.jpg", Body=photo)
    fake_endpoint.answer_body = b"[0.02, 0.97]"
    event = serialize.handler({"s3_bucket": BUCKET, "s3_key": "photos/moto.jpg"}, None)

    result = classify.handler(event, None)

    assert result == {
        "statusCode": 200,
        "body": {
            "s3_bucket": BUCKET,
            "s3_key": "photos/moto.jpg",
            "image_bytes": len(photo),
            "inferences": [0.02, 0.97],
        },
    }
    assert fake_endpoint.requests == [
        {"path": f"/endpoints/{ENDPOINT}/invocations", "content_type": "image/jpeg", "body": photo}
    ]


@pytest.mark.parametrize(
    "key, content, expected",
    [
        ("gone.jpg", None, ("ImageNotFound", f"s3://{BUCKET}/gone.jpg could not be read (S3 said NoSuchKey)")),
        ("notes.txt", b"not a photo", ("NotAnImage", f"s3://{BUCKET}/notes.txt is not a PNG or JPEG image")),
        (
            "huge.jpg",
            b"\xff\xd8\xff" + bytes(7 * 1024 * 1024),
            ("ImageTooLarge", f"s3://{BUCKET}/huge.jpg is 7,340,035 bytes, over the limit of 6,291,456"),
        ),
    ],
    ids=["missing", "not an image", "too large"],
)
def test_classify_fails_on_a_reference_to_no_usable_image(s3_bucket, fake_endpoint, key, content, expected):
    if content is not None:
        s3_bucket.put_object(Bucket=BUCKET, Key=key, Body=content)
    name, message = failure(classify.handler, {"s3_bucket": BUCKET, "s3_key": key, "inferences": []})
    assert (name, message[: len(expected[1])]) == expected
    assert fake_endpoint.requests == []


# filter_inferences


def metric_record(captured: str) -> dict:
    """The one EMF line the filter printed, parsed."""
    lines = captured.splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def readable(inferences, neither, threshold, source, model=None, key="moto.png", predicted="motorcycle") -> dict:
    """The filter's answer, which is the execution's output."""
    return {
        "statusCode": 200,
        "body": {
            "s3_bucket": BUCKET,
            "s3_key": key,
            "class": predicted,
            "inferences": inferences,
            "neither": neither,
            "threshold": threshold,
            "threshold_source": source,
            "model": model,
            "source": "model",
        },
    }


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("inferences", [[0.05, 0.95], "[0.05, 0.95]"], ids=["list", "JSON"])
def test_filter_answers_a_confident_inference_readably(capsys, shape, inferences):
    body = {"image_data": "aW1hZ2U=", "s3_bucket": BUCKET, "s3_key": "moto.png", "inferences": inferences}
    assert filter_step.handler(shape(body), None) == readable([0.05, 0.95], 0.0, 0.93, "default")
    assert metric_record(capsys.readouterr().out)["LowConfidence"] == 0


def test_filter_applies_the_trained_models_threshold_from_ssm_and_names_the_model(ssm):
    ssm.put_parameter(Name=THRESHOLD_PARAMETER, Value="0.844", Type="String")
    ssm.put_parameter(Name=MODEL_PARAMETER, Value=MODEL_URL, Type="String")
    event = {"s3_bucket": BUCKET, "s3_key": "moto.png", "inferences": [0.02, 0.97]}

    assert filter_step.handler(event, None) == readable([0.02, 0.97], 0.01, 0.844, "model", MODEL_URL)

    name, message = failure(filter_step.handler, {**event, "inferences": [0.2, 0.8]})
    assert name == "ThresholdConfidenceNotMet"
    assert message == (
        "THRESHOLD_CONFIDENCE_NOT_MET: the top probability 0.8 (motorcycle) is below the threshold 0.844 "
        f"(the served model's own) for s3://{BUCKET}/moto.png."
    )


@pytest.mark.parametrize("recorded", [None, DEFAULT_THRESHOLD_VALUE], ids=["none recorded", "a model without one"])
def test_filter_applies_the_default_while_the_served_model_has_no_threshold(ssm, recorded):
    ssm.put_parameter(Name=MODEL_PARAMETER, Value=MODEL_URL, Type="String")
    if recorded:
        ssm.put_parameter(Name=THRESHOLD_PARAMETER, Value=recorded, Type="String")
    event = {"s3_bucket": BUCKET, "s3_key": "bike.png", "inferences": [0.95, 0.04]}
    assert filter_step.handler(event, None) == readable(
        [0.95, 0.04], 0.01, 0.93, "default", MODEL_URL, key="bike.png", predicted="bicycle"
    )


def test_an_override_wins_over_the_models_threshold(ssm, monkeypatch):
    ssm.put_parameter(Name=THRESHOLD_PARAMETER, Value="0.844", Type="String")
    ssm.put_parameter(Name=MODEL_PARAMETER, Value=MODEL_URL, Type="String")
    monkeypatch.setenv("THRESHOLD", "0.9")
    event = {"s3_bucket": BUCKET, "s3_key": "moto.png", "inferences": [0.12, 0.88]}

    name, message = failure(filter_step.handler, event)

    assert name == "ThresholdConfidenceNotMet"
    assert "is below the threshold 0.9 (set with -c threshold)" in message
    event["inferences"] = [0.05, 0.95]
    assert filter_step.handler(event, None) == readable([0.05, 0.95], 0.0, 0.9, "override", MODEL_URL)


def test_with_an_override_and_a_given_model_url_the_filter_does_not_call_ssm(monkeypatch):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", f"http://127.0.0.1:{port}")  # any call would fail to connect
    monkeypatch.setenv("THRESHOLD", "0.9")
    monkeypatch.setenv("MODEL_DATA_URL", MODEL_URL)
    event = {"s3_bucket": BUCKET, "s3_key": "moto.png", "inferences": [0.05, 0.95]}
    assert filter_step.handler(event, None) == readable([0.05, 0.95], 0.0, 0.9, "override", MODEL_URL)

    monkeypatch.delenv("THRESHOLD")
    assert failure(filter_step.handler, event)[0] == "EndpointConnectionError"


def test_the_parameters_are_read_again_after_the_cache_expires(ssm, monkeypatch):
    ssm.put_parameter(Name=THRESHOLD_PARAMETER, Value="0.844", Type="String")
    event = {"s3_bucket": BUCKET, "s3_key": "moto.png", "inferences": [0.1, 0.86]}
    assert filter_step.handler(event, None)["body"]["threshold"] == 0.844

    ssm.put_parameter(Name=THRESHOLD_PARAMETER, Value="0.9", Type="String", Overwrite=True)
    assert filter_step.handler(event, None)["body"]["threshold"] == 0.844  # cached

    now = filter_step.time.monotonic()
    monkeypatch.setattr(filter_step.time, "monotonic", lambda: now + filter_step.PARAMETER_CACHE_SECONDS + 1)
    assert failure(filter_step.handler, event)[1].startswith(
        "THRESHOLD_CONFIDENCE_NOT_MET: the top probability 0.86 (motorcycle) is below the threshold 0.9"
    )


@pytest.mark.parametrize("value", ["high", "1.5", "-0.1"])
def test_filter_names_a_bad_threshold_parameter(ssm, value, capsys):
    ssm.put_parameter(Name=THRESHOLD_PARAMETER, Value=value, Type="String")
    name, message = failure(filter_step.handler, {"inferences": [0.1, 0.9]})
    assert name == "InvalidConfiguration"
    assert message == (
        f"the SSM parameter {THRESHOLD_PARAMETER}={value!r} is not a probability between 0 and 1: the endpoint "
        "stack records the served model's calibrated threshold there; put a number such as 0.85 in it, or "
        "'default' to apply the default."
    )
    assert capsys.readouterr().out == ""


def test_filter_names_the_classes_from_class_names_in_label_order(monkeypatch):
    monkeypatch.setenv("CLASS_NAMES", "bus,bicycle,motorcycle,tractor")
    result = filter_step.handler({"s3_bucket": BUCKET, "s3_key": "moto.png", "inferences": [0, 0.01, 0.03, 0.95]}, None)
    assert (result["body"]["class"], result["body"]["neither"]) == ("tractor", 0.01)


def test_filter_refuses_answers_for_other_classes_than_configured():
    name, message = failure(filter_step.handler, {"inferences": [0.2, 0.3, 0.5]})
    assert name == "InvalidConfiguration"
    assert message.startswith(
        "The endpoint answered 3 probabilities but the workflow knows 2 classes (CLASS_NAMES=bicycle,motorcycle)"
    )


def test_filter_passes_an_inference_exactly_at_the_threshold(monkeypatch):
    monkeypatch.setenv("THRESHOLD", "0.75")
    assert filter_step.handler({"inferences": [0.75, 0.25]}, None)["body"]["class"] == "bicycle"


@pytest.mark.parametrize(
    "threshold, inferences, expected",
    [
        (None, [0.61, 0.39], "the top probability 0.61 (bicycle) is below the threshold 0.93 (the default, as the "),
        ("0.5", [0.2, 0.3, 0.4, 0.1], "the top probability 0.4 (motorcycle) is below the threshold 0.5 (set with"),
        ("0.3", [0.35, 0.1], "neither (0.55) is more likely than bicycle (0.35)"),
    ],
)
def test_filter_fails_a_low_confidence_inference(monkeypatch, threshold, inferences, expected):
    if threshold:
        monkeypatch.setenv("THRESHOLD", threshold)
    if len(inferences) == 4:
        monkeypatch.setenv("CLASS_NAMES", "bicycle,bus,motorcycle,tractor")
    name, message = failure(filter_step.handler, {"s3_bucket": BUCKET, "s3_key": "moto.png", "inferences": inferences})
    assert name == "ThresholdConfidenceNotMet"
    assert message.startswith(f"THRESHOLD_CONFIDENCE_NOT_MET: {expected}")
    assert message.endswith(f" for s3://{BUCKET}/moto.png.")


@pytest.mark.parametrize(
    "inferences, expected",
    [
        ([0.04, 0.96], {"PredictedClass": "1", "TopProbability": 0.96, "LowConfidence": 0, "Threshold": 0.93}),
        ([0.7, 0.3], {"PredictedClass": "0", "TopProbability": 0.7, "LowConfidence": 1, "Threshold": 0.93}),
    ],
)
def test_filter_prints_one_embedded_metric_line(capsys, inferences, expected):
    with contextlib.suppress(ThresholdConfidenceNotMet):
        filter_step.handler({"inferences": inferences}, None)

    record = metric_record(capsys.readouterr().out)

    metadata = record.pop("_aws")
    assert isinstance(metadata["Timestamp"], int)
    assert metadata["CloudWatchMetrics"] == [
        {
            "Namespace": "SconesTest",
            "Dimensions": [["EndpointName"]],
            "Metrics": [{"Name": "TopProbability", "Unit": "None"}, {"Name": "LowConfidence", "Unit": "Count"}],
        },
        {
            "Namespace": "SconesTest",
            "Dimensions": [["EndpointName", "PredictedClass"]],
            "Metrics": [{"Name": "Predictions", "Unit": "Count"}],
        },
    ]
    assert record == {"EndpointName": ENDPOINT, "Predictions": 1, **expected}


def test_filter_metric_names_are_the_exported_constants():
    assert (
        filter_step.ENDPOINT_DIMENSION,
        filter_step.CLASS_DIMENSION,
        filter_step.TOP_PROBABILITY_METRIC,
        filter_step.LOW_CONFIDENCE_METRIC,
        filter_step.PREDICTIONS_METRIC,
    ) == ("EndpointName", "PredictedClass", "TopProbability", "LowConfidence", "Predictions")


def test_filter_without_a_metric_namespace_fails_naming_the_variable(monkeypatch, capsys):
    monkeypatch.delenv("METRIC_NAMESPACE")
    name, message = failure(filter_step.handler, {"inferences": [0.04, 0.96]})
    assert name == "InvalidConfiguration"
    assert message.startswith("The environment variable METRIC_NAMESPACE is not set")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("event", [{"s3_key": "moto.png"}, {"inferences": []}, {"body": {"inferences": "[]"}}])
def test_filter_fails_without_inferences(capsys, event):
    name, message = failure(filter_step.handler, event)
    assert name == "NoInferences"
    assert "has no inferences" in message
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("inferences", [["0.9", "0.1"], {"bicycle": 0.9}, [None, 0.5]])
def test_filter_fails_on_inferences_that_are_not_probabilities(inferences):
    name, message = failure(filter_step.handler, {"inferences": inferences})
    assert name == "InvalidEvent"
    assert f"inferences of the image are {inferences!r}, not a list of class probabilities" in message


@pytest.mark.parametrize("variable", ["THRESHOLD", "DEFAULT_THRESHOLD"])
@pytest.mark.parametrize("threshold", ["high", "1.5", "-0.1", "nan"])
def test_filter_rejects_an_invalid_threshold(monkeypatch, variable, threshold):
    monkeypatch.setenv(variable, threshold)
    assert failure(filter_step.handler, {"inferences": [0.1, 0.9]}) == (
        "InvalidConfiguration",
        f"{variable}={threshold!r} is not a probability between 0 and 1.",
    )


# the three in a row, as the state machine passes `$.Payload.body` from one to the next


@pytest.mark.parametrize("photo", [image_bytes("JPEG"), noise_jpeg(500)], ids=["inline", "by reference"])
def test_the_three_steps_in_a_row(s3_bucket, ssm, fake_endpoint, capsys, photo):
    s3_bucket.put_object(Bucket=BUCKET, Key="test/motorcycle_s_000001.jpg", Body=photo)
    ssm.put_parameter(Name=THRESHOLD_PARAMETER, Value="0.844", Type="String")
    ssm.put_parameter(Name=MODEL_PARAMETER, Value=MODEL_URL, Type="String")
    fake_endpoint.answer_body = b"[0.01, 0.99]"

    serialized = serialize.handler({"s3_bucket": BUCKET, "s3_key": "test/motorcycle_s_000001.jpg"}, None)
    classified = classify.handler(serialized["body"], None)
    filtered = filter_step.handler(classified["body"], None)

    assert ("image_data" in serialized["body"]) == (len(photo) <= serialize.INLINE_IMAGE_BYTES)
    assert filtered == readable([0.01, 0.99], 0.0, 0.844, "model", MODEL_URL, key="test/motorcycle_s_000001.jpg")
    assert fake_endpoint.requests[0]["body"] == photo
    assert metric_record(capsys.readouterr().out)["PredictedClass"] == "1"
