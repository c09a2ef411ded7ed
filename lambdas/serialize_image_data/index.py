"""Step 1: check the image at `s3_bucket`/`s3_key` and pass it on, inline when small, else by reference.

An image of at most INLINE_IMAGE_BYTES travels base64-encoded as `image_data`, as the classic workflow
passed it; a larger one (up to the endpoint's 6 MB) travels as its S3 location with its size as
`image_bytes`, and the classify step reads it from S3 itself.
"""

import base64

from common import NotAnImage, answer, image_content_type, image_location, open_image, read_body

# A Step Functions state is capped at 256 KB and base64 makes the image 4/3 larger: 180,000 bytes become
# 240,000 characters, which leaves room for the rest of the state.
INLINE_IMAGE_BYTES = 180_000
# Enough of the object to tell a PNG or JPEG by its magic bytes.
HEADER_BYTES = 16


def handler(event, context):
    body = read_body(event, "s3_bucket", "s3_key")
    s3_object = open_image(body)
    size = s3_object["ContentLength"]
    inline = size <= INLINE_IMAGE_BYTES
    try:
        data = s3_object["Body"].read() if inline else s3_object["Body"].read(HEADER_BYTES)
    finally:
        s3_object["Body"].close()
    if image_content_type(data) is None:
        what = "empty" if not data else f"not a PNG or JPEG image (it starts with {data[:8]!r})"
        raise NotAnImage(f"{image_location(body)} is {what}: point s3_key at a PNG or JPEG image.")
    location = {"s3_bucket": body["s3_bucket"], "s3_key": body["s3_key"]}
    if inline:
        return answer({"image_data": base64.b64encode(data).decode("ascii"), **location, "inferences": []})
    return answer({**location, "image_bytes": size, "inferences": []})
