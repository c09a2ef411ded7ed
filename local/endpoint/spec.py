"""What an endpoint serves: its model archive and its data capture, and their JSON form (the spec file of
`python -m local.endpoint --spec`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monitoring.captures import split_s3_uri

VARIANT_NAME = "AllTraffic"
CAPTURE_MODES = ("Input", "Output")


@dataclass(frozen=True)
class CaptureSpec:
    """An endpoint's data capture, as its EndpointConfig's DataCaptureConfig sets it."""

    destination: str  # DestinationS3Uri, e.g. "s3://bucket/data_capture"
    sampling_percentage: int = 100  # InitialSamplingPercentage
    modes: tuple[str, ...] = CAPTURE_MODES
    json_content_types: tuple[str, ...] = ()  # captured as text with encoding "JSON"; other types as "BASE64"
    csv_content_types: tuple[str, ...] = ()  # captured as text with encoding "CSV"
    kms_key_id: str | None = None  # KmsKeyId: captures are written with SSE-KMS under this key

    def __post_init__(self):
        if not self.destination.startswith("s3://") or not split_s3_uri(self.destination)[0]:
            raise ValueError(f"capture destination {self.destination!r} is not an s3://bucket[/prefix] URI")
        if not 0 <= self.sampling_percentage <= 100:
            raise ValueError(f"sampling percentage {self.sampling_percentage} is outside 0..100")
        if not self.modes or not set(self.modes) <= set(CAPTURE_MODES):
            raise ValueError(f"capture modes {self.modes} are not a non-empty subset of {CAPTURE_MODES}")

    @classmethod
    def from_data_capture_config(cls, config: dict | None) -> CaptureSpec | None:
        """The capture a DataCaptureConfig (CloudFormation or API shape) asks for; None when it is off."""
        if not config or not config.get("EnableCapture", True):
            return None
        modes = set()
        for option in config["CaptureOptions"]:
            mode = option["CaptureMode"]
            modes.update(CAPTURE_MODES if mode == "InputAndOutput" else (mode,))
        header = config.get("CaptureContentTypeHeader") or {}
        return cls(
            destination=config["DestinationS3Uri"],
            sampling_percentage=int(config["InitialSamplingPercentage"]),
            modes=tuple(mode for mode in CAPTURE_MODES if mode in modes),
            json_content_types=tuple(header.get("JsonContentTypes", ())),
            csv_content_types=tuple(header.get("CsvContentTypes", ())),
            kms_key_id=config.get("KmsKeyId"),
        )


@dataclass(frozen=True)
class EndpointSpec:
    name: str  # EndpointName
    model_data: Path  # a local model.tar.gz
    capture: CaptureSpec | None = None


def spec_from_json(data: dict) -> EndpointSpec:
    """An EndpointSpec from its JSON form (as `spec_to_json` writes it)."""
    capture = data.get("capture")
    if capture is not None:
        capture = CaptureSpec(
            **{key: tuple(value) if isinstance(value, list) else value for key, value in capture.items()}
        )
    return EndpointSpec(name=data["name"], model_data=Path(data["model_data"]), capture=capture)


def spec_to_json(spec: EndpointSpec) -> dict:
    capture = spec.capture
    return {
        "name": spec.name,
        "model_data": str(spec.model_data),
        "capture": None
        if capture is None
        else {
            "destination": capture.destination,
            "sampling_percentage": capture.sampling_percentage,
            "modes": list(capture.modes),
            "json_content_types": list(capture.json_content_types),
            "csv_content_types": list(capture.csv_content_types),
            "kms_key_id": capture.kms_key_id,
        },
    }
