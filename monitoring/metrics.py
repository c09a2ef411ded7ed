"""The report's violations as CloudWatch metrics, so that drift alarms in AWS as it shows locally.

`python -m monitoring report ... --publish-metrics Scones --endpoint-name scones-dev` puts, at the time of
the run:

- `DriftViolations` {EndpointName}: every violated check of the run (over its windows), the number alarmed on;
- `DriftViolations` {EndpointName, CheckType}: the same per Model Monitor check type, zeros included, so that
  each series has a point per run;
- `DriftCheckedRecords` {EndpointName}: capture records read, so that a quiet hour is told from a clean one;
- `NeitherShare` {EndpointName}: the percentage of the answers read whose "neither" (1 - sum of the class
  probabilities) is the most likely; no point when nothing was answered, since a quiet hour has no share.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

VIOLATIONS = "DriftViolations"
CHECKED_RECORDS = "DriftCheckedRecords"
NEITHER_SHARE = "NeitherShare"
# Every constraint_check_type the checks answer (monitoring.checks), in Model Monitor's names.
CHECK_TYPES = ("baseline_drift_check", "data_type_check", "categorical_values_check", "parse_failure_check")


def metric_data(summary: dict, endpoint_name: str, timestamp: datetime | None = None) -> list[dict]:
    """PutMetricData's MetricData for a report summary (summary.json's content; {} when nothing was read)."""
    moment = timestamp or datetime.now(UTC)
    violated = Counter(
        result["constraint_check_type"] for result in summary.get("results", []) if result["status"] == "VIOLATION"
    )
    endpoint = [{"Name": "EndpointName", "Value": endpoint_name}]

    def datum(name: str, value: float, dimensions: list[dict], unit: str = "Count") -> dict:
        return {
            "MetricName": name,
            "Dimensions": dimensions,
            "Timestamp": moment,
            "Value": float(value),
            "Unit": unit,
        }

    share = summary.get("neither_share")
    return [
        datum(VIOLATIONS, sum(violated.values()), endpoint),
        *(
            datum(VIOLATIONS, violated[check_type], [*endpoint, {"Name": "CheckType", "Value": check_type}])
            for check_type in sorted(set(CHECK_TYPES) | set(violated))
        ),
        datum(CHECKED_RECORDS, summary.get("records", 0), endpoint),
        *([datum(NEITHER_SHARE, 100 * share, endpoint, "Percent")] if share is not None else []),
    ]


def publish(namespace: str, endpoint_name: str, summary: dict, client=None) -> list[dict]:
    """Put the summary's metrics into `namespace`; answers what was put."""
    if client is None:
        import boto3

        client = boto3.client("cloudwatch")
    data = metric_data(summary, endpoint_name)
    for start in range(0, len(data), 1000):  # PutMetricData takes at most 1000 values per call
        client.put_metric_data(Namespace=namespace, MetricData=data[start : start + 1000])
    return data
