import sys

from aws_cdk.assertions import Match

from conftest import ROOT, template
from stacks import monitoring_stack

sys.path.insert(0, str(ROOT / "lambdas"))
from filter_inferences import index as filter_step  # noqa: E402


def test_dashboard_reads_the_metrics_the_filter_emits():
    assert (monitoring_stack.METRIC_NAMESPACE, monitoring_stack.TOP_PROBABILITY, monitoring_stack.LOW_CONFIDENCE,
            monitoring_stack.PREDICTIONS) == (filter_step.METRIC_NAMESPACE, filter_step.TOP_PROBABILITY_METRIC,
                                              filter_step.LOW_CONFIDENCE_METRIC, filter_step.PREDICTIONS_METRIC)


def _alarms(**context) -> dict[str, dict]:
    alarms = template("Monitoring", **context).find_resources("AWS::CloudWatch::Alarm")
    return {alarm["Properties"]["AlarmName"]: alarm["Properties"] for alarm in alarms.values()}


def test_alarms_notify_the_topic_and_traffic_alarm_is_optional():
    alarms = _alarms()
    assert set(alarms) == {"scones-dev-execution-failure-rate", "scones-dev-endpoint-5xx",
                           "scones-dev-low-confidence-rate"}
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
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": "scones-dev"},
                                   {"Name": "VariantName", "Value": "AllTraffic"}]


def test_topic_is_encrypted_and_mails_the_configured_address():
    monitoring = template("Monitoring", alarm_email="ops@example.com")
    monitoring.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": Match.any_value()})
    monitoring.has_resource_properties("AWS::SNS::Subscription", {"Protocol": "email",
                                                                   "Endpoint": "ops@example.com"})
    assert template("Monitoring").find_resources("AWS::SNS::Subscription") == {}


def test_dashboard_has_every_part():
    (dashboard,) = template("Monitoring").find_resources("AWS::CloudWatch::Dashboard").values()
    body = str(dashboard["Properties"]["DashboardBody"])
    for title in ("Endpoint invocations and errors", "Endpoint latency", "Endpoint instances",
                  "Classification executions", "Failed executions by error", "Lambda errors and duration",
                  "Confidence: top probability", "Low-confidence answers", "Predicted class mix"):
        assert title in body
