"""The model's handler in SageMaker's PyTorch inference container: `model_fn`, `input_fn`, `predict_fn`,
`output_fn`, and the image preprocessing that training shares.

Training copies this file and `model.py` into the model as `code/`; nothing else serves. The answer is a JSON
list of the target classes' probabilities in label order, e.g. `[p_bicycle, p_motorcycle]`, after the
temperature fitted on their validation images.
"""

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

if __package__:  # imported from this repository as training.inference
    from .model import IMAGE_SIZE, MirrorAveraged, from_settings
else:  # code/inference.py, with code/ on the path, as the serving container imports it
    from model import IMAGE_SIZE, MirrorAveraged, from_settings

IMAGE_CONTENT_TYPES = ("image/png", "image/jpeg", "application/x-image")


def to_pixels(image: Image.Image) -> np.ndarray:
    """The 3x32x32 uint8 array the model sees: RGB, resized to 32x32 when the size differs."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)


def to_inputs(pixels) -> torch.Tensor:
    """uint8 pixels (N, 3, 32, 32) to the float 0..1 tensor the model takes."""
    return torch.as_tensor(pixels).float().div(255)


def model_fn(model_dir):
    model_dir = Path(model_dir)
    settings = json.loads((model_dir / "model.json").read_text())
    model = from_settings(settings)
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    model = model.to(memory_format=torch.channels_last).eval()
    return {"model": frozen(MirrorAveraged(model) if settings["flip_tta"] else model), "settings": settings}


def frozen(model: nn.Module) -> torch.jit.ScriptModule:
    """The model as a frozen TorchScript graph, batch norm folded into the convolutions. Besides being faster, a
    prediction is one call into C++ that lets go of the GIL once, where the eager model takes it back after each
    of its ~40 operations and waits each time for the server's other busy threads."""
    example = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=torch.channels_last)
    # TorchScript is deprecated for torch.compile, which needs a C++ compiler where the model is served and
    # compiles for seconds; TorchScript runs in every PyTorch container SageMaker has.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.freeze(torch.jit.trace(model.eval(), example))


def input_fn(request_body, content_type):
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in IMAGE_CONTENT_TYPES:
        raise ValueError(f"unsupported content type {content_type!r}: send one of {', '.join(IMAGE_CONTENT_TYPES)}")
    try:
        with Image.open(io.BytesIO(request_body)) as image:
            pixels = to_pixels(image)
    except (OSError, SyntaxError, ValueError, TypeError) as error:
        raise ValueError(f"the request body is not a decodable image ({content_type}): {error}") from None
    return to_inputs(pixels[None])


def predict_fn(data, model):
    settings = model["settings"]
    with torch.no_grad():
        logits = model["model"](data.contiguous(memory_format=torch.channels_last))[:, : len(settings["classes"])]
    return torch.softmax(logits / settings["temperature"], dim=1)


def output_fn(prediction, accept):
    return json.dumps(prediction[0].tolist()), "application/json"
