"""Step 3: let the inference through when the model is confident enough; record metrics either way.

Its answer is the execution's output, what a dispatcher reads: the image's location, the class (from
CLASS_NAMES, in label order), the probabilities, `neither` (1 - their sum), the threshold applied, where
it came from (`threshold_source`), the model, and `"source": "model"` (an answer a person gave on the
review page says "review" there instead):
- `threshold_source` "override": THRESHOLD, set when the stack was synthesized with `-c threshold=...`;
- "model": the served model's calibrated threshold, which the endpoint stack records in the SSM parameter
  THRESHOLD_PARAMETER once the update that serves the model has succeeded;
- "default": DEFAULT_THRESHOLD, while no model has recorded one, or when the parameter says `default` (a model
  without a threshold);
- `model`: MODEL_DATA_URL when the stack was given one, else the SSM parameter MODEL_PARAMETER (the served
  artifact, recorded beside the threshold), or null when neither is there.
The parameters are read with one ssm:GetParameters and kept for PARAMETER_CACHE_SECONDS.

Each call prints one CloudWatch Embedded Metric Format line, which CloudWatch Logs turns into metrics in
the namespace the workflow stack gives as METRIC_NAMESPACE:
- `TopProbability` (no unit) and `LowConfidence` (Count: 1 below the threshold or with "neither" the most likely
  answer, else 0), by `EndpointName`;
- `Predictions` (Count, always 1) by `EndpointName` and `PredictedClass`, the class index as a string
  ("0" bicycle, "1" motorcycle): its sum per `PredictedClass` graphs the class mix.
"""

import functools
import json
import math
import os
import time

import boto3
from botocore.exceptions import ClientError
from common import (
    InvalidConfiguration,
    InvalidEvent,
    NoInferences,
    ThresholdConfidenceNotMet,
    answer,
    as_probabilities,
    aws_error,
    image_location,
    read_body,
    setting,
)

ENDPOINT_DIMENSION = "EndpointName"
CLASS_DIMENSION = "PredictedClass"
TOP_PROBABILITY_METRIC = "TopProbability"
LOW_CONFIDENCE_METRIC = "LowConfidence"
PREDICTIONS_METRIC = "Predictions"
PARAMETER_CACHE_SECONDS = 60
# The threshold parameter's value for a model without a threshold (stacks/registry.py DEFAULT_THRESHOLD_VALUE).
DEFAULT_VALUE = "default"
THRESHOLD_SOURCES = {
    "override": "set with -c threshold",
    "model": "the served model's own",
    "default": "the default, as the served model has none recorded",
}

_parameters: dict[tuple[str, ...], tuple[float, dict[str, str]]] = {}


@functools.cache
def ssm_client():
    return boto3.client("ssm")


def parameters(names: tuple[str, ...]) -> dict[str, str]:
    """The SSM parameters among `names` that exist, by name; fetched at most once per PARAMETER_CACHE_SECONDS."""
    if not names:
        return {}
    fetched_at, values = _parameters.get(names, (-math.inf, {}))
    if time.monotonic() - fetched_at < PARAMETER_CACHE_SECONDS:
        return values
    try:
        found = ssm_client().get_parameters(Names=list(names))["Parameters"]
    except ClientError as error:
        code, message = error.response["Error"]["Code"], error.response["Error"]["Message"]
        raise aws_error(code)(f"SSM answered {code} for the parameters {', '.join(names)}: {message}") from error
    values = {parameter["Name"]: parameter["Value"] for parameter in found}
    _parameters[names] = (time.monotonic(), values)
    return values


def probability(text: str, name: str, hint: str = "") -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise InvalidConfiguration(f"{name}={text!r} is not a probability between 0 and 1{hint}.")
    return value


def threshold_and_model() -> tuple[float, str, str | None]:
    """The threshold to apply, where it came from ("override", "model" or "default"), and the model's URL."""
    override, model_url = os.environ.get("THRESHOLD"), os.environ.get("MODEL_DATA_URL")
    threshold_name = None if override else setting("THRESHOLD_PARAMETER")
    model_name = None if model_url else setting("MODEL_PARAMETER")
    found = parameters(tuple(name for name in (threshold_name, model_name) if name))
    model = model_url or found.get(model_name)
    if override:
        return probability(override, "THRESHOLD"), "override", model
    if found.get(threshold_name, DEFAULT_VALUE) != DEFAULT_VALUE:
        hint = (
            ": the endpoint stack records the served model's calibrated threshold there; put a number such as "
            f"0.85 in it, or {DEFAULT_VALUE!r} to apply the default"
        )
        return probability(found[threshold_name], f"the SSM parameter {threshold_name}", hint), "model", model
    return probability(setting("DEFAULT_THRESHOLD"), "DEFAULT_THRESHOLD"), "default", model


def class_names(count: int) -> list[str]:
    names = [name.strip() for name in setting("CLASS_NAMES").split(",")]
    if len(names) != count:
        raise InvalidConfiguration(
            f"The endpoint answered {count} probabilities but the workflow knows {len(names)} classes "
            f"(CLASS_NAMES={','.join(names)}): deploy a model trained on these classes, or synthesize the stacks "
            "with -c classes=... naming the model's classes in label order."
        )
    return names


def metric_line(
    namespace: str,
    endpoint_name: str,
    predicted_class: int,
    top_probability: float,
    low_confidence: bool,
    threshold: float,
) -> str:
    """The EMF record; `Threshold`, the threshold applied, is a property (searchable in the logs), not a metric."""
    return json.dumps(
        {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": namespace,
                        "Dimensions": [[ENDPOINT_DIMENSION]],
                        "Metrics": [
                            {"Name": TOP_PROBABILITY_METRIC, "Unit": "None"},
                            {"Name": LOW_CONFIDENCE_METRIC, "Unit": "Count"},
                        ],
                    },
                    {
                        "Namespace": namespace,
                        "Dimensions": [[ENDPOINT_DIMENSION, CLASS_DIMENSION]],
                        "Metrics": [{"Name": PREDICTIONS_METRIC, "Unit": "Count"}],
                    },
                ],
            },
            ENDPOINT_DIMENSION: endpoint_name,
            CLASS_DIMENSION: str(predicted_class),
            TOP_PROBABILITY_METRIC: top_probability,
            LOW_CONFIDENCE_METRIC: int(low_confidence),
            PREDICTIONS_METRIC: 1,
            "Threshold": threshold,
        }
    )


def handler(event, context):
    body = read_body(event)
    if not body.get("inferences"):
        raise NoInferences(
            f"The event for {image_location(body)} has no inferences: the filter runs on what classify-image answered."
        )
    inferences = as_probabilities(body["inferences"])
    if inferences is None:
        raise InvalidEvent(
            f"inferences of {image_location(body)} are {body['inferences']!r}, not a list of class probabilities."
        )
    names = class_names(len(inferences))
    minimum, source, model = threshold_and_model()
    endpoint_name = setting("ENDPOINT_NAME")
    namespace = setting("METRIC_NAMESPACE")
    top_probability = max(inferences)
    predicted_class = inferences.index(top_probability)
    neither = max(0.0, 1 - sum(inferences))
    # "Neither" most likely is uncertain too, whatever the threshold (an override may be below 0.5).
    neither_most_likely = neither > top_probability
    low_confidence = top_probability < minimum or neither_most_likely
    print(metric_line(namespace, endpoint_name, predicted_class, top_probability, low_confidence, minimum))
    if neither_most_likely:
        raise ThresholdConfidenceNotMet(
            f"THRESHOLD_CONFIDENCE_NOT_MET: neither ({neither:g}) is more likely than {names[predicted_class]} "
            f"({top_probability:g}) for {image_location(body)}."
        )
    if low_confidence:
        raise ThresholdConfidenceNotMet(
            f"THRESHOLD_CONFIDENCE_NOT_MET: the top probability {top_probability:g} ({names[predicted_class]}) "
            f"is below the threshold {minimum:g} ({THRESHOLD_SOURCES[source]}) for {image_location(body)}."
        )
    return answer(
        {
            "s3_bucket": body.get("s3_bucket"),
            "s3_key": body.get("s3_key"),
            "class": names[predicted_class],
            "inferences": inferences,
            "neither": round(neither, 6),
            "threshold": minimum,
            "threshold_source": source,
            "model": model,
            "source": "model",
        }
    )
