import json
import sys

import pytest
from aws_cdk.assertions import Match
from conftest import ROOT, template

from stacks.config import ConfigError, SconesConfig
from stacks.registry import DEFAULT_THRESHOLD_VALUE
from stacks.workflow_stack import METRIC_NAMESPACE

DATA_BUCKET = {"Fn::ImportValue": "SconesDevData:ExportsOutputRefData666C94C774A46B8E"}
DATA_BUCKET_ARN = {"Fn::ImportValue": "SconesDevData:ExportsOutputFnGetAttData666C94C7Arn0D7E21B7"}


def test_capture_config_records_every_request_and_answer_encrypted():
    endpoint = template("Endpoint")
    (properties,) = [r["Properties"] for r in endpoint.find_resources("AWS::SageMaker::EndpointConfig").values()]
    (key,) = endpoint.find_resources("AWS::KMS::Key")
    assert properties["DataCaptureConfig"] == {
        "EnableCapture": True,
        "InitialSamplingPercentage": 100,
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
        "DestinationS3Uri": {"Fn::Join": ["", ["s3://", DATA_BUCKET, "/data_capture"]]},
        "KmsKeyId": {"Fn::GetAtt": [key, "Arn"]},
    }
    assert properties["KmsKeyId"] == {"Fn::GetAtt": [key, "Arn"]}
    endpoint.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})


def test_sampling_instance_type_and_count_come_from_context():
    template(
        "Endpoint", capture_sampling_percentage="25", endpoint_instance_type="ml.c5.xlarge", endpoint_instance_count="2"
    ).has_resource_properties(
        "AWS::SageMaker::EndpointConfig",
        {
            "DataCaptureConfig": Match.object_like({"InitialSamplingPercentage": 25}),
            "ProductionVariants": [
                Match.object_like(
                    {"InstanceType": "ml.c5.xlarge", "InitialInstanceCount": 2, "VariantName": "AllTraffic"}
                )
            ],
        },
    )


def test_endpoint_is_named_from_config_and_scales_on_invocations():
    endpoint = template("Endpoint", endpoint_name="bikes")
    endpoint.has_resource_properties("AWS::SageMaker::Endpoint", {"EndpointName": "bikes"})
    endpoint.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalableTarget",
        {
            "ResourceId": "endpoint/bikes/variant/AllTraffic",
            "MinCapacity": 1,
            "MaxCapacity": 2,
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
            "ServiceNamespace": "sagemaker",
        },
    )
    endpoint.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalingPolicy",
        {
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": Match.object_like(
                {
                    "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                    "TargetValue": 600,
                }
            ),
        },
    )


def ssm_parameters_read(endpoint) -> list[str]:
    parameters = endpoint.to_json().get("Parameters", {})
    return [p["Default"] for p in parameters.values() if p["Type"].startswith("AWS::SSM::Parameter::Value")]


def test_model_artifact_comes_from_the_recorded_parameter_or_context():
    assert ssm_parameters_read(template("Endpoint")) == ["/scones/dev/approved-model"]
    given = template("Endpoint", model_data_url="s3://my-bucket/models/job/output/model.tar.gz")
    given.has_resource_properties(
        "AWS::SageMaker::Model",
        {
            "PrimaryContainer": Match.object_like(
                {
                    "ModelDataUrl": "s3://my-bucket/models/job/output/model.tar.gz",
                    "Environment": {"SAGEMAKER_PROGRAM": "inference.py"},
                }
            )
        },
    )


@pytest.mark.parametrize("given", [None, "s3://my-bucket/models/job/output/model.tar.gz"], ids=["approved", "given"])
def test_what_serves_is_recorded_for_the_filter_only_after_the_endpoint_update(given):
    """The filter applies /serving/threshold: written after the endpoint resource, so only once an update (its
    canary and bakes) succeeded; a given artifact has no known threshold and records the default."""
    endpoint = template("Endpoint", **({"model_data_url": given} if given else {}))
    body = endpoint.to_json()
    read = {p["Default"]: {"Ref": name} for name, p in body.get("Parameters", {}).items() if "Default" in p}
    (endpoint_id,) = endpoint.find_resources("AWS::SageMaker::Endpoint")
    (model,) = endpoint.find_resources("AWS::SageMaker::Model").values()
    recorded = {p["Properties"]["Name"]: p for p in endpoint.find_resources("AWS::SSM::Parameter").values()}
    assert set(recorded) == {"/scones/dev/serving/model-data-url", "/scones/dev/serving/threshold"}
    assert all(endpoint_id in parameter["DependsOn"] for parameter in recorded.values())
    served = recorded["/scones/dev/serving/model-data-url"]["Properties"]["Value"]
    assert served == model["Properties"]["PrimaryContainer"]["ModelDataUrl"]
    threshold = recorded["/scones/dev/serving/threshold"]["Properties"]["Value"]
    if given:
        assert threshold == DEFAULT_THRESHOLD_VALUE and "ModelPackageArn" not in body["Outputs"]
    else:  # `<artifact> <threshold> <package ARN>`, as the approval records it in one write
        approved = {"Fn::Split": [" ", read["/scones/dev/approved-model"]]}
        assert served == {"Fn::Select": [0, approved]}
        assert threshold == {"Fn::Select": [1, approved]}
        assert body["Outputs"]["ModelPackageArn"]["Value"] == {"Fn::Select": [2, approved]}


def _statements_of(endpoint, role_prefix: str) -> list[dict]:
    """The statements of the policy attached to the stack's role whose logical id starts with `role_prefix`."""
    (policy,) = [
        policy
        for policy in endpoint.find_resources("AWS::IAM::Policy").values()
        if any(role["Ref"].startswith(role_prefix) for role in policy["Properties"]["Roles"])
    ]
    return policy["Properties"]["PolicyDocument"]["Statement"]


def test_model_role_reads_models_and_writes_captures_only():
    statements = _statements_of(template("Endpoint"), "ModelRole")
    s3 = [s for s in statements if any(a.startswith("s3:") for a in _actions(s))]
    assert s3 == [
        {"Action": "s3:GetObject", "Effect": "Allow", "Resource": {"Fn::Join": ["", [DATA_BUCKET_ARN, "/models/*"]]}},
        {
            "Action": "s3:PutObject",
            "Effect": "Allow",
            "Resource": {"Fn::Join": ["", [DATA_BUCKET_ARN, "/data_capture/*"]]},
        },
    ]
    ecr = next(s for s in statements if "ecr:BatchGetImage" in _actions(s))
    image_account = {
        "Fn::Select": [
            0,
            {"Fn::Split": [".", {"Fn::FindInMap": ["PytorchInferenceImage", {"Ref": "AWS::Region"}, "uri"]}]},
        ]
    }
    assert ecr["Resource"] == {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                ":ecr:",
                {"Ref": "AWS::Region"},
                ":",
                image_account,
                ":repository/pytorch-inference",
            ],
        ]
    }


def test_model_role_pulls_only_from_the_account_that_owns_the_image_in_a_pinned_region():
    statements = [
        statement
        for policy in template("Endpoint", region="eu-west-1", account="111111111111")
        .find_resources("AWS::IAM::Policy")
        .values()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]
    ecr = next(s for s in statements if "ecr:BatchGetImage" in _actions(s))
    assert ecr["Resource"] == {
        "Fn::Join": [
            "",
            [
                "arn:",
                {"Ref": "AWS::Partition"},
                ":ecr:",
                {"Ref": "AWS::Region"},
                ":763104351884:repository/pytorch-inference",
            ],
        ]
    }


def _actions(statement) -> list[str]:
    return statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]


def test_outputs_name_the_endpoint_and_the_model_it_serves():
    endpoint = template("Endpoint")
    (endpoint_id,) = endpoint.find_resources("AWS::SageMaker::Endpoint")
    (model,) = endpoint.find_resources("AWS::SageMaker::Model").values()
    outputs = endpoint.find_outputs("*")
    assert outputs["EndpointName"]["Value"] == {"Fn::GetAtt": [endpoint_id, "EndpointName"]}
    assert outputs["ModelDataUrl"]["Value"] == model["Properties"]["PrimaryContainer"]["ModelDataUrl"]
    (approved,) = [name for name in endpoint.to_json()["Parameters"] if "approvedmodel" in name]
    assert outputs["ModelDataUrl"]["Value"] == {"Fn::Select": [0, {"Fn::Split": [" ", {"Ref": approved}]}]}
    given = "s3://models-bucket/run-1/model.tar.gz"
    assert template("Endpoint", model_data_url=given).find_outputs("ModelDataUrl")["ModelDataUrl"]["Value"] == given


def _rollback(**context) -> tuple[dict, dict[str, dict]]:
    """The endpoint's DeploymentConfig, and its alarms by logical id."""
    endpoint = template("Endpoint", **context)
    (properties,) = [r["Properties"] for r in endpoint.find_resources("AWS::SageMaker::Endpoint").values()]
    alarms = {name: r["Properties"] for name, r in endpoint.find_resources("AWS::CloudWatch::Alarm").items()}
    return properties["DeploymentConfig"], alarms


def _rollback_alarms_by_name(**context) -> dict[str, dict]:
    """Each alarm the rollback configuration names, by that name, which must be an alarm of the stack that the
    endpoint depends on (CloudFormation creates it first)."""
    endpoint = template("Endpoint", **context)
    deployment, alarms = _rollback(**context)
    by_name = {alarm["AlarmName"]: alarm for alarm in alarms.values()}
    named = [alarm["AlarmName"] for alarm in deployment["AutoRollbackConfiguration"]["Alarms"]]
    assert sorted(named) == sorted(by_name), "every alarm of the stack rolls back, and only those"
    (endpoint_resource,) = endpoint.find_resources("AWS::SageMaker::Endpoint").values()
    assert set(alarms) <= set(endpoint_resource["DependsOn"])
    return {name: by_name[name] for name in named}


def test_one_instance_updates_all_at_once_then_bakes_with_rollback():
    deployment, _ = _rollback()
    assert deployment["BlueGreenUpdatePolicy"] == {
        "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 600},
        "TerminationWaitInSeconds": 0,
        "MaximumExecutionTimeoutInSeconds": 3600,
    }
    assert len(deployment["AutoRollbackConfiguration"]["Alarms"]) == 3


def test_a_fleet_of_two_updates_through_a_canary_of_the_configured_size_and_bake():
    deployment, _ = _rollback(endpoint_instance_count="2")
    assert deployment["BlueGreenUpdatePolicy"] == {
        "TrafficRoutingConfiguration": {
            "Type": "CANARY",
            "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10},
            "WaitIntervalInSeconds": 600,
        },
        "TerminationWaitInSeconds": 0,
        "MaximumExecutionTimeoutInSeconds": 3600,
    }
    deployment, _ = _rollback(
        endpoint_instance_count="4",
        canary_percent="25",
        canary_bake_minutes="15",
        deployment_timeout_minutes="90",
    )
    assert deployment["BlueGreenUpdatePolicy"] == {
        "TrafficRoutingConfiguration": {
            "Type": "CANARY",
            "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 25},
            "WaitIntervalInSeconds": 900,
        },
        "TerminationWaitInSeconds": 0,
        "MaximumExecutionTimeoutInSeconds": 5400,
    }


def test_rollback_on_5xx_errors_of_the_endpoint():
    alarm = _rollback_alarms_by_name()["scones-dev-rollback-5xx"]
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Statistic"], alarm["Period"]) == (
        "AWS/SageMaker",
        "Invocation5XXErrors",
        "Sum",
        60,
    )
    assert alarm["Dimensions"] == [
        {"Name": "EndpointName", "Value": "scones-dev"},
        {"Name": "VariantName", "Value": "AllTraffic"},
    ]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (1, "GreaterThanOrEqualToThreshold")
    assert (alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"], alarm["TreatMissingData"]) == (3, 2, "notBreaching")


def test_rollback_on_model_latency_with_the_configured_statistic_and_bound_in_microseconds():
    alarm = _rollback_alarms_by_name()["scones-dev-rollback-latency"]
    assert (alarm["Namespace"], alarm["MetricName"], alarm["ExtendedStatistic"]) == (
        "AWS/SageMaker",
        "ModelLatency",
        "p99",
    )
    assert alarm["Dimensions"] == [
        {"Name": "EndpointName", "Value": "scones-dev"},
        {"Name": "VariantName", "Value": "AllTraffic"},
    ]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (500_000, "GreaterThanThreshold")
    average = _rollback_alarms_by_name(rollback_latency_statistic="Average", rollback_latency_ms="120")[
        "scones-dev-rollback-latency"
    ]
    assert (average["Statistic"], average["Threshold"]) == ("Average", 120_000)
    assert "ExtendedStatistic" not in average


def _low_confidence_alarm(**context) -> tuple[dict, dict[str, dict], dict[str, str]]:
    """The low-confidence rollback alarm, its metrics' MetricStat by id, and its expressions by id."""
    alarm = _rollback_alarms_by_name(**context)["scones-dev-rollback-low-confidence"]
    stats = {m["Id"]: m["MetricStat"] for m in alarm["Metrics"] if "MetricStat" in m}
    expressions = {m["Id"]: m["Expression"] for m in alarm["Metrics"] if "Expression" in m}
    (returned,) = [m["Id"] for m in alarm["Metrics"] if m.get("ReturnData", True)]
    return alarm, stats, {"returned": expressions.pop(returned), **expressions}


def test_rollback_on_the_filters_low_confidence_rate_in_the_namespace_and_dimension_it_emits():
    sys.path.insert(0, str(ROOT / "lambdas"))
    from filter_inferences import index as filter_step
    from rollback_baseline import index as baseline

    alarm, stats, expressions = _low_confidence_alarm(endpoint_name="bikes")
    assert expressions["rate"] == "IF(answered > 0, 100 * lowconfidence / answered, 0)"
    assert {name: (s["Metric"]["Namespace"], s["Metric"]["MetricName"], s["Stat"]) for name, s in stats.items()} == {
        "answered": (METRIC_NAMESPACE, filter_step.TOP_PROBABILITY_METRIC, "SampleCount"),
        "lowconfidence": (METRIC_NAMESPACE, filter_step.LOW_CONFIDENCE_METRIC, "Sum"),
        "baseline": (METRIC_NAMESPACE, baseline.BASELINE_METRIC, "Average"),
    }
    # The filter's EMF line has EndpointName as its only dimension: the alarm can only see both fleets at once.
    line = json.loads(filter_step.metric_line(METRIC_NAMESPACE, "bikes", 0, 0.5, True, 0.9))
    (directive, _) = line["_aws"]["CloudWatchMetrics"]
    assert directive["Dimensions"] == [["EndpointName"]]
    assert all(s["Metric"]["Dimensions"] == [{"Name": "EndpointName", "Value": "bikes"}] for s in stats.values())
    assert all(s["Period"] == 60 for s in stats.values())


def test_low_confidence_rolls_back_on_a_rise_above_the_baseline_or_the_fixed_bound_without_one():
    alarm, _, expressions = _low_confidence_alarm()
    # A minute with a baseline: share - baseline > 15. Without one: share - (40 - 15) > 15, i.e. share > 40.
    assert expressions["returned"] == "rate - FILL(baseline, 25)"
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (15, "GreaterThanThreshold")
    assert (alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"], alarm["TreatMissingData"]) == (3, 2, "notBreaching")
    assert "more than 15 points above its 24-hour baseline" in alarm["AlarmDescription"]
    assert "no baseline, above 40%" in alarm["AlarmDescription"]

    alarm, _, expressions = _low_confidence_alarm(
        rollback_low_confidence_rise="5", rollback_low_confidence_percent="30"
    )
    assert (expressions["returned"], alarm["Threshold"]) == ("rate - FILL(baseline, 25)", 5)
    alarm, _, expressions = _low_confidence_alarm(
        rollback_low_confidence_rise="20", rollback_low_confidence_percent="20"
    )
    assert (expressions["returned"], alarm["Threshold"]) == ("rate - FILL(baseline, 0)", 20)


def test_the_baseline_is_published_every_five_minutes_for_the_next_ten():
    endpoint = template("Endpoint", endpoint_name="bikes")
    (function_id,) = [f for f in endpoint.find_resources("AWS::Lambda::Function") if f.startswith("RollbackBaseline")]
    function = endpoint.find_resources("AWS::Lambda::Function")[function_id]["Properties"]
    assert function["Handler"] == "rollback_baseline.index.handler"
    variables = function["Environment"]["Variables"]
    assert variables == {
        "ENDPOINT_NAME": "bikes",
        "METRIC_NAMESPACE": METRIC_NAMESPACE,
        "BASELINE_WINDOW_HOURS": "24",
        "BASELINE_MINUTES": "10",
    }
    (rule,) = endpoint.find_resources("AWS::Events::Rule").values()
    assert rule["Properties"]["ScheduleExpression"] == "rate(5 minutes)"
    assert rule["Properties"]["Targets"] == [{"Arn": {"Fn::GetAtt": [function_id, "Arn"]}, "Id": "Target0"}]
    # Each minute is covered by two calls: one late or failed call leaves no minute without a baseline.
    assert int(variables["BASELINE_MINUTES"]) >= 2 * 5
    endpoint.has_resource_properties(
        "AWS::Lambda::Permission",
        {
            "Action": "lambda:InvokeFunction",
            "Principal": "events.amazonaws.com",
            "FunctionName": {"Fn::GetAtt": [function_id, "Arn"]},
        },
    )


def test_the_baseline_role_reads_metrics_and_writes_only_the_filters_namespace():
    endpoint = template("Endpoint")
    statements = _statements_of(endpoint, "RollbackBaselineRole")
    by_action = {action: statement for statement in statements for action in _actions(statement)}
    assert set(by_action) == {
        "cloudwatch:GetMetricData",
        "cloudwatch:PutMetricData",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "xray:PutTelemetryRecords",
        "xray:PutTraceSegments",
    }
    assert by_action["cloudwatch:PutMetricData"]["Condition"] == {
        "StringEquals": {"cloudwatch:namespace": METRIC_NAMESPACE}
    }
    assert "Condition" not in by_action["cloudwatch:GetMetricData"]  # it takes no resource and no condition key
    (logs_id,) = [
        name for name in endpoint.find_resources("AWS::Logs::LogGroup") if name.startswith("RollbackBaselineLogs")
    ]
    assert by_action["logs:PutLogEvents"]["Resource"] == {"Fn::GetAtt": [logs_id, "Arn"]}


def test_model_role_may_describe_exactly_the_rollback_alarms():
    endpoint = template("Endpoint")
    statements = _statements_of(endpoint, "ModelRole")
    (describe,) = [s for s in statements if "cloudwatch:DescribeAlarms" in _actions(s)]
    alarms = endpoint.find_resources("AWS::CloudWatch::Alarm")
    assert describe["Action"] == "cloudwatch:DescribeAlarms"
    assert sorted(r["Fn::GetAtt"][0] for r in describe["Resource"]) == sorted(alarms)
    assert all(r["Fn::GetAtt"][1] == "Arn" for r in describe["Resource"])


def test_deployment_settings_are_checked_against_what_sagemaker_accepts():
    assert not SconesConfig().uses_canary and SconesConfig(endpoint_instance_count=2).uses_canary
    with pytest.raises(ConfigError, match=r"canary_percent.*more than half the fleet; lower it \(at most 33%\)"):
        SconesConfig.from_context({"endpoint_instance_count": "3", "canary_percent": "50"})
    with pytest.raises(ConfigError, match="canary_percent.*outside"):
        SconesConfig.from_context({"canary_percent": "60"})
    with pytest.raises(ConfigError, match="deployment_timeout_minutes.*= 40.*raise it"):
        SconesConfig.from_context({"canary_bake_minutes": "20", "deployment_timeout_minutes": "40"})
    with pytest.raises(ConfigError, match="rollback_latency_statistic.*p99, Average"):
        SconesConfig.from_context({"rollback_latency_statistic": "p90"})


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"rollback_low_confidence_rise": "many"}, "rollback_low_confidence_rise.*is not a float"),
        ({"rollback_low_confidence_rise": "0.5"}, r"rollback_low_confidence_rise.*outside \[1.0, 100.0\]"),
        (
            {"rollback_low_confidence_rise": "30", "rollback_low_confidence_percent": "20"},
            "rollback_low_confidence_rise.*30 points is above 'rollback_low_confidence_percent' .*lower the rise",
        ),
    ],
)
def test_a_bad_rollback_rise_is_refused_naming_the_key(context, message):
    with pytest.raises(ConfigError, match=message):
        SconesConfig.from_context(context)
