"""What the three steps share: reading their event, shaping their answer, and the errors they raise.

Lambda reports an exception's class name as the invocation's errorType, and Step Functions uses that as
the error name its Retry and Catch rules match: the class names below are the contract with the state
machine, and so is `aws_error`, which names an exception after an AWS error code.
"""

import functools
import json
import math
import os

import boto3
from botocore.exceptions import ClientError

# What a SageMaker real-time endpoint takes in one request (InvokeEndpoint's limit, 6 MB): the largest image
# the workflow accepts, whichever way it travels.
MAX_IMAGE_BYTES = 6 * 1024 * 1024

# Without s3:ListBucket on the bucket, S3 answers a missing key with AccessDenied rather than NoSuchKey.
MISSING_OBJECT_ERRORS = ("NoSuchKey", "NoSuchBucket", "AccessDenied")


class StepError(Exception):
    """Base of the errors the steps raise on purpose."""


class InvalidEvent(StepError):
    pass


class InvalidConfiguration(StepError):
    pass


class ImageNotFound(StepError):
    pass


class NotAnImage(StepError):
    pass


class ImageTooLarge(StepError):
    pass


class BadEndpointAnswer(StepError):
    pass


class NoInferences(StepError):
    pass


class ThresholdConfidenceNotMet(StepError):
    pass


@functools.cache
def aws_error(code: str) -> type[StepError]:
    """The exception class named `code` (`ModelError`, `ServiceUnavailable`...), one class per code."""
    return type(code, (StepError,), {"__module__": __name__})


def read_body(event: dict | str, *required: str) -> dict:
    """The step's body, from any shape the classic state machines passed around.

    Accepted: the body itself, `{"body": body}`, `{"Payload": {"body": body}}` (a LambdaInvoke result),
    any level as a JSON string, and `inferences` as a list or a JSON string (read into a list).
    Raises InvalidEvent when the body is not a JSON object or lacks one of the `required` keys.
    """
    body = _decoded(event, "the event")
    for wrapper in ("Payload", "body"):
        if isinstance(body, dict) and wrapper in body:
            body = _decoded(body[wrapper], wrapper)
    if not isinstance(body, dict):
        raise InvalidEvent(
            f"The step's body is a {type(body).__name__}, not a JSON object such as "
            '{"s3_bucket": "...", "s3_key": "..."}.'
        )
    body = dict(body)
    if "inferences" in body:
        body["inferences"] = _decoded(body["inferences"], "inferences")
    missing = [key for key in required if not body.get(key)]
    if missing:
        raise InvalidEvent(
            f"The event has no {' and no '.join(missing)} (it has: {', '.join(body) or 'nothing'}). "
            'The workflow starts from {"s3_bucket": "<bucket>", "s3_key": "<key of a PNG or JPEG>"} and '
            "each step takes the body the step before it answered."
        )
    return body


def _decoded(value, name: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as error:
        raise InvalidEvent(f"{name} is a string but not JSON ({error}): {value[:100]!r}") from error


def answer(body: dict) -> dict:
    """What every step answers; the state machine passes `$.Payload.body` to the next step."""
    return {"statusCode": 200, "body": body}


def image_location(body: dict) -> str:
    """`s3://bucket/key` of the image the body is about, for messages."""
    if body.get("s3_bucket") and body.get("s3_key"):
        return f"s3://{body['s3_bucket']}/{body['s3_key']}"
    return "the image"


def image_content_type(data: bytes) -> str | None:
    """`image/png` or `image/jpeg` from the data's magic bytes; None for anything else.

    The endpoint takes image/png, image/jpeg and application/x-image; PNG and JPEG are the formats
    every server behind that contract decodes, so they are the only ones let through.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return None


def as_probabilities(value) -> list[float] | None:
    """`value` as a list of floats when it is a non-empty list of finite numbers, else None."""
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) for p in value):
        return None
    return [float(p) for p in value]


def setting(name: str, default: str | None = None) -> str:
    """The environment variable `name`, or `default` when it is unset or empty."""
    value = os.environ.get(name) or default
    if not value:
        raise InvalidConfiguration(
            f"The environment variable {name} is not set; the workflow stack sets it "
            "on the function, and a local run must set it in the environment."
        )
    return value


@functools.cache
def s3_client():
    return boto3.client("s3")


def open_image(body: dict) -> dict:
    """S3's GetObject answer for the body's `s3_bucket`/`s3_key`, its `Body` not yet read.

    Raises ImageNotFound when it cannot be read and ImageTooLarge when it is over what the endpoint takes.
    """
    location = image_location(body)
    try:
        s3_object = s3_client().get_object(Bucket=body["s3_bucket"], Key=body["s3_key"])
    except ClientError as error:
        code = error.response["Error"]["Code"]
        if code not in MISSING_OBJECT_ERRORS:
            raise
        raise ImageNotFound(
            f"{location} could not be read (S3 said {code}): check the bucket and key, upload "
            "the image there, or let this function s3:GetObject it."
        ) from error
    size = s3_object["ContentLength"]
    if size > MAX_IMAGE_BYTES:
        s3_object["Body"].close()
        raise ImageTooLarge(
            f"{location} is {size:,} bytes, over the limit of {MAX_IMAGE_BYTES:,}: a SageMaker endpoint takes "
            "at most 6 MB per request. Resize or recompress the image (a phone photo saved as a JPEG of "
            "2000 pixels on its longer side is well under)."
        )
    return s3_object
