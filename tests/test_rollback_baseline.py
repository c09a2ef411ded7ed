"""The rollback alarm's baseline: the filter's low-confidence share over the trailing day, published per minute."""

import json
import sys
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from conftest import ROOT, assembly_directory, environment_restored
from moto import mock_aws

sys.path.insert(0, str(ROOT / "lambdas"))

from common import InvalidConfiguration
from filter_inferences import index as filter_step
from rollback_baseline import index as baseline

from local import aws
from local.assembly import read_assembly
from local.deploy import LocalDeployment
from stacks.endpoint_stack import BASELINE_MINUTES
from stacks.metrics import BASELINE_WINDOW_HOURS, LOW_CONFIDENCE_BASELINE
from stacks.workflow_stack import METRIC_NAMESPACE

ENDPOINT = "scones-test"


@pytest.fixture
def cloudwatch(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_CLOUDWATCH", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("ENDPOINT_NAME", ENDPOINT),
        ("METRIC_NAMESPACE", METRIC_NAMESPACE),
        ("BASELINE_WINDOW_HOURS", str(BASELINE_WINDOW_HOURS)),
        ("BASELINE_MINUTES", str(BASELINE_MINUTES)),
    ):
        monkeypatch.setenv(name, value)
    baseline.cloudwatch_client.cache_clear()
    with mock_aws():
        yield boto3.client("cloudwatch")
    baseline.cloudwatch_client.cache_clear()


def answers(cloudwatch, at: datetime, low: list[bool], endpoint: str = ENDPOINT) -> None:
    """What the filter's EMF lines become: per answer, TopProbability and LowConfidence (0 or 1) by EndpointName."""
    dimensions = [{"Name": filter_step.ENDPOINT_DIMENSION, "Value": endpoint}]
    for is_low in low:
        cloudwatch.put_metric_data(
            Namespace=METRIC_NAMESPACE,
            MetricData=[
                {
                    "MetricName": filter_step.TOP_PROBABILITY_METRIC,
                    "Dimensions": dimensions,
                    "Timestamp": at,
                    "Value": 0.5 if is_low else 0.99,
                },
                {
                    "MetricName": filter_step.LOW_CONFIDENCE_METRIC,
                    "Dimensions": dimensions,
                    "Timestamp": at,
                    "Value": int(is_low),
                    "Unit": "Count",
                },
            ],
        )


def published(cloudwatch, endpoint: str = ENDPOINT) -> dict[datetime, float]:
    """The baseline's datapoints of the hour around now, by minute."""
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    found = cloudwatch.get_metric_data(
        MetricDataQueries=[
            {
                "Id": "baseline",
                "MetricStat": {
                    "Metric": {
                        "Namespace": METRIC_NAMESPACE,
                        "MetricName": LOW_CONFIDENCE_BASELINE,
                        "Dimensions": [{"Name": "EndpointName", "Value": endpoint}],
                    },
                    "Period": 60,
                    "Stat": "Average",
                    "Unit": "Percent",
                },
            }
        ],
        StartTime=minute - timedelta(minutes=30),
        EndTime=minute + timedelta(minutes=30),
    )
    (result,) = found["MetricDataResults"]
    return dict(zip(result["Timestamps"], result["Values"], strict=True))


def test_publishes_the_days_low_confidence_share_for_each_of_the_next_minutes(cloudwatch, capsys):
    now = datetime.now(UTC)
    answers(cloudwatch, now - timedelta(hours=20), [True, False, False, False])
    answers(cloudwatch, now - timedelta(hours=2), [True, False, False, False, False, False])
    answers(cloudwatch, now - timedelta(hours=30), [True] * 5)  # older than the window
    answers(cloudwatch, now - timedelta(hours=1), [True] * 5, endpoint="another-endpoint")

    record = baseline.handler({"source": "aws.events"}, None)

    assert record["baseline_percent"] == 20.0  # 2 of 10 answers
    assert (
        json.loads(capsys.readouterr().out)
        == record
        == {
            "endpoint": ENDPOINT,
            "window_hours": 24,
            "answers": 10,
            "low_confidence": 2,
            "baseline_percent": 20.0,
            "published_minutes": BASELINE_MINUTES,
        }
    )
    points = published(cloudwatch)
    first, minute = min(points), now.replace(second=0, microsecond=0)
    assert first in (minute, minute + timedelta(minutes=1))  # the call's own minute, which may have just begun
    assert sorted(points) == [first + timedelta(minutes=m) for m in range(BASELINE_MINUTES)]
    assert set(points.values()) == {20.0}
    assert published(cloudwatch, "another-endpoint") == {}


def test_no_answers_in_the_window_publishes_nothing(cloudwatch, capsys):
    answers(cloudwatch, datetime.now(UTC) - timedelta(hours=25), [True, False])

    record = baseline.handler({}, None)

    assert (record["answers"], record["baseline_percent"], record["published_minutes"]) == (0, None, 0)
    assert json.loads(capsys.readouterr().out)["baseline_percent"] is None
    assert cloudwatch.list_metrics(Namespace=METRIC_NAMESPACE, MetricName=LOW_CONFIDENCE_BASELINE)["Metrics"] == []


@pytest.mark.parametrize(("name", "value"), [("BASELINE_MINUTES", "0"), ("BASELINE_WINDOW_HOURS", "a day")])
def test_a_bad_setting_names_the_variable(cloudwatch, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidConfiguration, match=f"{name}=.*the endpoint stack sets it"):
        baseline.handler({}, None)


def test_the_metric_names_are_the_ones_the_stacks_read():
    assert baseline.BASELINE_METRIC == LOW_CONFIDENCE_BASELINE
    assert baseline.LOW_CONFIDENCE_METRIC == filter_step.LOW_CONFIDENCE_METRIC
    assert baseline.TOP_PROBABILITY_METRIC == filter_step.TOP_PROBABILITY_METRIC
    assert baseline.ENDPOINT_DIMENSION == filter_step.ENDPOINT_DIMENSION


@pytest.mark.slow  # starts the local AWS (a moto server) and deploys two synthesized stacks into it
def test_the_local_deployment_creates_the_function_from_the_template_and_it_runs():
    with environment_restored():
        server, _ = aws.start()
        try:
            deployed = LocalDeployment()
            stacks = {stack.name: stack for stack in read_assembly(assembly_directory())}
            deployed.deploy(stacks["SconesDevData"])
            boto3.client("ssm").put_parameter(  # what an approval records
                Name="/scones/dev/approved-model",
                Type="String",
                Value="s3://models/run/model.tar.gz 0.9 arn:aws:sagemaker:us-east-1:1:model-package/scones-dev/1",
            )
            deployed.deploy(stacks["SconesDevEndpoint"])
            cloudwatch = boto3.client("cloudwatch")
            answers(cloudwatch, datetime.now(UTC) - timedelta(hours=3), [True, False, False, False], "scones-dev")

            (function,) = [
                attributes["Ref"]
                for logical_id, attributes in deployed.created("SconesDevEndpoint", "AWS::Lambda::Function").items()
                if logical_id.startswith("RollbackBaseline")
            ]
            invoked = boto3.client("lambda").invoke(FunctionName=function, Payload=b"{}")
            record = json.loads(invoked["Payload"].read())
            assert "FunctionError" not in invoked, record
            assert (record["endpoint"], record["baseline_percent"]) == ("scones-dev", 25.0)
            assert set(published(cloudwatch, "scones-dev").values()) == {25.0}
            # The schedule and its permission are reported, not emulated: a local run calls nothing on a timer.
            not_emulated = "\n".join(deployed.report.not_emulated)
            assert "RollbackBaselineSchedule" in not_emulated and "(AWS::Events::Rule)" in not_emulated
            assert "(AWS::Lambda::Permission)" in not_emulated
        finally:
            server.stop()
