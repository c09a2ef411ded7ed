"""A local stand-in for SageMaker real-time endpoints, with Model Monitor's data capture.

An HTTP server on 127.0.0.1 serves one or more endpoints, each a model.tar.gz run by its own `code/inference.py`,
as SageMaker's PyTorch inference container runs it, at the SageMaker Runtime path and the container paths.

- spec.py: what an endpoint serves (EndpointSpec, CaptureSpec) and its JSON form;
- handler.py: loading `inference.py`, the toolkit's defaults, answers as bytes;
- capture.py: Model Monitor's capture records, spooled before each answer and uploaded to S3 (CaptureSpool);
- batching.py: requests that arrive while the model is busy, predicted together (PredictionBatcher);
- server.py: the endpoints and the HTTP server (EndpointServer);
- cli.py: `python -m local.endpoint --spec FILE --spool-dir DIR [--port N] [--ready-file FILE]`.
"""

from local.endpoint.capture import CaptureError, CaptureSpool
from local.endpoint.cli import main
from local.endpoint.handler import load_inference_handler
from local.endpoint.server import MAX_PAYLOAD_BYTES, EndpointServer
from local.endpoint.spec import CaptureSpec, EndpointSpec, spec_from_json, spec_to_json

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "CaptureError",
    "CaptureSpec",
    "CaptureSpool",
    "EndpointServer",
    "EndpointSpec",
    "load_inference_handler",
    "main",
    "spec_from_json",
    "spec_to_json",
]
