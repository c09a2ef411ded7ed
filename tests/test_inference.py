"""The serving handler's image reading (training/inference.py): photos as phones and cameras write them, and the
4xx answers to what it cannot or will not read, directly and through the local endpoint server. Images are made
in the tests."""

import http.client
import io
import json
import shutil
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from local.endpoint import EndpointServer, EndpointSpec
from local.endpoint.handler import load_inference_handler, toolkit_error
from training.inference import MAX_PIXELS, NEUTRAL, RequestError, input_fn, open_image, to_pixels

ROOT = Path(__file__).resolve().parent.parent
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)

# A stand-in for training/model.py beside the real inference.py, so that these tests do not depend on the network:
# its two outputs are the image's mean red and mean blue.
STUB_MODEL = """
import torch
from torch import nn

class MirrorAveraged(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return (self.model(images) + self.model(images.flip(3))) / 2

class MeanColour(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, images):
        return images.mean((2, 3))[:, [0, 2]] * self.scale

def from_settings(settings):
    return MeanColour()
"""


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def pixels_of(body: bytes, size: int = 32, resize: str = "stretch") -> np.ndarray:
    """The (size, size, 3) RGB pixels the model sees of body."""
    with open_image(body) as image:
        return to_pixels(image, size, resize).transpose(1, 2, 0).astype(int)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared_png(width: int, height: int) -> bytes:
    """A greyscale PNG whose header declares width x height, with one row of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(bytes(width + 1)))
        + png_chunk(b"IEND", b"")
    )


def declared_jpeg(width: int, height: int) -> bytes:
    """A small JPEG whose frame header is rewritten to declare width x height."""
    body = bytearray(encoded(Image.new("RGB", (16, 16), RED), "JPEG"))
    frame = body.index(b"\xff\xc0")  # SOF0: length (2), precision (1), height (2), width (2)
    body[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(body)


def halves(size=(40, 20), first=RED, second=BLUE) -> Image.Image:
    """An image whose left half is `first` and right half `second`."""
    image = Image.new("RGB", size, second)
    image.paste(first, (0, 0, size[0] // 2, size[1]))
    return image


def close(pixel, colour, tolerance=12) -> bool:
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


# ------------------------------------------------------------------------------------------ image modes


def test_exif_orientation_is_applied():
    upright = pixels_of(encoded(halves(), "JPEG", quality=95))
    assert close(upright[16, 4], RED) and close(upright[16, 28], BLUE)  # left red, right blue

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise
    rotated = pixels_of(encoded(halves(), "JPEG", quality=95, exif=exif))
    assert close(rotated[4, 16], RED) and close(rotated[28, 16], BLUE)  # the left half is now on top


@pytest.mark.parametrize(
    "image, kind, expected",
    [
        (Image.new("L", (30, 20), 100), "JPEG", (100, 100, 100)),
        (Image.new("L", (30, 20), 100), "PNG", (100, 100, 100)),
        (Image.new("1", (30, 20), 1), "PNG", (255, 255, 255)),
        (Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG", RED),  # CMYK red, as print workflows write it
        (Image.new("RGB", (30, 20), GREEN).quantize(4), "PNG", GREEN),  # palette
        (Image.new("RGB", (30, 20), GREEN), "WEBP", GREEN),
    ],
)
def test_any_mode_comes_out_as_its_rgb_colours(image, kind, expected):
    body = encoded(image, kind, **({"quality": 95} if kind in ("JPEG", "WEBP") else {}))
    assert close(pixels_of(body)[10, 10], expected)


def test_transparent_pixels_are_composited_on_neutral_grey():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 16, 32))  # left half opaque red, right half transparent
    pixels = pixels_of(encoded(rgba, "PNG"))
    assert close(pixels[16, 4], RED, 0) and close(pixels[16, 28], NEUTRAL, 0)

    grey_alpha = Image.new("LA", (32, 32), (0, 128))  # black, half transparent
    assert close(pixels_of(encoded(grey_alpha, "PNG"))[16, 16], (64, 64, 64), 2)

    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([*BLUE, *RED])
    palette.paste(0, (0, 0, 16, 32))
    pixels = pixels_of(encoded(palette, "PNG", transparency=1))  # palette entry 1 (red) transparent
    assert close(pixels[16, 4], BLUE, 0) and close(pixels[16, 28], NEUTRAL, 0)


def test_16_bit_greys_are_scaled_to_8_bits_not_clipped():
    image = Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16))  # mid grey of 0..65535
    body = encoded(image, "PNG")
    with Image.open(io.BytesIO(body)) as opened:
        assert opened.mode == "I;16" and opened.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # Pillow clips
    assert close(pixels_of(body)[10, 10], (128, 128, 128), 1)


# --------------------------------------------------------------------------------------------- geometry


def test_crop_takes_the_centre_square_and_pad_fits_the_whole_image():
    wide = Image.new("RGB", (300, 100), GREEN)  # thirds: red, green, blue
    wide.paste(RED, (0, 0, 100, 100))
    wide.paste(BLUE, (200, 0, 300, 100))
    body = encoded(wide, "PNG")

    cropped = pixels_of(body, 30, "crop")  # the middle third; the filter blends a little of its neighbours at the edges
    assert cropped.shape == (30, 30, 3) and all(close(pixel, GREEN, 0) for row in cropped[:, 1:-1] for pixel in row)
    assert all(close(pixel, GREEN, 32) for row in cropped for pixel in row)

    padded = pixels_of(body, 30, "pad")  # fitted to 30x10 in rows 10..19, neutral above and below
    assert all(close(pixel, NEUTRAL, 0) for row in (*padded[:10], *padded[20:]) for pixel in row)
    assert close(padded[15, 2], RED, 0) and close(padded[15, 15], GREEN, 0) and close(padded[15, 27], BLUE, 0)

    tall = pixels_of(encoded(wide.rotate(90, expand=True), "PNG"), 30, "pad")  # fitted to 10x30 in columns 10..19
    assert close(tall[15, 5], NEUTRAL, 0) and close(tall[15, 15], GREEN, 0) and close(tall[15, 25], NEUTRAL, 0)

    stretched = pixels_of(body, 30, "stretch")  # the first models' resize: the thirds fill the square
    assert close(stretched[2, 2], RED, 0) and close(stretched[2, 27], BLUE, 0)


def test_a_large_jpeg_decoded_at_reduced_scale_gives_the_pixels_of_a_full_decode():
    ramp = Image.linear_gradient("L").resize((4200, 2800))
    body = encoded(Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ramp)), "JPEG")
    with Image.open(io.BytesIO(body)) as full:
        full.load()  # decoded at full size: draft does nothing to a loaded image
        reference = to_pixels(full, 128, "crop").astype(int)
    with open_image(body) as image:
        reduced = to_pixels(image, 128, "crop").astype(int)
        assert image.size == (525, 350)  # decoded at 1/8 scale
    assert np.abs(reduced - reference).mean() < 2


# ------------------------------------------------------------------------------------- refused requests


@pytest.mark.parametrize(
    "body, size",
    [
        (declared_png(10_000, 6_000), "10000x6000"),
        (declared_jpeg(8_000, 8_000), "8000x8000"),
        (declared_png(20_000, 20_000), None),
    ],
    ids=["png-60MP", "jpeg-64MP", "png-400MP"],
)
def test_an_image_of_more_pixels_than_a_camera_makes_is_refused_413_without_being_decoded(body, size, monkeypatch):
    decoders = []
    monkeypatch.setattr(Image, "_getdecoder", lambda *arguments: decoders.append(arguments))
    start = time.perf_counter()
    with pytest.raises(RequestError) as refused:
        input_fn(body, "image/png")
    assert time.perf_counter() - start < 0.1 and decoders == []  # not a pixel decoded
    assert refused.value.status_code == 413
    what = f"the image is {size} pixels" if size else "the image has over 178 million pixels"  # Pillow's own limit
    assert refused.value.message == (
        f"{what}, more than the 50 megapixels this endpoint decodes: send the photo resized to fewer pixels"
    )


def test_the_pixel_limit_lets_a_camera_photo_through():
    side = int(MAX_PIXELS**0.5)
    with open_image(declared_png(side, side)) as image:  # only the header is read
        assert image.size == (side, side)


@pytest.mark.parametrize(
    "body",
    [
        encoded(halves((400, 300)), "JPEG")[:2000],
        encoded(halves((400, 300)), "PNG")[:300],
        b"not an image",
        b"",
        encoded(halves(), "TIFF"),  # a format no phone writes: its decoder is not reached
    ],
    ids=["truncated-jpeg", "truncated-png", "text", "empty", "tiff"],
)
def test_a_body_that_is_no_readable_image_is_refused_400(body):
    with pytest.raises(RequestError) as refused:
        input_fn(body, "image/jpeg")
    assert refused.value.status_code == 400
    assert "not a decodable image" in refused.value.message
    assert isinstance(refused.value, ValueError)  # as input_fn raised before


def test_a_content_type_other_than_an_image_is_refused_415():
    with pytest.raises(RequestError, match="unsupported content type 'text/csv'") as refused:
        input_fn(encoded(halves(), "PNG"), "text/csv")
    assert refused.value.status_code == 415


def test_request_errors_have_the_shape_the_inference_toolkit_answers():
    error = RequestError(413, "too many pixels")
    assert (error.status_code, error.message, error.phrase, str(error)) == (413, *["too many pixels"] * 3)
    assert "BaseInferenceToolkitError" in {kind.__name__ for kind in type(error).__mro__}
    answer = toolkit_error(error)
    assert (answer.status, answer.message) == (413, "too many pixels")
    assert toolkit_error(ValueError("plain")) is None


# ------------------------------------------------------------------------------- served from model.json


@pytest.fixture
def stub_model_dir(tmp_path) -> Path:
    """A model directory served by the real inference.py, with a stub model.py, at 48 px, padded."""
    model_dir = tmp_path / "model"
    (model_dir / "code").mkdir(parents=True)
    shutil.copyfile(ROOT / "training" / "inference.py", model_dir / "code" / "inference.py")
    (model_dir / "code" / "model.py").write_text(STUB_MODEL)
    settings = {"classes": ["bicycle", "motorcycle"], "flip_tta": True, "temperature": 1.0}
    (model_dir / "model.json").write_text(json.dumps({**settings, "image_size": 48, "resize": "pad"}))
    torch.save({"scale": torch.ones(1)}, model_dir / "model.pt")
    return model_dir


def test_model_json_sets_the_size_and_resize_input_fn_uses(stub_model_dir):
    handler = load_inference_handler(stub_model_dir / "code", "scones_test_stub_inference")
    model = handler.model_fn(str(stub_model_dir))
    inputs = handler.input_fn(encoded(Image.new("RGB", (200, 100), RED), "PNG"), "image/png")
    assert inputs.shape == (1, 3, 48, 48)
    assert close(inputs[0, :, 2, 24].mul(255).round().tolist(), NEUTRAL, 1)  # padded above
    assert close(inputs[0, :, 24, 24].mul(255).round().tolist(), RED, 1)
    probabilities = json.loads(handler.output_fn(handler.predict_fn(inputs, model), "application/json")[0])
    assert len(probabilities) == 2 and sum(probabilities) == pytest.approx(1)


def test_the_local_server_answers_a_bomb_413_with_its_message(stub_model_dir, tmp_path):
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in stub_model_dir.rglob("*"):
            tar.add(path, path.relative_to(stub_model_dir).as_posix(), recursive=False)
    with EndpointServer([EndpointSpec("photos", archive)]) as server:
        answers = {}
        for name, body in [("photo", encoded(halves((120, 80)), "JPEG")), ("bomb", declared_png(10_000, 6_000))]:
            for path in ("/endpoints/photos/invocations", "/invocations"):
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                connection.request("POST", path, body=body, headers={"Content-Type": "image/png"})
                response = connection.getresponse()
                answers[name, path] = response.status, json.loads(response.read())
                connection.close()
    status, probabilities = answers["photo", "/invocations"]
    assert status == 200 and len(probabilities) == 2
    status, runtime_error = answers["bomb", "/endpoints/photos/invocations"]
    assert (status, runtime_error["OriginalStatusCode"]) == (424, 413)  # SageMaker's ModelError
    assert runtime_error["OriginalMessage"].startswith("the image is 10000x6000 pixels, more than the 50 megapixels")
    status, container_error = answers["bomb", "/invocations"]
    assert (status, container_error["code"]) == (413, 413)
    assert container_error["message"] == runtime_error["OriginalMessage"]
