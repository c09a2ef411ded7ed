import json
import sys

import pytest
from aws_cdk.assertions import Match
from conftest import ROOT, _placeholder, synth_stacks, template

from monitoring import metrics
from stacks import monitoring_stack
from stacks.config import ConfigError, SconesConfig

sys.path.insert(0, str(ROOT / "lambdas"))
from filter_inferences import index as filter_step
from review_api import answers, retrain


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
        "scones-dev-review-intake-stuck",
        "scones-dev-review-dead-letters",
        "scones-dev-review-deadline-near",
    }
    assert not {name for name in _alarms(review="false") if "review" in name}
    (topic,) = template("Monitoring").find_resources("AWS::SNS::Topic")
    for alarm in alarms.values():
        assert alarm["AlarmActions"] == alarm["OKActions"] == [{"Ref": topic}]
    assert "scones-dev-no-invocations" in _alarms(expect_traffic="true")


def test_failure_rate_alarm_leaves_a_reviewers_neither_out():
    alarm = _alarms()["scones-dev-execution-failure-rate"]
    (expression,) = [m for m in alarm["Metrics"] if "Expression" in m]
    assert expression["Expression"] == "IF(started > 0, 100 * (failed - notavehicle) / started, 0)"
    metrics = {m["Id"]: m["MetricStat"]["Metric"] for m in alarm["Metrics"] if "MetricStat" in m}
    assert (metrics["notavehicle"]["Namespace"], metrics["notavehicle"]["MetricName"]) == (
        "Scones",
        answers.NOT_A_VEHICLE_METRIC,
    )
    assert metrics["notavehicle"]["Dimensions"] == [{"Name": "ReviewTable", "Value": "scones-dev-review"}]


def test_failure_rate_alarm_leaves_low_confidence_out_without_review():
    alarm = _alarms(review="false")["scones-dev-execution-failure-rate"]
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


def _retraining(**context) -> tuple[dict[str, dict], dict]:
    """The retraining rules by name, and the statements of their role's policy."""
    monitoring = template("Monitoring", **context)
    rules = {r["Properties"]["Name"]: r["Properties"] for r in monitoring.find_resources("AWS::Events::Rule").values()}
    retrain = {name: rule for name, rule in rules.items() if "retrain" in name}
    (role_arn,) = {target["RoleArn"]["Fn::GetAtt"][0] for rule in retrain.values() for target in rule["Targets"]}
    (policy,) = [
        p["Properties"]
        for p in monitoring.find_resources("AWS::IAM::Policy").values()
        if p["Properties"]["Roles"] == [{"Ref": role_arn}]
    ]
    role = monitoring.find_resources("AWS::IAM::Role")[role_arn]["Properties"]
    assert role["AssumeRolePolicyDocument"]["Statement"] == [
        {"Action": "sts:AssumeRole", "Effect": "Allow", "Principal": {"Service": "events.amazonaws.com"}}
    ]
    assert "ManagedPolicyArns" not in role and "Policies" not in role
    return retrain, policy["PolicyDocument"]["Statement"]


def _training_machine_arn() -> dict:
    """How the Monitoring stack refers to the training stack's state machine (its exported Ref)."""
    training = synth_stacks()["Training"]
    machine = training.get_logical_id(training.state_machine.node.default_child)
    (export,) = [
        output["Export"]["Name"]
        for output in template("Training").find_outputs("*").values()
        if output["Value"] == {"Ref": machine} and "Export" in output
    ]
    return {"Fn::ImportValue": export}


def test_drift_alarm_going_into_alarm_starts_the_training_state_machine():
    rules, statements = _retraining()
    assert set(rules) == {"scones-dev-retrain-on-drift"}, "no schedule unless retrain_schedule is given"
    rule = rules["scones-dev-retrain-on-drift"]
    (drift_alarm,) = [
        logical_id
        for logical_id, alarm in template("Monitoring").find_resources("AWS::CloudWatch::Alarm").items()
        if alarm["Properties"]["AlarmName"] == "scones-dev-drift-violations"
    ]
    assert rule["EventPattern"] == {
        "source": ["aws.cloudwatch"],
        "detail-type": ["CloudWatch Alarm State Change"],
        "resources": [{"Fn::GetAtt": [drift_alarm, "Arn"]}],
        "detail": {"state": {"value": ["ALARM"]}},
    }
    (target,) = rule["Targets"]
    assert target["Arn"] == _training_machine_arn()
    assert target["InputTransformer"] == {
        "InputPathsMap": {"detail-alarmName": "$.detail.alarmName"},
        "InputTemplate": '{"trigger":"drift","alarm":<detail-alarmName>}',
    }
    assert statements == [{"Action": "states:StartExecution", "Effect": "Allow", "Resource": _training_machine_arn()}]


def test_retrain_schedule_is_off_by_default_and_on_with_the_setting():
    for schedule in ("rate(7 days)", "cron(0 3 ? * MON *)"):
        rules, statements = _retraining(retrain_schedule=schedule)
        rule = rules["scones-dev-retrain-schedule"]
        assert rule["ScheduleExpression"] == schedule
        (target,) = rule["Targets"]
        assert (target["Arn"], target["Input"]) == (_training_machine_arn(), '{"trigger":"schedule"}')
        assert statements == [
            {"Action": "states:StartExecution", "Effect": "Allow", "Resource": _training_machine_arn()}
        ]
    assert "scones-dev-retrain-schedule" not in _retraining()[0]


def test_a_retraining_rule_cannot_reach_the_endpoint():
    """A retraining trains and records a model; nothing the rules may do touches SageMaker endpoints."""
    _, statements = _retraining(retrain_schedule="rate(1 day)")
    assert {statement["Action"] for statement in statements} == {"states:StartExecution"}


@pytest.mark.parametrize("schedule", ["weekly", "rate(1 days)", "rate(0 days)", "rate(7 weeks)", "cron(0 3 * *)"])
def test_retrain_schedule_refuses_anything_but_an_eventbridge_expression_naming_the_syntax(schedule):
    with pytest.raises(ConfigError, match=r"retrain_schedule.*rate\(7 days\)"):
        SconesConfig.from_context({"retrain_schedule": schedule})


def test_dashboard_shows_the_endpoints_rollback_alarms_by_their_names():
    alarms = template("Endpoint").find_resources("AWS::CloudWatch::Alarm").values()
    endpoint_alarms = {alarm["Properties"]["AlarmName"] for alarm in alarms}
    assert len(endpoint_alarms) == 3
    (dashboard,) = template("Monitoring").find_resources("AWS::CloudWatch::Dashboard").values()
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    assert "Endpoint update: rollback alarms" in body
    for name in endpoint_alarms:
        assert f":alarm:{name}" in body, name


def test_dashboard_shows_the_rollback_baseline_beside_the_share_it_is_compared_with():
    (dashboard,) = template("Monitoring").find_resources("AWS::CloudWatch::Dashboard").values()
    parts = dashboard["Properties"]["DashboardBody"]["Fn::Join"][1]
    widgets = json.loads("".join(part if isinstance(part, str) else "REGION" for part in parts))["widgets"]
    (alarms,) = [w for w in widgets if w["properties"].get("title", "").startswith("Endpoint update: rollback")]
    (graph,) = [w for w in widgets if w["y"] == alarms["y"] and w["type"] == "metric"]
    rows = graph["properties"]["metrics"]
    (share,) = [row for row in rows if "expression" in row[0]]
    (baseline,) = [row for row in rows if "LowConfidenceBaseline" in row]
    assert share[0]["expression"] == "IF(answered > 0, 100 * lowconfidence / answered, 0)"
    assert baseline[:4] == ["Scones", "LowConfidenceBaseline", "EndpointName", "scones-dev"]
    assert share[0]["period"] == baseline[4]["period"] == 60  # the minutes the rollback alarm judges
    assert baseline[4].get("stat", "Average") == "Average"


def _review_queue_names() -> dict[str, str]:
    """The export names of the review queues' names, by queue name, as the Monitoring stack imports them."""
    review = template("Review")
    names = {}
    for logical_id, queue in review.find_resources("AWS::SQS::Queue").items():
        (export,) = [
            output["Export"]["Name"]
            for output in review.find_outputs("*").values()
            if output["Value"] == {"Fn::GetAtt": [logical_id, "QueueName"]}
        ]
        names[queue["Properties"]["QueueName"]] = export
    return names


def test_review_alarms_watch_the_intake_the_dead_letters_and_the_deadline():
    alarms = _alarms()
    queues = _review_queue_names()
    (topic,) = template("Monitoring").find_resources("AWS::SNS::Topic")
    stuck = alarms["scones-dev-review-intake-stuck"]
    assert (stuck["Namespace"], stuck["MetricName"], stuck["Statistic"]) == (
        "AWS/SQS",
        "ApproximateAgeOfOldestMessage",
        "Maximum",
    )
    assert stuck["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::ImportValue": queues["scones-dev-review"]}}]
    assert (stuck["Threshold"], stuck["ComparisonOperator"]) == (300, "GreaterThanThreshold")
    dead = alarms["scones-dev-review-dead-letters"]
    assert (dead["MetricName"], dead["Statistic"], dead["Threshold"], dead["ComparisonOperator"]) == (
        "ApproximateNumberOfMessagesVisible",
        "Maximum",
        0,
        "GreaterThanThreshold",
    )
    assert dead["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::ImportValue": queues["scones-dev-review-dlq"]}}]
    near = alarms["scones-dev-review-deadline-near"]
    assert (near["Namespace"], near["MetricName"], near["Statistic"], near["Dimensions"]) == (
        "Scones",
        "OldestReviewAgeSeconds",
        "Maximum",
        [{"Name": "ReviewTable", "Value": "scones-dev-review"}],  # dev's own: prod's reviews do not set it off
    )
    assert near["Threshold"] == 69120  # 80% of 24 hours in seconds
    assert _alarms(review_timeout_hours="1")["scones-dev-review-deadline-near"]["Threshold"] == 2880
    for alarm in (stuck, dead, near):
        assert alarm["AlarmActions"] == alarm["OKActions"] == [{"Ref": topic}]
        assert alarm["TreatMissingData"] == "notBreaching"


def _dashboard_widgets(**context) -> list[dict]:
    (dashboard,) = template("Monitoring", **context).find_resources("AWS::CloudWatch::Dashboard").values()
    body = dashboard["Properties"]["DashboardBody"]
    text = "".join(part if isinstance(part, str) else _placeholder(part) for part in body["Fn::Join"][1])
    return json.loads(text)["widgets"]


def _widget(title: str, **context) -> dict:
    (widget,) = [w for w in _dashboard_widgets(**context) if w["properties"].get("title") == title]
    return widget["properties"]


def test_dashboard_row_for_the_review_queue():
    waiting = _widget("Reviews waiting, and the oldest's age (s)")
    assert [m[:4] for m in waiting["metrics"]] == [
        ["Scones", name, "ReviewTable", "scones-dev-review"] for name in ("ReviewsWaiting", "OldestReviewAgeSeconds")
    ]
    assert waiting["metrics"][1][4]["yAxis"] == "right"

    answered = _widget("Reviews answered per hour, by the model's class")
    assert answered["stacked"] is True
    assert [m[:6] for m in answered["metrics"]] == [
        ["Scones", "ReviewAnswers", "ModelClass", name, "ReviewTable", "scones-dev-review"]
        for name in ("bicycle", "motorcycle", "neither")
    ]
    assert all(m[6]["stat"] == "Sum" and m[6]["period"] == 3600 for m in answered["metrics"])

    agreement = _widget("Reviewers agreeing with the model (hourly)")
    expressions = [m[0] for m in agreement["metrics"] if "expression" in m[0]]
    (shown,) = [e for e in expressions if e.get("visible", True)]
    assert shown["expression"] == "IF(answers > 0, 1 - overruled / answers)"
    hidden = {e["id"]: e["expression"] for e in expressions if e is not shown}
    assert hidden == {
        "answers": "FILL(reviewanswers0, 0) + FILL(reviewanswers1, 0) + FILL(reviewanswers2, 0)",
        "overruled": "FILL(overruled0, 0) + FILL(overruled1, 0) + FILL(overruled2, 0)",
    }
    summed = {m[-1]["id"]: m[:4] for m in agreement["metrics"] if "expression" not in m[0]}
    assert summed["overruled2"] == ["Scones", "Overruled", "ModelClass", "neither"]
    assert summed["reviewanswers0"] == ["Scones", "ReviewAnswers", "ModelClass", "bicycle"]
    assert agreement["yAxis"]["left"] == {"min": 0, "max": 1}

    queues = _review_queue_names()
    sqs = _widget("Review queue: oldest message (s), dead letters")
    assert [m[:4] for m in sqs["metrics"]] == [
        ["AWS/SQS", "ApproximateAgeOfOldestMessage", "QueueName", f"<ImportValue:{queues['scones-dev-review']}>"],
        [
            "AWS/SQS",
            "ApproximateNumberOfMessagesVisible",
            "QueueName",
            f"<ImportValue:{queues['scones-dev-review-dlq']}>",
        ],
    ]

    titles = {w["properties"].get("title") for w in _dashboard_widgets(review="false")}
    assert not {title for title in titles if title and "eview" in title}


def test_enough_reviewed_labels_of_this_environment_start_the_training_state_machine():
    rules, statements = _retraining(retrain_after_labels="50")
    assert set(rules) == {"scones-dev-retrain-on-drift", "scones-dev-retrain-on-labels"}
    rule = rules["scones-dev-retrain-on-labels"]
    classify = synth_stacks()["Workflow"]
    machine = classify.get_logical_id(classify.state_machine.node.default_child)
    (export,) = [
        output["Export"]["Name"]
        for output in template("Workflow").find_outputs("*").values()
        if output["Value"] == {"Ref": machine} and "Export" in output
    ]
    # the event the review API puts on the default bus, from this environment's classify state machine only
    assert rule["EventPattern"] == {
        "source": [retrain.SOURCE],
        "detail-type": [retrain.DETAIL_TYPE],
        "detail": {"state_machine": [{"Fn::ImportValue": export}]},
    }
    assert "EventBusName" not in rule  # the default bus, where the review API puts it
    (target,) = rule["Targets"]
    assert target["Arn"] == _training_machine_arn()
    assert target["InputTransformer"] == {
        "InputPathsMap": {"detail-labels": "$.detail.labels"},
        "InputTemplate": '{"trigger":"labels","labels":<detail-labels>}',
    }
    # the same role as the other retraining rules: start the training state machine, nothing else
    assert statements == [{"Action": "states:StartExecution", "Effect": "Allow", "Resource": _training_machine_arn()}]
    assert "scones-dev-retrain-on-labels" not in _retraining()[0]


@pytest.mark.parametrize("count", ["0", "-3", "many", "2.5"])
def test_retrain_after_labels_must_be_a_whole_number_of_one_or_more(count):
    with pytest.raises(ConfigError, match="retrain_after_labels"):
        SconesConfig.from_context({"retrain_after_labels": count})


def test_retrain_after_labels_without_review_names_both_keys():
    with pytest.raises(ConfigError, match=r"'retrain_after_labels'.*'review'.*true"):
        SconesConfig.from_context({"retrain_after_labels": "50", "review": "false"})
    assert SconesConfig.from_context({"retrain_after_labels": "50"}).retrain_after_labels == 50
