"""Step 3: let the inference through when the model is confident enough; record metrics either way.

Each call prints one CloudWatch Embedded Metric Format line, which CloudWatch Logs turns into metrics in
the namespace the workflow stack gives as METRIC_NAMESPACE:
- `TopProbability` (no unit) and `LowConfidence` (Count: 1 below the threshold, else 0), by `EndpointName`;
- `Predictions` (Count, always 1) by `EndpointName` and `PredictedClass`, the class index as a string
  ("0" bicycle, "1" motorcycle): its sum per `PredictedClass` graphs the class mix.
"""

import json
import math
import time

from common import (
    InvalidConfiguration,
    InvalidEvent,
    NoInferences,
    ThresholdConfidenceNotMet,
    answer,
    as_probabilities,
    image_location,
    read_body,
    setting,
)

ENDPOINT_DIMENSION = "EndpointName"
CLASS_DIMENSION = "PredictedClass"
TOP_PROBABILITY_METRIC = "TopProbability"
LOW_CONFIDENCE_METRIC = "LowConfidence"
PREDICTIONS_METRIC = "Predictions"
DEFAULT_THRESHOLD = 0.93


def threshold() -> float:
    text = setting("THRESHOLD", str(DEFAULT_THRESHOLD))
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise InvalidConfiguration(f"THRESHOLD={text!r} is not a probability between 0 and 1.")
    return value


def metric_line(
    namespace: str, endpoint_name: str, predicted_class: int, top_probability: float, low_confidence: bool
) -> str:
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
    minimum = threshold()
    endpoint_name = setting("ENDPOINT_NAME")
    namespace = setting("METRIC_NAMESPACE")
    top_probability = max(inferences)
    predicted_class = inferences.index(top_probability)
    low_confidence = top_probability < minimum
    print(metric_line(namespace, endpoint_name, predicted_class, top_probability, low_confidence))
    if low_confidence:
        raise ThresholdConfidenceNotMet(
            f"THRESHOLD_CONFIDENCE_NOT_MET: the top probability {top_probability:g} (class {predicted_class}) "
            f"is below the threshold {minimum:g} for {image_location(body)}."
        )
    return answer(body)
