"""Step 2: send the image to the SageMaker endpoint and add its class probabilities as `inferences`.

The image is the body's `image_data` when it travelled inline, else the object at `s3_bucket`/`s3_key`,
read from S3 here.
"""

import base64
import functools
import json

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from common import (
    BadEndpointAnswer,
    InvalidEvent,
    NotAnImage,
    answer,
    as_probabilities,
    aws_error,
    image_content_type,
    image_location,
    open_image,
    read_body,
    setting,
)


@functools.cache
def sagemaker_runtime():
    # One attempt: the state machine owns the retries, so they show in the execution history. The read
    # timeout stays below the function's 30 s timeout so that a stuck endpoint fails as ReadTimeoutError,
    # which is retried, rather than as a Lambda timeout.
    return boto3.client(
        "sagemaker-runtime", config=Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=25)
    )


def handler(event, context):
    body = read_body(event)
    endpoint_name = setting("ENDPOINT_NAME")
    image = image_of(body)
    location = image_location(body)
    content_type = image_content_type(image)
    if content_type is None:
        what = "image_data of " if body.get("image_data") else ""
        raise NotAnImage(f"{what}{location} is not a PNG or JPEG image (it starts with {image[:8]!r}).")
    try:
        response = sagemaker_runtime().invoke_endpoint(EndpointName=endpoint_name, ContentType=content_type, Body=image)
    except ClientError as error:
        code, message = error.response["Error"]["Code"], error.response["Error"]["Message"]
        raise aws_error(code)(f"Endpoint {endpoint_name} answered {code} for {location}: {message}") from error
    raw_answer = response["Body"].read()
    try:
        inferences = as_probabilities(json.loads(raw_answer))
    except ValueError:
        inferences = None
    if inferences is None:
        raise BadEndpointAnswer(
            f"Endpoint {endpoint_name} answered {raw_answer[:200]!r} for "
            f"{location}, not a JSON list of class probabilities like [0.9, 0.1]."
        )
    return answer({**body, "inferences": inferences})


def image_of(body: dict) -> bytes:
    """The image's bytes: `image_data` decoded, or the object at `s3_bucket`/`s3_key`."""
    location = image_location(body)
    if body.get("image_data"):
        try:
            return base64.b64decode(body["image_data"], validate=True)
        except ValueError as error:
            raise InvalidEvent(
                f"image_data of {location} is not base64 ({error}); it should be what serialize-image-data answered."
            ) from error
    if not (body.get("s3_bucket") and body.get("s3_key")):
        raise InvalidEvent(
            f"The event has neither image_data nor s3_bucket and s3_key (it has: {', '.join(body) or 'nothing'}); "
            "classify-image takes the body serialize-image-data answered."
        )
    s3_object = open_image(body)
    try:
        return s3_object["Body"].read()
    finally:
        s3_object["Body"].close()
