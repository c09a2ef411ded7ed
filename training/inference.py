"""The model's handler in SageMaker's PyTorch inference container: `model_fn`, `input_fn`, `predict_fn`,
`output_fn`, and the image preprocessing that training shares.

Training copies this file and `model.py` into the model as `code/`; nothing else serves. The answer is a JSON
list of the target classes' probabilities in label order, e.g. `[p_bicycle, p_motorcycle]`, after the
temperature fitted on held-out images. `1 - sum` is the probability that the photo is neither: 0 for the
first models (`resnet9`), which answer the targets alone; the photo model (`efficientnet_lite0`, `model.ts`)
has an output for neither. Clients that test `max(p) >= threshold` work with both.

`input_fn` reads any JPEG or PNG a phone or a camera writes (and WebP, GIF, BMP): EXIF orientation applied, any
mode converted to RGB, any size made square as `model.json` says (`image_size`, and `resize`: "crop", "pad", or
"stretch" when absent, as the first 32-pixel models were trained). A request it cannot read is answered with a
4xx and a message saying what to do: 415 for a content type other than an image, 413 for an image of more than
MAX_PIXELS (refused from its header, never decoded), 400 for a body that is no readable image.
"""

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

if __package__:  # imported from this repository as training.inference
    from .model import MirrorAveraged, from_settings
else:  # code/inference.py, with code/ on the path, as the serving container imports it
    from model import MirrorAveraged, from_settings

try:
    from sagemaker_inference.errors import BaseInferenceToolkitError
except ImportError:  # outside the container; local.endpoint answers this shape as the toolkit answers its own

    class BaseInferenceToolkitError(Exception):
        """sagemaker_inference.errors.BaseInferenceToolkitError: the toolkit answers it with `status_code`,
        `message` as the body and `phrase` as the reason; any other exception is answered 500."""

        def __init__(self, status_code, message, phrase):
            self.status_code = status_code
            self.message = message
            self.phrase = phrase
            super().__init__(status_code, message, phrase)


IMAGE_CONTENT_TYPES = ("image/png", "image/jpeg", "application/x-image")
# Formats that phones, cameras and browsers write; Pillow's other decoders (EPS runs Ghostscript) are not reached.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # "JPEG" opens MPO too (phones' multi-picture JPEGs)
# Cameras make at most about 50 megapixels (phones' 200 MP modes write files far over the 6 MiB request limit);
# an image that claims more is a decompression bomb: 50 MP decode to 150 MB of RGB, 20000x20000 to 1.2 GB.
MAX_PIXELS = 50_000_000
DEFAULT_IMAGE_SIZE = 32  # models whose model.json says no image_size and resize: 32x32, stretched
DEFAULT_RESIZE = "stretch"
RESIZES = ("crop", "pad", "stretch")
NEUTRAL = (128, 128, 128)  # the background of transparent pixels and the padding: mid grey

# The geometry of the model that model_fn loaded: input_fn is not given the model.
_image_size, _resize = DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE


class RequestError(BaseInferenceToolkitError, ValueError):
    """A request the model cannot answer: the 4xx status the caller gets, and a message saying what to do."""

    def __init__(self, status_code: int, message: str):
        super().__init__(status_code, message, message)

    def __str__(self):
        return self.message


def open_image(body: bytes) -> Image.Image:
    """The image in `body`, its header read and its pixels not yet decoded; raises RequestError (413) for one of
    more than MAX_PIXELS, or (400) for a body that is no image of IMAGE_FORMATS."""
    try:
        image = Image.open(io.BytesIO(body), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:  # Pillow's own limit, twice MAX_IMAGE_PIXELS: far above ours
        raise too_many_pixels(f"the image has over {2 * Image.MAX_IMAGE_PIXELS // 1_000_000} million pixels") from None
    except Exception as error:  # UnidentifiedImageError's message names only a BytesIO
        why = "" if isinstance(error, UnidentifiedImageError) else f" ({error})"
        raise RequestError(400, f"the request body is not a decodable image{why}: send a JPEG or PNG file") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise too_many_pixels(f"the image is {width}x{height} pixels")
    return image


def too_many_pixels(what: str) -> RequestError:
    return RequestError(
        413,
        f"{what}, more than the {MAX_PIXELS // 1_000_000} megapixels this endpoint decodes: "
        "send the photo resized to fewer pixels",
    )


def to_pixels(image: Image.Image, size: int = DEFAULT_IMAGE_SIZE, resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """The 3 x size x size uint8 RGB array the model sees of an opened image (see `square` for `resize`)."""
    # A JPEG decoded at 1/2, 1/4 or 1/8 scale, still at least twice the size: a fraction of the work.
    image.draft("RGB", (2 * size, 2 * size))
    ImageOps.exif_transpose(image, in_place=True)
    image = square(to_rgb(image), size, resize)
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB: transparent pixels on NEUTRAL, 16-bit greys scaled to 8 bits (Pillow clips them)."""
    if image.mode.startswith("I"):  # I;16, I;16B, I: 16-bit greyscale PNG
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, NEUTRAL)
        image.paste(rgba, mask=rgba.getchannel("A"))
    return image.convert("RGB")


def square(image: Image.Image, size: int, resize: str) -> Image.Image:
    """The image resized to size x size. "crop" takes the largest centred square, "pad" fits the whole image in
    and fills the rest with NEUTRAL: both keep proportions. "stretch" (the first models) does not."""
    width, height = image.size
    if resize == "crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    if resize == "pad":
        scale = size / max(width, height)
        fitted = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
        padded = Image.new("RGB", (size, size), NEUTRAL)
        padded.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
        return padded
    if resize == "stretch":
        return image if image.size == (size, size) else image.resize((size, size), Image.BILINEAR)
    raise ValueError(f"resize {resize!r} is none of {', '.join(RESIZES)}")


def to_inputs(pixels) -> torch.Tensor:
    """uint8 pixels (N, 3, size, size) to the float 0..1 tensor the model takes."""
    return torch.as_tensor(pixels).float().div(255)


def model_fn(model_dir):
    global _image_size, _resize
    model_dir = Path(model_dir)
    settings = json.loads((model_dir / "model.json").read_text())
    size, resize = settings.get("image_size", DEFAULT_IMAGE_SIZE), settings.get("resize", DEFAULT_RESIZE)
    if resize not in RESIZES:
        raise ValueError(f"model.json: resize {resize!r} is none of {', '.join(RESIZES)}")
    _image_size, _resize = size, resize
    if (model_dir / "model.ts").is_file():  # the photo model: a frozen TorchScript graph, needing torch only
        return {"model": torch.jit.load(model_dir / "model.ts", map_location="cpu").eval(), "settings": settings}
    model = from_settings(settings)
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    model = model.to(memory_format=torch.channels_last).eval()
    return {"model": frozen(MirrorAveraged(model) if settings["flip_tta"] else model, size), "settings": settings}


def frozen(model: nn.Module, size: int) -> torch.jit.ScriptModule:
    """The model as a frozen TorchScript graph, batch norm folded into the convolutions. Besides being faster, a
    prediction is one call into C++ that lets go of the GIL once, where the eager model takes it back after each
    of its ~40 operations and waits each time for the server's other busy threads."""
    example = torch.zeros(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    # TorchScript is deprecated for torch.compile, which needs a C++ compiler where the model is served and
    # compiles for seconds; TorchScript runs in every PyTorch container SageMaker has.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.freeze(torch.jit.trace(model.eval(), example))


def input_fn(request_body, content_type):
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in IMAGE_CONTENT_TYPES:
        raise RequestError(
            415, f"unsupported content type {content_type!r}: send one of {', '.join(IMAGE_CONTENT_TYPES)}"
        )
    with open_image(request_body) as image:
        try:
            pixels = to_pixels(image, _image_size, _resize)
        except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ... on bad data
            raise RequestError(
                400, f"the request body is not a decodable image ({content_type}): {error}: send a whole JPEG or PNG"
            ) from None
    return to_inputs(pixels[None])


def predict_fn(data, model):
    """The target classes' probabilities. A model with a "neither" output (model.json `neither`) answers them out of
    all its outputs, so that 1 - their sum is the probability of neither; the first models answer them alone."""
    settings, targets = model["settings"], len(model["settings"]["classes"])
    with torch.no_grad():
        logits = model["model"](data.contiguous(memory_format=torch.channels_last))
    if not settings.get("neither"):
        logits = logits[:, :targets]
    return torch.softmax(logits / settings["temperature"], dim=1)[:, :targets]


def output_fn(prediction, accept):
    return json.dumps(prediction[0].tolist()), "application/json"
