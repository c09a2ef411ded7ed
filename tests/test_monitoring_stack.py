import json
import sys

from aws_cdk.assertions import Match
from conftest import ROOT, synth_stacks, template

from monitoring import metrics
from stacks import monitoring_stack

sys.path.insert(0, str(ROOT / "lambdas"))
from filter_inferences import index as filter_step


def _filter_namespace() -> str:
    """The METRIC_NAMESPACE the workflow stack gives the filter Lambda."""
    functions = template("Workflow").find_resources(
        "AWS::Lambda::Function", {"Properties": {"Handler": "filter_inferences.index.handler"}}
    )
    (function,) = functions.values()
    return function["Properties"]["Environment"]["Variables"]["METRIC_NAMESPACE"]


def test_dashboard_and_alarms_read_the_metrics_the_filter_emits_in_the_namespace_it_is_given():
    assert (monitoring_stack.TOP_PROBABILITY, monitoring_stack.LOW_CONFIDENCE, monitoring_stack.PREDICTIONS) == (
        filter_step.TOP_PROBABILITY_METRIC,
        filter_step.LOW_CONFIDENCE_METRIC,
        filter_step.PREDICTIONS_METRIC,
    )
    namespace = _filter_namespace()
    assert namespace == "Scones"
    monitoring = template("Monitoring")
    (dashboard,) = monitoring.find_resources("AWS::CloudWatch::Dashboard").values()
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    for name in (monitoring_stack.TOP_PROBABILITY, monitoring_stack.LOW_CONFIDENCE, monitoring_stack.PREDICTIONS):
        assert f'[\\"{namespace}\\",\\"{name}\\"' in body, name
    low_confidence = _alarms()["scones-dev-low-confidence-rate"]
    assert {m["MetricStat"]["Metric"]["Namespace"] for m in low_confidence["Metrics"] if "MetricStat" in m} == {
        namespace
    }


def test_the_drift_job_publishes_in_the_filters_namespace():
    drift = synth_stacks()["Monitoring"].drift
    statements = template("Monitoring").find_resources("AWS::IAM::Policy")
    conditions = [
        statement.get("Condition")
        for policy in statements.values()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        if statement["Action"] == "cloudwatch:PutMetricData"
    ]
    assert conditions == [{"StringEquals": {"cloudwatch:namespace": _filter_namespace()}}]
    assert drift.state_machine is not None


def _alarms(**context) -> dict[str, dict]:
    alarms = template("Monitoring", **context).find_resources("AWS::CloudWatch::Alarm")
    return {alarm["Properties"]["AlarmName"]: alarm["Properties"] for alarm in alarms.values()}


def test_alarms_notify_the_topic_and_traffic_alarm_is_optional():
    alarms = _alarms()
    assert set(alarms) == {
        "scones-dev-execution-failure-rate",
        "scones-dev-endpoint-5xx",
        "scones-dev-low-confidence-rate",
        "scones-dev-drift-violations",
        "scones-dev-drift-job-failed",
    }
    (topic,) = template("Monitoring").find_resources("AWS::SNS::Topic")
    for alarm in alarms.values():
        assert alarm["AlarmActions"] == alarm["OKActions"] == [{"Ref": topic}]
    assert "scones-dev-no-invocations" in _alarms(expect_traffic="true")


def test_failure_rate_alarm_leaves_low_confidence_out():
    alarm = _alarms()["scones-dev-execution-failure-rate"]
    (expression,) = [m for m in alarm["Metrics"] if "Expression" in m]
    assert expression["Expression"] == "IF(started > 0, 100 * (failed - lowconfidence) / started, 0)"
    metrics = {m["Id"]: m["MetricStat"]["Metric"] for m in alarm["Metrics"] if "MetricStat" in m}
    assert metrics["lowconfidence"]["Namespace"] == "Scones"
    assert metrics["lowconfidence"]["MetricName"] == "LowConfidence"
    assert metrics["failed"]["MetricName"] == "ExecutionsFailed"
    assert alarm["Threshold"] == 5


def test_low_confidence_alarm_uses_the_configured_rate():
    alarm = _alarms(low_confidence_alarm_percent="25")["scones-dev-low-confidence-rate"]
    assert alarm["Threshold"] == 25
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"


def test_endpoint_5xx_alarm():
    alarm = _alarms()["scones-dev-endpoint-5xx"]
    assert alarm["MetricName"] == "Invocation5XXErrors"
    assert alarm["Dimensions"] == [
        {"Name": "EndpointName", "Value": "scones-dev"},
        {"Name": "VariantName", "Value": "AllTraffic"},
    ]


def test_topic_is_encrypted_and_mails_the_configured_address():
    monitoring = template("Monitoring", alarm_email="ops@example.com")
    monitoring.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": Match.any_value()})
    monitoring.has_resource_properties("AWS::SNS::Subscription", {"Protocol": "email", "Endpoint": "ops@example.com"})
    assert template("Monitoring").find_resources("AWS::SNS::Subscription") == {}


def test_dashboard_has_every_part():
    (dashboard,) = template("Monitoring").find_resources("AWS::CloudWatch::Dashboard").values()
    body = str(dashboard["Properties"]["DashboardBody"])
    for title in (
        "Endpoint invocations and errors",
        "Endpoint latency",
        "Endpoint instances",
        "Classification executions",
        "Failed executions by error",
        "Lambda errors and duration",
        "Confidence: top probability",
        "Low-confidence answers",
        "Predicted class mix",
        "Drift: violations of the hourly capture report",
        "Drift: answers most likely neither (%)",
        "Drift job runs",
    ):
        assert title in body


def test_dashboard_reads_the_neither_share_the_report_publishes():
    (dashboard,) = template("Monitoring").find_resources("AWS::CloudWatch::Dashboard").values()
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    assert f'[\\"{_filter_namespace()}\\",\\"{metrics.NEITHER_SHARE}\\",\\"EndpointName\\",\\"scones-dev\\"' in body


def test_drift_alarms_read_what_the_report_publishes():
    alarms = _alarms()
    (topic,) = template("Monitoring").find_resources("AWS::SNS::Topic")
    drift = alarms["scones-dev-drift-violations"]
    assert (drift["Namespace"], drift["MetricName"]) == (_filter_namespace(), metrics.VIOLATIONS)
    assert drift["Dimensions"] == [{"Name": "EndpointName", "Value": "scones-dev"}]
    assert (
        drift["Statistic"],
        drift["Period"],
        drift["Threshold"],
        drift["ComparisonOperator"],
        drift["TreatMissingData"],
    ) == ("Maximum", 3600, 1, "GreaterThanOrEqualToThreshold", "notBreaching")
    assert drift["AlarmActions"] == drift["OKActions"] == [{"Ref": topic}]
    failed = alarms["scones-dev-drift-job-failed"]
    (expression,) = [m for m in failed["Metrics"] if "Expression" in m]
    assert expression["Expression"] == "failed + timedout"
    drift_machine = synth_stacks()["Monitoring"].drift.state_machine
    machine = drift_machine.stack.get_logical_id(drift_machine.node.default_child)
    stats = {m["Id"]: m["MetricStat"] for m in failed["Metrics"] if "MetricStat" in m}
    assert {
        name: (stat["Metric"]["MetricName"], stat["Metric"]["Dimensions"], stat["Period"])
        for name, stat in stats.items()
    } == {
        "failed": ("ExecutionsFailed", [{"Name": "StateMachineArn", "Value": {"Ref": machine}}], 3600),
        "timedout": ("ExecutionsTimedOut", [{"Name": "StateMachineArn", "Value": {"Ref": machine}}], 3600),
    }
    assert failed["Threshold"] == 1 and failed["AlarmActions"] == [{"Ref": topic}]


def test_outputs_link_the_dashboard_and_the_alarm_topic():
    monitoring = template("Monitoring")
    (topic,) = monitoring.find_resources("AWS::SNS::Topic")
    (dashboard,) = monitoring.find_resources("AWS::CloudWatch::Dashboard")
    outputs = monitoring.find_outputs("*")
    assert outputs["AlarmTopicArn"]["Value"] == {"Ref": topic}
    assert outputs["DashboardUrl"]["Value"] == {
        "Fn::Join": [
            "",
            [
                "https://console.aws.amazon.com/cloudwatch/home?region=",
                {"Ref": "AWS::Region"},
                "#dashboards:name=",
                {"Ref": dashboard},
            ],
        ]
    }
    assert all(len(outputs[name]["Description"]) > 30 for name in ("AlarmTopicArn", "DashboardUrl"))
