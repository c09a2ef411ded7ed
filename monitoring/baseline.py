"""The baseline: what the model answers on its validation images and what its training images look like.

The validation images are those of the model's classes (labels 0..n-1 of the staged manifest), the traffic the
endpoint is there for; so the "neither" share of the baseline is how often the model calls a bicycle or a
motorcycle neither, and a window with many photos of something else stands out against it.

Written as Model Monitor's `statistics.json` and `constraints.json` (same keys where they fit; a numerical
feature's KLL sketch holds every value when there are fewer than its `k`, as a KLL sketch of so few items does).
The thresholds of the checks go into constraints.json, so that the report reads them from there as Model
Monitor's container does; their defaults and the reasons for them are in `monitoring.checks`.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import uuid
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from monitoring import captures, checks
from monitoring.captures import CHANNELS

SKETCH_K = 2048  # Model Monitor's KLL parameter k; more values than this are kept as k evenly spaced quantiles
KLL_BUCKETS = 10
PREDICTION_BATCH = 256
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg"}  # staged photos may be JPEGs; CIFAR's are PNGs


class BaselineError(Exception):
    """A user mistake about the model or the data (missing file, empty manifest); printed as one line."""


# ------------------------------------------------------------------------------------------ computation


def manifest_images(data_dir: Path, manifest: str, labels: int) -> list[Path]:
    """Images of labels 0..labels-1 listed in a staged `.lst` manifest (index, label, relative path)."""
    path = data_dir / manifest
    if not path.is_file():
        raise BaselineError(f"no {manifest} in {data_dir} (stage the data with `python -m training.etl`)")
    images = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        try:
            label = int(float(fields[1]))
        except ValueError:
            raise BaselineError(
                f"{path}:{number}: the label {fields[1]!r} is not a number (lines are index, label "
                "and path, tab-separated, as `python -m training.etl` stages them)"
            ) from None
        if label < labels:
            images.append(data_dir / fields[-1])
    if not images:
        raise BaselineError(f"{path} lists no images of the model's classes")
    missing = [image for image in images if not image.is_file()]
    if missing:
        raise BaselineError(f"{path} lists {len(missing)} image(s) that are not there, such as {missing[0]}")
    return images


def load_model(model_archive: Path):
    """The model's inference handler, the model its model_fn loads, and its model.json settings."""
    from local.endpoint import load_inference_handler  # imported when needed: the report needs no model

    if not model_archive.is_file():
        raise BaselineError(f"no model archive {model_archive}")
    with tempfile.TemporaryDirectory(prefix="scones-baseline-") as model_dir:
        try:
            with tarfile.open(model_archive) as archive:
                archive.extractall(model_dir, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError):
            raise BaselineError(
                f"{model_archive} is not a model archive (the model.tar.gz that training writes)"
            ) from None
        settings_path = Path(model_dir, "model.json")
        if not Path(model_dir, "code", "inference.py").is_file() or not settings_path.is_file():
            raise BaselineError(f"{model_archive} has no code/inference.py or model.json")
        handler = load_inference_handler(Path(model_dir, "code"), f"scones_baseline_{uuid.uuid4().hex[:8]}")
        return handler, handler.model_fn(model_dir), json.loads(settings_path.read_text())


def predict(handler, model, images: list[Path]) -> np.ndarray:
    """Probabilities the model answers for each image, through its own inference.py.

    input_fn reads each image's bytes, predict_fn runs on batches of input_fn's results (torch tensors with
    the batch first, as the PyTorch container's handlers take them), output_fn answers each row as JSON.
    """
    import torch

    answers = []
    for start in range(0, len(images), PREDICTION_BATCH):
        batch = torch.cat(
            [
                handler.input_fn(path.read_bytes(), CONTENT_TYPES.get(path.suffix.lower(), "image/png"))
                for path in images[start : start + PREDICTION_BATCH]
            ]
        )
        prediction = handler.predict_fn(batch, model)
        for row in range(len(batch)):
            body, _ = handler.output_fn(prediction[row : row + 1], "application/json")
            answers.append(json.loads(body))
    return np.array(answers, dtype=float)


def image_statistics(images: list[Path]) -> dict:
    """Per-image channel means and standard deviations (0..1), border-minus-centre luminance, sizes and formats,
    as captures.py computes them."""
    means, stds, contrasts, sizes, formats = [], [], [], [], []
    for path in images:
        with Image.open(path) as image:
            mean, std, contrast = captures.image_statistics(np.asarray(image.convert("RGB"))[None])
            sizes.append(f"{image.width}x{image.height}")
            formats.append(f"{image.format}/{image.mode}")
        means.append(mean[0])
        stds.append(std[0])
        contrasts.append(contrast[0])
    return {
        "channel_means": np.array(means),
        "channel_stds": np.array(stds),
        "border_minus_centre": np.array(contrasts),
        "sizes": sizes,
        "formats": formats,
    }


def compute(model_archive: Path, data_dir: Path) -> tuple[dict, dict]:
    """statistics.json and constraints.json of the model's validation answers and its training images."""
    handler, model, settings = load_model(model_archive)
    classes = settings["classes"]
    probabilities = predict(handler, model, manifest_images(data_dir, "validation.lst", len(classes)))
    training = image_statistics(manifest_images(data_dir, "train.lst", len(classes)))
    return statistics_of(probabilities, training, settings)


def statistics_of(probabilities: np.ndarray, training: dict, settings: dict) -> tuple[dict, dict]:
    """statistics.json and constraints.json of validation answers (N, classes), statistics of training images (as
    image_statistics answers them) and the model's model.json settings."""
    classes, threshold = settings["classes"], float(settings["threshold"])
    top = probabilities.max(axis=1)
    neither = checks.neither_most_likely(probabilities)
    # As the class-mix check reads a window: the classes of the answers that name one.
    predicted = [classes[index] for index in probabilities[~neither].argmax(axis=1)]
    features = [
        categorical_feature("prediction", predicted, classes),
        numerical_feature("top_probability", top),
        numerical_feature("low_confidence", (top < threshold).astype(float), "Integral"),
        numerical_feature("neither", neither.astype(float), "Integral"),
        numerical_feature("neither_probability", checks.neither_probability(probabilities)),
    ]
    for channel, name in enumerate(CHANNELS):
        features.append(numerical_feature(f"image_mean_{name}", training["channel_means"][:, channel]))
    for channel, name in enumerate(CHANNELS):
        features.append(numerical_feature(f"image_std_{name}", training["channel_stds"][:, channel]))
    features.append(numerical_feature(checks.BORDER_FEATURE, training["border_minus_centre"]))
    features += [
        categorical_feature("image_size", training["sizes"]),
        categorical_feature("image_format", training["formats"]),
    ]
    statistics = {
        "version": 0,
        "dataset": {"item_count": len(top), "image_count": len(training["sizes"])},
        "model": {"classes": classes, "threshold": threshold, "temperature": settings.get("temperature")},
        "features": features,
    }
    return statistics, constraints_of(statistics)


def numerical_feature(name: str, values: np.ndarray, inferred_type: str = "Fractional") -> dict:
    values = np.sort(np.asarray(values, dtype=float))
    edges = np.linspace(values[0], values[-1], KLL_BUCKETS + 1)
    counts, _ = np.histogram(values, edges)
    sketch = values if len(values) <= SKETCH_K else np.quantile(values, np.linspace(0, 1, SKETCH_K))
    return {
        "name": name,
        "inferred_type": inferred_type,
        "numerical_statistics": {
            "common": {"num_present": len(values), "num_missing": 0},
            "mean": float(values.mean()),
            "sum": float(values.sum()),
            "std_dev": float(values.std()),
            "min": float(values[0]),
            "max": float(values[-1]),
            "distribution": {
                "kll": {
                    "buckets": [
                        {"lower_bound": float(low), "upper_bound": float(high), "count": int(count)}
                        for low, high, count in zip(edges[:-1], edges[1:], counts, strict=True)
                    ],
                    "sketch": {"parameters": {"c": 0.64, "k": SKETCH_K}, "data": [sketch.tolist()]},
                }
            },
        },
    }


def categorical_feature(name: str, values: list[str], domain: list[str] | None = None) -> dict:
    """A String feature; `domain` lists values to report even when absent (count 0), in that order."""
    counts = dict.fromkeys(domain or [], 0)
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return {
        "name": name,
        "inferred_type": "String",
        "string_statistics": {
            "common": {"num_present": len(values), "num_missing": 0},
            "distinct_count": sum(1 for count in counts.values() if count),
            "distribution": {
                "categorical": {"buckets": [{"value": value, "count": count} for value, count in counts.items()]}
            },
        },
    }


def constraints_of(statistics: dict) -> dict:
    features = []
    for feature in statistics["features"]:
        constraint = {"name": feature["name"], "inferred_type": feature["inferred_type"], "completeness": 1.0}
        if "string_statistics" in feature:
            buckets = feature["string_statistics"]["distribution"]["categorical"]["buckets"]
            constraint["string_constraints"] = {"domains": [bucket["value"] for bucket in buckets]}
        else:
            constraint["num_constraints"] = {"is_non_negative": feature["numerical_statistics"]["min"] >= 0}
        features.append(constraint)
    return {
        "version": 0,
        "features": features,
        "model": statistics["model"],
        "monitoring_config": checks.default_monitoring_config(),
    }


# --------------------------------------------------------------------------------------------- files
# A baseline location is a folder or an S3 prefix (s3://bucket/monitoring/baseline/), where the hourly drift
# job of the monitoring stack reads it.
BASELINE_FILES = ("statistics.json", "constraints.json")


def _s3_location(location: str) -> tuple[str, str]:
    bucket, prefix = captures.split_s3_uri(location)
    return bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/"


def write(statistics: dict, constraints: dict, out: Path | str) -> None:
    contents = [json.dumps(document, indent=2) + "\n" for document in (statistics, constraints)]
    if str(out).startswith("s3://"):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = _s3_location(str(out))
        try:
            for name, content in zip(BASELINE_FILES, contents, strict=True):
                boto3.client("s3").put_object(
                    Bucket=bucket, Key=prefix + name, Body=content.encode(), ContentType="application/json"
                )
        except (BotoCoreError, ClientError) as error:
            raise BaselineError(f"cannot write the baseline to {out}: {error}") from None
        return
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, content in zip(BASELINE_FILES, contents, strict=True):
            write_file(out / name, content.encode())
    except OSError as error:
        raise BaselineError(f"cannot write the baseline into {out}: {error.strerror or error}") from None


def write_file(path: Path, content: bytes) -> None:
    """Write under a temporary name and rename, so that `path` is never left half-written."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(content)
    os.replace(partial, path)


def load(baseline: Path | str) -> tuple[dict, dict]:
    if str(baseline).startswith("s3://"):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = _s3_location(str(baseline))
        try:
            texts = [
                boto3.client("s3").get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
                for name in BASELINE_FILES
            ]
        except (BotoCoreError, ClientError) as error:
            raise BaselineError(
                f"no baseline at {baseline} ({error}); build it with `python -m monitoring baseline "
                f"... --out {baseline}`"
            ) from None
        return _parsed(texts, [f"s3://{bucket}/{prefix}{name}" for name in BASELINE_FILES])
    paths = [Path(baseline) / name for name in BASELINE_FILES]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise BaselineError(
            f"no baseline: {' and '.join(missing)} missing (build it with `python -m monitoring baseline`)"
        )
    return _parsed([path.read_bytes() for path in paths], [str(path) for path in paths])


def _parsed(texts: list[bytes], names: list[str]) -> tuple[dict, dict]:
    """statistics.json and constraints.json, refused in one line unless `python -m monitoring baseline` wrote them
    (a Model Monitor baseline of a tabular dataset has the same file names but not the model's classes)."""
    documents = []
    for text, name in zip(texts, names, strict=True):
        try:
            documents.append(json.loads(text))
        except ValueError as error:
            raise BaselineError(f"{name} is not JSON ({error})") from None
    statistics, constraints = documents
    model = constraints.get("model") if isinstance(constraints, dict) else None
    if not (
        isinstance(statistics, dict)
        and "features" in statistics
        and isinstance(model, dict)
        and {"classes", "threshold"} <= model.keys()
        and "features" in constraints
    ):
        raise BaselineError(
            f"{names[0]} and {names[1]} are not a baseline of this model's answers "
            "(build one with `python -m monitoring baseline`)"
        )
    return statistics, constraints


def fetch_model(model: str, folder: Path) -> Path:
    """The model archive as a local file: `model` itself, or its download into `folder` when it is s3://..."""
    if not model.startswith("s3://"):
        return Path(model)
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = captures.split_s3_uri(model)
    local = folder / "model.tar.gz"
    try:
        boto3.client("s3").download_file(bucket, key, str(local))
    except (BotoCoreError, ClientError) as error:
        raise BaselineError(f"cannot read the model archive {model}: {error}") from None
    return local
