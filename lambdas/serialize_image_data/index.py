"""Step 1: read the image at `s3_bucket`/`s3_key` and pass it on base64-encoded as `image_data`."""

import base64
import functools

import boto3
from botocore.exceptions import ClientError
from common import (
    ImageNotFound,
    ImageTooLarge,
    InvalidConfiguration,
    NotAnImage,
    answer,
    image_content_type,
    image_location,
    read_body,
    setting,
)

# A Step Functions state is capped at 256 KB and base64 makes the image 4/3 larger: 180,000 bytes become
# 240,000 characters, which leaves room for the rest of the state. The endpoint alone would take 6 MB.
DEFAULT_MAX_IMAGE_BYTES = 180_000

# Without s3:ListBucket on the bucket, S3 answers a missing key with AccessDenied rather than NoSuchKey.
MISSING_OBJECT_ERRORS = ("NoSuchKey", "NoSuchBucket", "AccessDenied")


@functools.cache
def s3_client():
    return boto3.client("s3")


def max_image_bytes() -> int:
    text = setting("MAX_IMAGE_BYTES", str(DEFAULT_MAX_IMAGE_BYTES))
    if not text.isdigit() or int(text) == 0:
        raise InvalidConfiguration(f"MAX_IMAGE_BYTES={text!r} is not a positive whole number of bytes.")
    return int(text)


def handler(event, context):
    body = read_body(event, "s3_bucket", "s3_key")
    location = image_location(body)
    limit = max_image_bytes()
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
    if size > limit:
        s3_object["Body"].close()
        raise ImageTooLarge(
            f"{location} is {size:,} bytes, over the limit of {limit:,} (MAX_IMAGE_BYTES): the "
            "image travels base64-encoded, 4/3 larger, in the Step Functions state, which is "
            "capped at 256 KB. Resize or recompress the image."
        )
    data = s3_object["Body"].read()
    if image_content_type(data) is None:
        what = "empty" if not data else f"not a PNG or JPEG image (it starts with {data[:8]!r})"
        raise NotAnImage(f"{location} is {what}: point s3_key at a PNG or JPEG image.")
    return answer(
        {
            "image_data": base64.b64encode(data).decode("ascii"),
            "s3_bucket": body["s3_bucket"],
            "s3_key": body["s3_key"],
            "inferences": [],
        }
    )
