"""The baseline the endpoint's low-confidence rollback alarm compares with, called by a schedule every few minutes.

It reads the filter's metrics of ENDPOINT_NAME in METRIC_NAMESPACE over the trailing BASELINE_WINDOW_HOURS
(GetMetricData, one-minute periods): `LowConfidence` summed, over `TopProbability`'s sample count (one per
answer, what the alarm's one-minute share divides by too). Their ratio in percent is published with PutMetricData
as `LowConfidenceBaseline` (Unit Percent, by `EndpointName`), one datapoint for each of the next BASELINE_MINUTES
minutes: the alarm judges one-minute periods, and the schedule comes every five minutes, so each minute has a
value even when one call comes late or fails. Without answers in the window nothing is published, and the alarm
falls back to its fixed bound. Each call prints one JSON log line.
"""

import functools
import json
from datetime import UTC, datetime, timedelta

import boto3
from common import InvalidConfiguration, setting

ENDPOINT_DIMENSION = "EndpointName"
LOW_CONFIDENCE_METRIC = "LowConfidence"
TOP_PROBABILITY_METRIC = "TopProbability"
BASELINE_METRIC = "LowConfidenceBaseline"
PERIOD_SECONDS = 60


@functools.cache
def cloudwatch_client():
    return boto3.client("cloudwatch")


def positive_int(name: str) -> int:
    text = setting(name)
    if not text.isdigit() or int(text) < 1:
        raise InvalidConfiguration(f"{name}={text!r} is not a whole number of at least 1; the endpoint stack sets it.")
    return int(text)


def _query(query_id: str, namespace: str, endpoint_name: str, metric_name: str, statistic: str) -> dict:
    return {
        "Id": query_id,
        "MetricStat": {
            "Metric": {
                "Namespace": namespace,
                "MetricName": metric_name,
                "Dimensions": [{"Name": ENDPOINT_DIMENSION, "Value": endpoint_name}],
            },
            "Period": PERIOD_SECONDS,
            "Stat": statistic,
        },
    }


def answer_counts(namespace: str, endpoint_name: str, start: datetime, end: datetime) -> tuple[float, float]:
    """The filter's answers below the threshold and all its answers between `start` and `end`."""
    totals = {"low": 0.0, "answers": 0.0}
    pages = (
        cloudwatch_client()
        .get_paginator("get_metric_data")
        .paginate(
            MetricDataQueries=[
                _query("low", namespace, endpoint_name, LOW_CONFIDENCE_METRIC, "Sum"),
                _query("answers", namespace, endpoint_name, TOP_PROBABILITY_METRIC, "SampleCount"),
            ],
            StartTime=start,
            EndTime=end,
        )
    )
    for page in pages:
        for result in page["MetricDataResults"]:
            totals[result["Id"]] += sum(result["Values"])
    return totals["low"], totals["answers"]


def handler(event, context):
    namespace, endpoint_name = setting("METRIC_NAMESPACE"), setting("ENDPOINT_NAME")
    window_hours, minutes = positive_int("BASELINE_WINDOW_HOURS"), positive_int("BASELINE_MINUTES")
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    low, answers = answer_counts(namespace, endpoint_name, now - timedelta(hours=window_hours), now)
    baseline = round(100 * low / answers, 3) if answers else None
    if baseline is not None:
        cloudwatch_client().put_metric_data(
            Namespace=namespace,
            MetricData=[
                {
                    "MetricName": BASELINE_METRIC,
                    "Dimensions": [{"Name": ENDPOINT_DIMENSION, "Value": endpoint_name}],
                    "Timestamp": now + timedelta(minutes=minute),
                    "Value": baseline,
                    "Unit": "Percent",
                }
                for minute in range(minutes)
            ],
        )
    record = {
        "endpoint": endpoint_name,
        "window_hours": window_hours,
        "answers": int(answers),
        "low_confidence": int(low),
        "baseline_percent": baseline,
        "published_minutes": minutes if baseline is not None else 0,
    }
    print(json.dumps(record))
    return record
