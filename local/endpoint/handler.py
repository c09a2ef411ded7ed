"""A model's `code/inference.py` under the handler contract of SageMaker's PyTorch inference container
(`model_fn`, `input_fn`, `predict_fn`, `output_fn`), with the inference toolkit's defaults where it defines none."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


class InvocationError(Exception):
    """The container's answer to a request it could not serve: an HTTP status and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def toolkit_error(error: BaseException) -> InvocationError | None:
    """The answer of SageMaker's inference toolkit to an error that a handler function raised, if it is a
    `sagemaker_inference.errors.BaseInferenceToolkitError`: its `status_code` and `message` (the toolkit's
    transformer sends those; any other exception is its 500). Where the toolkit is not installed, a model's class of
    that name and shape stands for it, as training/inference.py defines one."""
    names = {kind.__name__ for kind in type(error).__mro__}
    status, message = getattr(error, "status_code", None), getattr(error, "message", None)
    if "BaseInferenceToolkitError" in names and isinstance(status, int) and 400 <= status < 600:
        return InvocationError(status, str(message))
    return None


@dataclass(frozen=True)
class InferenceHandler:
    """The functions of a model's inference.py, with the toolkit's defaults where it defines none."""

    model_fn: Callable
    input_fn: Callable
    predict_fn: Callable
    output_fn: Callable


def default_input_fn(request_body, content_type):
    # The toolkit's default decoders read JSON, CSV and NPY but no image type: SageMaker answers 415 as well.
    raise InvocationError(415, f"the model's inference.py defines no input_fn to read {content_type}")


def default_predict_fn(data, model):
    import torch

    with torch.no_grad():
        return model(data)


def default_output_fn(prediction, accept):
    return json.dumps(prediction.tolist() if hasattr(prediction, "tolist") else prediction), "application/json"


def load_inference_handler(code_dir: Path, module_name: str) -> InferenceHandler:
    """Import `code_dir/inference.py` as `module_name`, with `code_dir` on sys.path while it imports.

    The modules it imports from `code_dir` (such as `model.py`) are its own: a second model served by the
    same process imports its own siblings, not the first one's from sys.modules.
    """
    siblings = {path.stem for path in code_dir.glob("*.py")} | {
        path.name for path in code_dir.iterdir() if path.is_dir()
    }
    is_sibling = lambda name: name.split(".")[0] in siblings  # noqa: E731
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if is_sibling(name)}
    module_spec = importlib.util.spec_from_file_location(module_name, code_dir / "inference.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(code_dir))
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        sys.path.remove(str(code_dir))
        for name in [name for name in sys.modules if is_sibling(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
    return _handler_of(module)


def _handler_of(module: ModuleType) -> InferenceHandler:
    if not hasattr(module, "model_fn"):
        raise ValueError(f"{module.__file__} defines no model_fn")
    if hasattr(module, "transform_fn"):
        raise ValueError(f"{module.__file__} defines transform_fn, which this server does not support")
    return InferenceHandler(
        model_fn=module.model_fn,
        input_fn=getattr(module, "input_fn", default_input_fn),
        predict_fn=getattr(module, "predict_fn", default_predict_fn),
        output_fn=getattr(module, "output_fn", default_output_fn),
    )


def answer_of(output, accept: str) -> tuple[bytes, str]:
    """output_fn's result as (body, content type): the toolkit takes a body alone, typed as Accept, or a pair."""
    body, content_type = output if isinstance(output, tuple) else (output, accept)
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray)):
        raise TypeError(f"output_fn returned {type(body).__name__}, not bytes or str")
    return bytes(body), content_type


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()
