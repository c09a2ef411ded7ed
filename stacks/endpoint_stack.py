"""The real-time SageMaker endpoint, capturing every request and answer to the bucket, and updated blue/green:
a canary of the new fleet first, rolled back automatically when one of the alarms below fires while it bakes."""

from aws_cdk import (
    CfnOutput,
    Duration,
    Fn,
    Stack,
    aws_applicationautoscaling as appscaling,
    aws_cloudwatch as cloudwatch,
    aws_events as events,
    aws_events_targets as targets,
    aws_iam as iam,
    aws_kms as kms,
    aws_s3 as s3,
    aws_sagemaker as sagemaker,
    aws_ssm as ssm,
)
from cdk_nag import NagSuppressions
from constructs import Construct

from stacks.config import SconesConfig
from stacks.constructs import PythonFunction, SageMakerRole
from stacks.data_stack import CAPTURE_PREFIX
from stacks.images import image_uri, repository_arn
from stacks.metrics import (
    BASELINE_WINDOW_HOURS,
    LOW_CONFIDENCE_BASELINE,
    VARIANT_NAME,
    endpoint_metric,
    low_confidence_baseline,
    low_confidence_rate,
)
from stacks.registry import DEFAULT_THRESHOLD_VALUE
from stacks.training_stack import MODEL_PREFIX
from stacks.workflow_stack import METRIC_NAMESPACE

# The rollback alarms judge one-minute periods (SageMaker's invocation metrics are per minute): two bad
# minutes out of three roll the update back, a single slow or failed request does not.
ROLLBACK_PERIOD = Duration.minutes(1)
ROLLBACK_EVALUATION_PERIODS = 3
ROLLBACK_DATAPOINTS = 2
# Alarms are watched only while the update bakes: an old fleet kept past a successful update could not be rolled
# back to, it would only bill its instances.
TERMINATION_WAIT_SECONDS = 0
# The low-confidence alarm's baseline is recomputed every 5 minutes, each time published for the next 10 one-minute
# periods, so that one late or failed call leaves no minute without a baseline.
BASELINE_SCHEDULE = Duration.minutes(5)
BASELINE_MINUTES = 10


class EndpointStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, config: SconesConfig, bucket: s3.IBucket, **kwargs
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        algorithm = config.training_algorithm
        role = SageMakerRole(
            self,
            "ModelRole",
            description="scones endpoint: read models, write captures",
            repository_arns=[repository_arn(self, algorithm, "inference")],
        ).role
        role.add_to_policy(
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[bucket.arn_for_objects(f"{MODEL_PREFIX}*")])
        )
        role.add_to_policy(
            iam.PolicyStatement(actions=["s3:PutObject"], resources=[bucket.arn_for_objects(f"{CAPTURE_PREFIX}*")])
        )

        self.key = kms.Key(
            self,
            "EndpointKey",
            description="scones endpoint volumes and captured data",
            enable_key_rotation=True,
            removal_policy=config.removal,
        )
        self.key.grant_encrypt_decrypt(role)

        # The approved model as the approval recorded it in one parameter: `<artifact> <threshold> <package ARN>`.
        approved = None
        if config.model_data_url is None:
            approved = Fn.split(
                " ", ssm.StringParameter.value_for_string_parameter(self, config.approved_parameter_name), 3
            )
        model_data_url = config.model_data_url or approved[0]
        container = sagemaker.CfnModel.ContainerDefinitionProperty(
            image=image_uri(self, algorithm, "inference"),
            model_data_url=model_data_url,
            environment={"SAGEMAKER_PROGRAM": "inference.py"} if algorithm == "pytorch" else None,
        )
        model = sagemaker.CfnModel(self, "Model", execution_role_arn=role.role_arn, primary_container=container)
        model.node.add_dependency(role)

        self.capture_destination = bucket.s3_url_for_object(CAPTURE_PREFIX.rstrip("/"))
        endpoint_config = sagemaker.CfnEndpointConfig(
            self,
            "EndpointConfig",
            kms_key_id=self.key.key_arn,
            production_variants=[
                sagemaker.CfnEndpointConfig.ProductionVariantProperty(
                    variant_name=VARIANT_NAME,
                    model_name=model.attr_model_name,
                    instance_type=config.endpoint_instance_type,
                    initial_instance_count=config.endpoint_instance_count,
                    initial_variant_weight=1.0,
                )
            ],
            data_capture_config=sagemaker.CfnEndpointConfig.DataCaptureConfigProperty(
                enable_capture=True,
                initial_sampling_percentage=config.capture_sampling_percentage,
                destination_s3_uri=self.capture_destination,
                kms_key_id=self.key.key_arn,
                capture_options=[
                    sagemaker.CfnEndpointConfig.CaptureOptionProperty(capture_mode="Input"),
                    sagemaker.CfnEndpointConfig.CaptureOptionProperty(capture_mode="Output"),
                ],
                capture_content_type_header=sagemaker.CfnEndpointConfig.CaptureContentTypeHeaderProperty(
                    json_content_types=["application/json"],
                ),
            ),
        )
        self.baseline_function, self.baseline_schedule = self._baseline(config)
        self.rollback_alarms = self._rollback_alarms(config)
        self.endpoint = sagemaker.CfnEndpoint(
            self,
            "Endpoint",
            endpoint_name=config.endpoint_name,
            endpoint_config_name=endpoint_config.attr_endpoint_config_name,
            deployment_config=sagemaker.CfnEndpoint.DeploymentConfigProperty(
                blue_green_update_policy=_blue_green(config),
                # The names as written, not Refs: the local deployment (local/) emulates no alarms, and would
                # otherwise fail to resolve the endpoint; the dependency keeps CloudFormation's order.
                auto_rollback_configuration=sagemaker.CfnEndpoint.AutoRollbackConfigProperty(
                    alarms=[
                        sagemaker.CfnEndpoint.AlarmProperty(alarm_name=name) for name in rollback_alarm_names(config)
                    ]
                ),
            ),
        )
        for alarm in self.rollback_alarms:
            self.endpoint.node.add_dependency(alarm)
        # The guardrails documentation asks that "your IAM execution role" may cloudwatch:DescribeAlarms the
        # rollback alarms. The deploying principal (CloudFormation's role) may; the model's execution role may
        # too, on these three alarms only, in case it is the role meant.
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["cloudwatch:DescribeAlarms"], resources=[alarm.alarm_arn for alarm in self.rollback_alarms]
            )
        )

        scaling = appscaling.ScalableTarget(
            self,
            "Scaling",
            service_namespace=appscaling.ServiceNamespace.SAGEMAKER,
            resource_id=f"endpoint/{config.endpoint_name}/variant/{VARIANT_NAME}",
            scalable_dimension="sagemaker:variant:DesiredInstanceCount",
            min_capacity=config.endpoint_instance_count,
            max_capacity=max(config.endpoint_max_instances, config.endpoint_instance_count),
        )
        scaling.node.add_dependency(self.endpoint)
        scaling.scale_to_track_metric(
            "InvocationsPerInstance",
            target_value=config.invocations_per_instance_target,
            predefined_metric=appscaling.PredefinedMetric.SAGEMAKER_VARIANT_INVOCATIONS_PER_INSTANCE,
            scale_in_cooldown=Duration.minutes(5),
            scale_out_cooldown=Duration.minutes(1),
        )

        self._record_serving(config, model_data_url, approved)

        CfnOutput(
            self,
            "EndpointName",
            value=self.endpoint.attr_endpoint_name,
            description="The SageMaker endpoint the classify Lambda calls.",
        )
        CfnOutput(
            self,
            "ModelDataUrl",
            value=model_data_url,
            description="The model.tar.gz the endpoint serves (the approved one at deploy time unless "
            "model_data_url was given).",
        )

    def _record_serving(self, config: SconesConfig, model_data_url: str, approved: list[str] | None) -> None:
        """The artifact and threshold the filter applies, recorded once the endpoint serves them: after the
        endpoint resource, so CloudFormation writes them only when its update (canary and bakes included)
        succeeded, and an update it rolls back leaves them as they were, not at approval."""
        # A given artifact's threshold is unknown: the default, unless -c threshold sets one.
        threshold = approved[1] if approved else DEFAULT_THRESHOLD_VALUE
        for construct_id, name, value in (
            ("ServingModelDataUrl", config.serving_model_parameter_name, model_data_url),
            ("ServingThreshold", config.serving_threshold_parameter_name, threshold),
        ):
            parameter = ssm.StringParameter(
                self,
                construct_id,
                parameter_name=name,
                string_value=value,
                description=f"scones {config.env_name}: what the endpoint serves, written after its update succeeded",
            )
            parameter.node.add_dependency(self.endpoint)
        if approved:
            CfnOutput(
                self,
                "ModelPackageArn",
                value=approved[2],
                description="The approved model package the endpoint serves (as recorded at deploy time).",
            )

    def _rollback_alarms(self, config: SconesConfig) -> list[cloudwatch.Alarm]:
        """The alarms that roll an endpoint update back: server errors, model latency, and the ML signal.

        SageMaker's metrics carry EndpointName and VariantName, and both fleets keep the variant's name, so
        during an update each alarm sees the old and the new fleet together, as the guardrails documentation's
        examples do. The filter's LowConfidence metric is per endpoint only: during the canary it mixes the
        canary's answers with the old fleet's (the canary's share of the traffic dilutes its change), and it
        counts only the photos classified through the workflow, not direct calls of the endpoint."""
        errors_name, latency_name, low_confidence_name = rollback_alarm_names(config)
        common = {
            "evaluation_periods": ROLLBACK_EVALUATION_PERIODS,
            "datapoints_to_alarm": ROLLBACK_DATAPOINTS,
            "treat_missing_data": cloudwatch.TreatMissingData.NOT_BREACHING,
        }
        errors = endpoint_metric(config, "Invocation5XXErrors", "Sum", ROLLBACK_PERIOD).create_alarm(
            self,
            "Rollback5xx",
            alarm_name=errors_name,
            alarm_description="Rolls an endpoint update back: the endpoint answered 5xx errors in two of three "
            "minutes.",
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            **common,
        )
        latency = endpoint_metric(
            config, "ModelLatency", config.rollback_latency_statistic, ROLLBACK_PERIOD
        ).create_alarm(
            self,
            "RollbackLatency",
            alarm_name=latency_name,
            alarm_description=f"Rolls an endpoint update back: the model latency ({config.rollback_latency_statistic}) "
            f"was above {config.rollback_latency_ms:g} ms in two of three minutes.",
            threshold=config.rollback_latency_ms * 1000,  # ModelLatency is in microseconds
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            **common,
        )
        low_confidence = low_confidence_rise(config).create_alarm(
            self,
            "RollbackLowConfidence",
            alarm_name=low_confidence_name,
            alarm_description="Rolls an endpoint update back: the share of the filter's answers below the threshold "
            f"was more than {config.rollback_low_confidence_rise:g} points above its {BASELINE_WINDOW_HOURS}-hour "
            f"baseline ({LOW_CONFIDENCE_BASELINE}) in two of three minutes; while there is no baseline, "
            f"above {config.rollback_low_confidence_percent:g}%. Old and new fleet together: the metric is per "
            "endpoint.",
            threshold=config.rollback_low_confidence_rise,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            **common,
        )
        return [errors, latency, low_confidence]

    def _baseline(self, config: SconesConfig) -> tuple[PythonFunction, events.Rule]:
        """The function that publishes the low-confidence alarm's baseline, and the schedule that calls it.

        Here rather than in the monitoring stack: the alarm that reads the baseline is here, and the monitoring
        stack depends on this one, so an endpoint deployed alone still has its baseline."""
        baseline = PythonFunction(
            self,
            "RollbackBaseline",
            config=config,
            name="rollback_baseline",
            environment={
                "ENDPOINT_NAME": config.endpoint_name,
                "METRIC_NAMESPACE": METRIC_NAMESPACE,
                "BASELINE_WINDOW_HOURS": str(BASELINE_WINDOW_HOURS),
                "BASELINE_MINUTES": str(BASELINE_MINUTES),
            },
            timeout=Duration.seconds(30),
        )
        baseline.role.add_to_policy(iam.PolicyStatement(actions=["cloudwatch:GetMetricData"], resources=["*"]))
        baseline.role.add_to_policy(
            iam.PolicyStatement(
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": METRIC_NAMESPACE}},
            )
        )
        NagSuppressions.add_resource_suppressions(
            baseline.role,
            [
                {
                    "id": "AwsSolutions-IAM5",
                    "reason": "cloudwatch:GetMetricData and cloudwatch:PutMetricData take no resource; PutMetricData "
                    "is held to the filter's metric namespace by the cloudwatch:namespace condition.",
                    "appliesTo": ["Resource::*"],
                }
            ],
            apply_to_children=True,
        )
        schedule = events.Rule(
            self,
            "RollbackBaselineSchedule",
            rule_name=f"{config.prefix}-rollback-baseline",
            description=f"Every {BASELINE_SCHEDULE.to_minutes()} minutes: the filter's low-confidence share over "
            f"the last {BASELINE_WINDOW_HOURS} hours, the baseline of the endpoint's low-confidence rollback alarm.",
            schedule=events.Schedule.rate(BASELINE_SCHEDULE),
            targets=[targets.LambdaFunction(baseline.function)],
        )
        return baseline, schedule


def low_confidence_rise(config: SconesConfig) -> cloudwatch.MathExpression:
    """The one-minute share of answers below the threshold minus its baseline, in points; a minute without a
    baseline is filled so that the alarm's threshold (the rise) is crossed where the fallback bound is."""
    fill = config.rollback_low_confidence_percent - config.rollback_low_confidence_rise
    return cloudwatch.MathExpression(
        expression=f"rate - FILL(baseline, {fill:g})",
        using_metrics={
            "rate": low_confidence_rate(config, ROLLBACK_PERIOD),
            "baseline": low_confidence_baseline(config, ROLLBACK_PERIOD),
        },
        label="answers below the threshold, points above the baseline",
        period=ROLLBACK_PERIOD,
    )


def rollback_alarm_names(config: SconesConfig) -> list[str]:
    """The names of the alarms that roll an endpoint update back, in the order `_rollback_alarms` makes them."""
    return [f"{config.prefix}-rollback-{signal}" for signal in ("5xx", "latency", "low-confidence")]


def _blue_green(config: SconesConfig) -> sagemaker.CfnEndpoint.BlueGreenUpdatePolicyProperty:
    """Canary then the rest, each step baked; a one-instance fleet cannot hold a canary of at most half of
    it, so it shifts at once and bakes (the old fleet still serves until the bake ends)."""
    bake = config.canary_bake_minutes * 60
    if config.uses_canary:
        routing = sagemaker.CfnEndpoint.TrafficRoutingConfigProperty(
            type="CANARY",
            canary_size=sagemaker.CfnEndpoint.CapacitySizeProperty(
                type="CAPACITY_PERCENT", value=config.canary_percent
            ),
            wait_interval_in_seconds=bake,
        )
    else:
        routing = sagemaker.CfnEndpoint.TrafficRoutingConfigProperty(type="ALL_AT_ONCE", wait_interval_in_seconds=bake)
    return sagemaker.CfnEndpoint.BlueGreenUpdatePolicyProperty(
        traffic_routing_configuration=routing,
        termination_wait_in_seconds=TERMINATION_WAIT_SECONDS,
        maximum_execution_timeout_in_seconds=config.deployment_timeout_minutes * 60,
    )
