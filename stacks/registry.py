"""The model registry: a SageMaker model package group per environment, the evaluation gate and registration
the training state machine runs after its job, and the approval that makes an approved package the one served.

The gate reads the figures train.py prints as `scones-<name>=<value>` lines, which SageMaker collects through
the job's metric definitions into the job's `FinalMetricDataList`. Approving a package (SageMaker console, or
`python -m training.fit approve`) emits "SageMaker Model Package State Change"; a rule on it starts the
approval state machine, which records the package's artifact, threshold and ARN in SSM, where the endpoint
stack and the filter read them.
"""

from dataclasses import dataclass

from aws_cdk import (
    Duration,
    Stack,
    aws_events as events,
    aws_events_targets as targets,
    aws_sagemaker as sagemaker,
    aws_stepfunctions as sfn,
    aws_stepfunctions_tasks as tasks,
)
from cdk_nag import NagSuppressions
from constructs import Construct

from stacks.config import SconesConfig
from stacks.constructs import LoggedStateMachine

GATE_ERROR = "ModelBelowGate"
# The threshold recorded for a package without one: the filter (lambdas/filter_inferences) applies its default.
DEFAULT_THRESHOLD_VALUE = "default"
# The endpoint's contract (ARCHITECTURE.md): the photo's bytes in, a JSON list of probabilities out.
CONTENT_TYPES = ["image/png", "image/jpeg", "application/x-image"]


@dataclass(frozen=True)
class GateMetric:
    """A figure of the evaluation gate: its SageMaker metric name, its key in the state machine's `$.Metrics`
    and in the package's metadata, and the SconesConfig field holding its floor (or ceiling)."""

    name: str
    key: str
    bound: str | None = None
    ceiling: bool = False
    required: bool = True

    @property
    def regex(self) -> str:
        """What reads train.py's `scones-<name>=<value>` line (`training.calibration.gate_lines`)."""
        return rf"scones-{self.name.replace('_', '-')}=([0-9.eE+-]+)"


# train.py's figures (the threshold is not gated: the approval records it for the filter). A model without a
# neither class reports no neither_accepted and is not gated on it.
PYTORCH_METRICS = (
    GateMetric("threshold", "threshold"),
    GateMetric("test_accuracy", "test_accuracy", "gate_min_accuracy"),
    GateMetric("accepted_accuracy", "accepted_accuracy", "gate_min_accepted_accuracy"),
    GateMetric("coverage", "coverage", "gate_min_coverage"),
    GateMetric("neither_accepted", "neither_accepted", "gate_max_neither_accepted", ceiling=True, required=False),
)
# The built-in algorithm reports its own metrics: no threshold, no test images; its validation accuracy is gated.
BUILTIN_METRICS = (GateMetric("validation:accuracy", "validation_accuracy", "gate_min_accuracy"),)


def gate_metrics(algorithm: str) -> tuple[GateMetric, ...]:
    return PYTORCH_METRICS if algorithm == "pytorch" else BUILTIN_METRICS


def metric_definitions(algorithm: str) -> list[tasks.MetricDefinition] | None:
    """The training job's metric definitions: train.py's lines; none for the built-in algorithm's own."""
    if algorithm != "pytorch":
        return None
    return [tasks.MetricDefinition(name=metric.name, regex=metric.regex) for metric in PYTORCH_METRICS]


def _state_id(prefix: str, metric: GateMetric) -> str:
    return prefix + "".join(part.title() for part in metric.key.split("_"))


class ModelRegistry(Construct):
    """The model package group `scones-<env>`, and the approval rule and state machine that record an approved
    package in SSM. `gate_and_register` builds the training state machine's states that register into it."""

    def __init__(self, scope: Construct, construct_id: str, *, config: SconesConfig) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.config = config
        self.group_name = config.model_package_group_name
        self.group = sagemaker.CfnModelPackageGroup(
            self,
            "Group",
            model_package_group_name=self.group_name,
            model_package_group_description=f"scones {config.env_name}: models that passed the evaluation gate",
        )
        # The registry records what was approved and served. As the environment's buckets and logs: kept in prod;
        # in dev deleted with the stack, which SageMaker refuses while the group holds packages (docs/deploying.md).
        self.group.apply_removal_policy(config.removal)
        # Versioned packages are named <group>/<version>; strings, not references, so that the local
        # deployment (which does not emulate the group) resolves every policy and definition.
        self.packages_arn = stack.format_arn(
            service="sagemaker", resource="model-package", resource_name=f"{self.group_name}/*"
        )
        self.parameter_arns = {
            name: stack.format_arn(service="ssm", resource="parameter", resource_name=name.lstrip("/"))
            for name in (
                config.model_parameter_name,
                config.threshold_parameter_name,
                config.model_package_parameter_name,
                config.approved_parameter_name,
            )
        }

        self.approval = LoggedStateMachine(
            self,
            "Approval",
            config=config,
            name="approval",
            definition=self._approval_definition(),
            timeout=Duration.minutes(5),
        )
        self.rule = events.Rule(
            self,
            "Approved",
            description=f"An approved package of {self.group_name} becomes the one the endpoint serves",
            event_pattern=events.EventPattern(
                source=["aws.sagemaker"],
                detail_type=["SageMaker Model Package State Change"],
                detail={"ModelPackageGroupName": [self.group_name], "ModelApprovalStatus": ["Approved"]},
            ),
            targets=[targets.SfnStateMachine(self.approval.state_machine)],
        )
        NagSuppressions.add_resource_suppressions(
            self.approval,
            [
                {
                    "id": "AwsSolutions-IAM5",
                    "reason": "X-Ray and CloudWatch Logs delivery actions take no resource; the approved package is "
                    "any version of this environment's group (model-package/<group>/<version>, named at run time).",
                }
            ],
            apply_to_children=True,
        )

    # ------------------------------------------------------------------------------- approval → serving

    def _approval_definition(self) -> sfn.IChainable:
        config = self.config
        package = "$.Package"
        describe = tasks.CallAwsService(
            self,
            "DescribePackage",
            service="sagemaker",
            action="describeModelPackage",
            parameters={"ModelPackageName": sfn.JsonPath.string_at("$.detail.ModelPackageArn")},
            iam_resources=[self.packages_arn],
            result_path=package,
        )
        served_url, threshold, package_arn = (
            "$.Served.Container.ModelDataUrl",
            "$.Threshold.value",
            f"{package}.ModelPackageArn",
        )
        record_model = self._put_parameter(
            "RecordModelDataUrl", config.model_parameter_name, sfn.JsonPath.string_at(served_url)
        )
        # A package without a threshold (the built-in algorithm's): the filter applies its default, not the
        # threshold of the package served before.
        package_threshold = sfn.Pass(
            self,
            "PackageThreshold",
            parameters={"value": sfn.JsonPath.string_at(f"{package}.CustomerMetadataProperties.threshold")},
            result_path="$.Threshold",
        )
        default_threshold = sfn.Pass(
            self,
            "DefaultThreshold",
            result=sfn.Result.from_object({"value": DEFAULT_THRESHOLD_VALUE}),
            result_path="$.Threshold",
        )
        record_threshold = self._put_parameter(
            "RecordThreshold", config.threshold_parameter_name, sfn.JsonPath.string_at(threshold)
        )
        package_threshold.next(record_threshold)
        default_threshold.next(record_threshold)
        record_package = self._put_parameter(
            "RecordPackageArn", config.model_package_parameter_name, sfn.JsonPath.string_at(package_arn)
        )
        # Last, and in one write, what the endpoint stack reads.
        record_approved = self._put_parameter(
            "RecordApproved",
            config.approved_parameter_name,
            sfn.JsonPath.format(
                "{} {} {}", *(sfn.JsonPath.string_at(path) for path in (served_url, threshold, package_arn))
            ),
        )
        serving = sfn.Pass(
            self,
            "Serving",
            parameters={
                "ModelPackageArn": sfn.JsonPath.string_at(package_arn),
                "ModelDataUrl": sfn.JsonPath.string_at(served_url),
            },
        )
        record_threshold.next(record_package).next(record_approved).next(serving)
        # The container in a state of its own: moto's engine answers a list for a path through an index
        # (`Containers[0].ModelDataUrl`), AWS the value; both answer the item for a path ending in one.
        served = sfn.Pass(
            self,
            "ServedContainer",
            parameters={"Container": sfn.JsonPath.object_at(f"{package}.InferenceSpecification.Containers[0]")},
            result_path="$.Served",
        )
        # The event may be older than the package's state: one approved and rejected again records nothing.
        still_approved = (
            sfn.Choice(self, "StillApproved")
            .when(
                sfn.Condition.string_equals(f"{package}.ModelApprovalStatus", "Approved"),
                served.next(record_model).next(
                    sfn.Choice(self, "HasThreshold")
                    .when(
                        sfn.Condition.is_present(f"{package}.CustomerMetadataProperties.threshold"),
                        package_threshold,
                    )
                    .otherwise(default_threshold)
                ),
            )
            .otherwise(
                sfn.Pass(
                    self,
                    "NoLongerApproved",
                    parameters={
                        "ModelPackageArn": sfn.JsonPath.string_at(f"{package}.ModelPackageArn"),
                        "ModelApprovalStatus": sfn.JsonPath.string_at(f"{package}.ModelApprovalStatus"),
                    },
                )
            )
        )
        return describe.next(still_approved)

    def _put_parameter(self, state_id: str, name: str, value: str) -> tasks.CallAwsService:
        return tasks.CallAwsService(
            self,
            state_id,
            service="ssm",
            action="putParameter",
            parameters={
                "Name": name,
                "Value": value,
                "Type": "String",
                "Overwrite": True,
            },
            iam_resources=[self.parameter_arns[name]],
            result_path=sfn.JsonPath.DISCARD,
        )

    # ------------------------------------------------------------------------- gate and registration

    def gate_and_register(
        self, scope: Construct, *, algorithm: str, inference_image: str, done: sfn.IChainable
    ) -> sfn.IChainable:
        """The training state machine's states after its job (whose description is the state's input): fail
        with ModelBelowGate when a figure is missing or past its bound, else register a model package, then
        `done`. States are created in `scope` (the training stack's), so their names are the definition's."""
        config = self.config
        metrics = gate_metrics(algorithm)
        required = [metric for metric in metrics if metric.required]
        optional = [metric for metric in metrics if not metric.required]
        assert len(optional) <= 1, "the metadata states below handle one optional figure"

        def below_gate(metric: GateMetric, value_path: str) -> sfn.Fail:
            bound = getattr(config, metric.bound)
            return sfn.Fail(
                scope,
                _state_id("Above" if metric.ceiling else "Below", metric),
                error=GATE_ERROR,
                cause_path=sfn.JsonPath.format(
                    f"{metric.name} {{}} is {'above the ceiling' if metric.ceiling else 'below the floor'} "
                    f"{bound:g} ({metric.bound})",
                    sfn.JsonPath.string_at(value_path),
                ),
            )

        def unreported(metric: GateMetric) -> sfn.Fail:
            return sfn.Fail(
                scope,
                _state_id("No", metric),
                error=GATE_ERROR,
                cause=f"the training job reported no {metric.name} metric, which the evaluation gate needs"
                + (
                    ": train.py measures the test figures on the staged test images (python -m training.etl)"
                    if metric.name != "threshold"
                    else ""
                ),
            )

        def value(metric: GateMetric) -> str:
            # A JSONPath filter answers a list. Only run once the metric is known to be reported: a filter that
            # matches nothing fails the state on moto's engine, and AWS documents no answer for that case.
            return f"$.FinalMetricDataList[?(@.MetricName == '{metric.name}')].Value"

        status = "Approved" if config.auto_approve else "PendingManualApproval"
        container = {
            "Image": inference_image,
            "ModelDataUrl": sfn.JsonPath.string_at("$.ModelArtifacts.S3ModelArtifacts"),
        }
        if algorithm == "pytorch":
            container["Environment"] = {"SAGEMAKER_PROGRAM": "inference.py"}
        register = tasks.CallAwsService(
            scope,
            "RegisterModel",
            service="sagemaker",
            action="createModelPackage",
            parameters={
                "ModelPackageGroupName": self.group_name,
                "ModelPackageDescription": sfn.JsonPath.format(
                    "trained by {}", sfn.JsonPath.string_at("$.TrainingJobName")
                ),
                "ModelApprovalStatus": status,
                "InferenceSpecification": {
                    "Containers": [container],
                    "SupportedContentTypes": CONTENT_TYPES,
                    "SupportedResponseMIMETypes": ["application/json"],
                    "SupportedRealtimeInferenceInstanceTypes": [config.endpoint_instance_type],
                },
                "CustomerMetadataProperties": sfn.JsonPath.object_at("$.Metadata"),
            },
            iam_resources=[self.packages_arn],
            result_selector={"ModelPackageArn": sfn.JsonPath.string_at("$.ModelPackageArn")},
            result_path="$.Registered",
        )
        register.next(
            sfn.Pass(
                scope,
                "Registered",
                parameters={
                    "S3ModelArtifacts": sfn.JsonPath.string_at("$.ModelArtifacts.S3ModelArtifacts"),
                    "ModelPackageArn": sfn.JsonPath.string_at("$.Registered.ModelPackageArn"),
                    "ModelApprovalStatus": status,
                },
            ).next(done)
        )

        def metadata(state_id: str, extra: dict[str, str]) -> sfn.Pass:
            """The package's CustomerMetadataProperties: every figure as a string, and the training job."""
            return sfn.Pass(
                scope,
                state_id,
                parameters={
                    **{
                        metric.key: sfn.JsonPath.json_to_string(sfn.JsonPath.number_at(f"$.Metrics.{metric.key}[0]"))
                        for metric in required
                    },
                    **extra,
                    "training_job": sfn.JsonPath.string_at("$.TrainingJobName"),
                },
                result_path="$.Metadata",
            ).next(register)

        after_floors: sfn.IChainable = metadata("Metadata", {})
        for metric in optional:
            read_path = f"$.Optional.{metric.key}[0]"
            check = (
                sfn.Choice(scope, _state_id("Gate", metric))
                .when(
                    sfn.Condition.number_greater_than(read_path, getattr(config, metric.bound)),
                    below_gate(metric, read_path),
                )
                .otherwise(
                    metadata(
                        _state_id("MetadataWith", metric),
                        {metric.key: sfn.JsonPath.json_to_string(sfn.JsonPath.number_at(read_path))},
                    )
                )
            )
            read = sfn.Pass(
                scope,
                _state_id("Read", metric),
                parameters={metric.key: sfn.JsonPath.list_at(value(metric))},
                result_path="$.Optional",
            ).next(check)
            after_floors = (
                sfn.Choice(scope, _state_id("Reports", metric))
                .when(sfn.Condition.boolean_equals(f"$.Gate.Reported.{metric.key}", True), read)
                .otherwise(after_floors)
            )

        gate = sfn.Choice(scope, "EvaluationGate")
        for metric in required:
            if metric.bound:
                path = f"$.Metrics.{metric.key}[0]"
                bound = getattr(config, metric.bound)
                condition = (
                    sfn.Condition.number_greater_than(path, bound)
                    if metric.ceiling
                    else sfn.Condition.number_less_than(path, bound)
                )
                gate.when(condition, below_gate(metric, path))
        gate.otherwise(after_floors)

        read_metrics = sfn.Pass(
            scope,
            "ReadMetrics",
            parameters={metric.key: sfn.JsonPath.list_at(value(metric)) for metric in required},
            result_path="$.Metrics",
        ).next(gate)
        all_reported = sfn.Choice(scope, "AllReported")
        for metric in required:
            all_reported.when(sfn.Condition.boolean_equals(f"$.Gate.Reported.{metric.key}", False), unreported(metric))
        all_reported.otherwise(read_metrics)
        reported = sfn.Pass(
            scope,
            "MetricsReported",
            parameters={
                metric.key: sfn.JsonPath.array_contains(sfn.JsonPath.list_at("$.Gate.Names"), metric.name)
                for metric in metrics
            },
            result_path="$.Gate.Reported",
        ).next(all_reported)
        names = sfn.Pass(
            scope,
            "MetricNames",
            parameters={"Names": sfn.JsonPath.list_at("$.FinalMetricDataList[*].MetricName")},
            result_path="$.Gate",
        ).next(reported)
        return (
            sfn.Choice(scope, "HasMetrics")
            .when(sfn.Condition.is_present("$.FinalMetricDataList"), names)
            .otherwise(
                sfn.Fail(
                    scope,
                    "NoMetrics",
                    error=GATE_ERROR,
                    cause="the training job reported no metrics, which the evaluation gate needs",
                )
            )
        )
