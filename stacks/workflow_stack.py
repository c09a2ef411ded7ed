"""The three Lambdas and the state machines that chain them: one image, and every image under a prefix."""

from aws_cdk import (
    Aws,
    CfnOutput,
    Duration,
    Stack,
    aws_iam as iam,
    aws_s3 as s3,
    aws_sqs as sqs,
    aws_stepfunctions as sfn,
    aws_stepfunctions_tasks as tasks,
)
from cdk_nag import NagSuppressions
from constructs import Construct

from stacks.config import DEFAULT_THRESHOLD, IMAGE_SUFFIXES, SconesConfig
from stacks.constructs import LoggedStateMachine, PythonFunction

# Names the classify handler raises for failures worth retrying (the endpoint's own error codes and
# botocore's connection errors); anything else fails the execution at once.
TRANSIENT_ENDPOINT_ERRORS = [
    "ServiceUnavailable",
    "InternalFailure",
    "ThrottlingException",
    "ModelNotReadyException",
    "InternalDependencyException",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
]
LAMBDA_TRANSIENT_ERRORS = [
    "Lambda.TooManyRequestsException",
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
]
LOW_CONFIDENCE_ERROR = "ThresholdConfidenceNotMet"
# What a reviewer's "neither" answer fails the review task with, and what the execution fails with when no
# reviewer answered in time.
NOT_A_VEHICLE_ERROR = "NotAVehicle"
REVIEW_TIMED_OUT_ERROR = "ReviewTimedOut"
# The classification state machine's name after the prefix; the review stack builds its ARN from it.
CLASSIFY_STATE_MACHINE = "classify-image"
# The state machines' own limits beyond a review's wait.
CLASSIFICATION_TIMEOUT = Duration.minutes(5)
BATCH_TIMEOUT = Duration.hours(24)
# What the batch's startExecution.sync:2 raises: the child ran and failed, or could not be started for now.
CHILD_FAILED_ERROR = "States.TaskFailed"
START_TRANSIENT_ERRORS = [
    "StepFunctions.ExecutionLimitExceededException",
    "StepFunctions.SdkClientException",
    "StepFunctions.AWSStepFunctionsException",
]
# The CloudWatch namespace of the filter's metrics (given to it as METRIC_NAMESPACE), which the monitoring
# stack's dashboard and alarms read and the drift job publishes to.
METRIC_NAMESPACE = "Scones"
BATCH_RESULTS_PREFIX = "batch_results/"


class PrefixResultWriter(sfn.ResultWriterV2):
    """The Map's result writer, allowed to write under its own prefix only (CDK's allows the whole bucket)."""

    def __init__(self, bucket: s3.IBucket, prefix: str) -> None:
        super().__init__(bucket=bucket, prefix=prefix)
        self._objects = bucket.arn_for_objects(f"{prefix}*")

    def provide_policy_statements(self) -> list[iam.PolicyStatement]:
        return [
            iam.PolicyStatement(
                actions=["s3:PutObject", "s3:GetObject", "s3:ListMultipartUploadParts", "s3:AbortMultipartUpload"],
                resources=[self._objects],
            )
        ]


class WorkflowStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: SconesConfig,
        bucket: s3.IBucket,
        review_queue: sqs.IQueue | None,
        **kwargs,
    ) -> None:
        """`review_queue`: where an uncertain answer is sent for a person to review (None: it fails the
        execution with ThresholdConfidenceNotMet, the classic behaviour)."""
        super().__init__(scope, construct_id, **kwargs)
        self.serialize = PythonFunction(
            self,
            "SerializeImageData",
            config=config,
            name="serialize_image_data",
            environment={},
            timeout=Duration.seconds(10),
        ).function
        self.serialize.add_to_role_policy(
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[bucket.arn_for_objects("*")])
        )

        self.classify = PythonFunction(
            self,
            "ClassifyImage",
            config=config,
            name="classify_image",
            environment={"ENDPOINT_NAME": config.endpoint_name},
            timeout=Duration.seconds(30),
        ).function
        self.endpoint_arn = self.format_arn(
            service="sagemaker", resource="endpoint", resource_name=config.endpoint_name.lower()
        )
        self.classify.add_to_role_policy(
            iam.PolicyStatement(actions=["sagemaker:InvokeEndpoint"], resources=[self.endpoint_arn])
        )
        # An image too large to travel in the state travels as its S3 location, read here.
        self.classify.add_to_role_policy(
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[bucket.arn_for_objects("*")])
        )

        filter_environment = self._filter_environment(config)
        self.filter = PythonFunction(
            self,
            "FilterInferences",
            config=config,
            name="filter_inferences",
            environment=filter_environment,
            timeout=Duration.seconds(10),
        ).function
        # The parameters the filter reads at run time: the served model's threshold unless overridden, and its
        # URL unless given.
        parameter_names = [
            name
            for variable, name in filter_environment.items()
            if variable in ("THRESHOLD_PARAMETER", "MODEL_PARAMETER")
        ]
        if parameter_names:
            self.filter.add_to_role_policy(
                iam.PolicyStatement(
                    actions=["ssm:GetParameters"],
                    resources=[
                        self.format_arn(service="ssm", resource="parameter", resource_name=name.lstrip("/"))
                        for name in parameter_names
                    ],
                )
            )

        review_wait = Duration.seconds(config.review_timeout_seconds if review_queue else 0)
        self.workflow = LoggedStateMachine(
            self,
            "Classification",
            config=config,
            name=CLASSIFY_STATE_MACHINE,
            definition=self._classification_definition(config, review_queue),
            timeout=CLASSIFICATION_TIMEOUT.plus(review_wait),
        )
        self.state_machine = self.workflow.state_machine

        self.batch = LoggedStateMachine(
            self,
            "Batch",
            config=config,
            name="classify-prefix",
            definition=self._batch_definition(bucket, config),
            # A child classification may wait for a reviewer as long as the review timeout.
            timeout=BATCH_TIMEOUT.plus(review_wait),
        )
        self.state_machine.grant_start_execution(self.batch.state_machine)

        CfnOutput(
            self,
            "ClassifyStateMachineArn",
            value=self.state_machine.state_machine_arn,
            description='Classifies one photo: start it with {"s3_bucket": "<bucket>", "s3_key": "<key>"}.',
        )
        CfnOutput(
            self,
            "ClassifyPrefixStateMachineArn",
            value=self.batch.state_machine.state_machine_arn,
            description='Classifies every photo under a prefix: start it with {"prefix": "<prefix>"}; '
            f"results go to {BATCH_RESULTS_PREFIX} in the bucket.",
        )
        CfnOutput(
            self,
            "ClassifyConsoleUrl",
            description="The classify state machine in the Step Functions "
            "console, to start an execution and follow it.",
            value=f"https://console.aws.amazon.com/states/home?region={Aws.REGION}"
            f"#/statemachines/view/{self.state_machine.state_machine_arn}",
        )

        for function in (self.serialize, self.classify):
            NagSuppressions.add_resource_suppressions(
                function.role,
                [
                    {
                        "id": "AwsSolutions-IAM5",
                        "reason": "Serialize and classify read whichever image key the execution names, so "
                        "s3:GetObject on the bucket's objects.",
                        "appliesTo": [{"regex": "/^Resource::.*Data.*\\/\\*$/"}],
                    }
                ],
                apply_to_children=True,
            )
        NagSuppressions.add_resource_suppressions(
            [self.workflow, self.batch],
            [
                {
                    "id": "AwsSolutions-IAM5",
                    "reason": "X-Ray and CloudWatch Logs delivery actions take no resource; LambdaInvoke grants the "
                    "function's versions (<arn>:*); the batch run describes and stops its child executions (named "
                    "at run time), reads its own map runs and writes its result files under batch_results/.",
                }
            ],
            apply_to_children=True,
        )

    @staticmethod
    def _filter_environment(config: SconesConfig) -> dict[str, str]:
        """The threshold: an override when given, else the served model's (SSM, recorded by the endpoint stack
        once an update succeeded), else the default."""
        environment = {
            "CLASS_NAMES": ",".join(config.classes),
            "ENDPOINT_NAME": config.endpoint_name,
            "METRIC_NAMESPACE": METRIC_NAMESPACE,
        }
        if config.threshold is None:
            environment["THRESHOLD_PARAMETER"] = config.serving_threshold_parameter_name
            environment["DEFAULT_THRESHOLD"] = str(DEFAULT_THRESHOLD)
        else:
            environment["THRESHOLD"] = str(config.threshold)
        if config.model_data_url is None:
            environment["MODEL_PARAMETER"] = config.serving_model_parameter_name
        else:
            environment["MODEL_DATA_URL"] = config.model_data_url
        return environment

    def _invoke(self, construct_id: str, function) -> tasks.LambdaInvoke:
        """A step whose input is the previous step's body, as the classic `$.Payload.body` wiring did."""
        step = tasks.LambdaInvoke(
            self,
            construct_id,
            lambda_function=function,
            output_path="$.Payload.body",
            retry_on_service_exceptions=False,
        )
        step.add_retry(
            errors=LAMBDA_TRANSIENT_ERRORS,
            interval=Duration.seconds(1),
            max_attempts=4,
            backoff_rate=2,
            jitter_strategy=sfn.JitterType.FULL,
        )
        return step

    def _classification_definition(self, config: SconesConfig, review_queue: sqs.IQueue | None) -> sfn.IChainable:
        serialize = self._invoke("Serialize image data", self.serialize)
        classify = self._invoke("Classify image", self.classify)
        classify.add_retry(
            errors=TRANSIENT_ENDPOINT_ERRORS, interval=Duration.seconds(1), max_attempts=3, backoff_rate=2
        )
        filter_low = self._invoke("Filter low confidence", self.filter)
        if review_queue is None:
            filter_low.add_catch(
                sfn.Fail(self, "Low confidence", error_path="$.Error", cause_path="$.Cause"),
                errors=[LOW_CONFIDENCE_ERROR],
            )
        else:
            filter_low.add_catch(
                self._ask_a_reviewer(config, review_queue), errors=[LOW_CONFIDENCE_ERROR], result_path="$.error"
            )
        return serialize.next(classify).next(filter_low).next(sfn.Succeed(self, "Confident"))

    def _ask_a_reviewer(self, config: SconesConfig, queue: sqs.IQueue) -> sfn.IChainable:
        """Send the uncertain answer to the review queue and wait for a reviewer's SendTaskSuccess (the answer,
        which becomes the execution's output) or SendTaskFailure (NotAVehicle)."""
        heartbeat = config.review_heartbeat_seconds
        ask = tasks.SqsSendMessage(
            self,
            "Ask a reviewer",
            queue=queue,
            integration_pattern=sfn.IntegrationPattern.WAIT_FOR_TASK_TOKEN,
            message_body=sfn.TaskInput.from_object(
                {
                    "task_token": sfn.JsonPath.task_token,
                    "execution_arn": sfn.JsonPath.execution_id,
                    "requested_at": sfn.JsonPath.string_at("$$.State.EnteredTime"),
                    "s3_bucket": sfn.JsonPath.string_at("$.s3_bucket"),
                    "s3_key": sfn.JsonPath.string_at("$.s3_key"),
                    "inferences": sfn.JsonPath.list_at("$.inferences"),
                    "reason": sfn.JsonPath.string_at("$.error.Cause"),
                }
            ),
            task_timeout=sfn.Timeout.duration(Duration.seconds(config.review_timeout_seconds)),
            heartbeat_timeout=sfn.Timeout.duration(Duration.seconds(heartbeat)) if heartbeat else None,
        )
        ask.add_catch(
            sfn.Fail(self, "Not a vehicle", error_path="$.Error", cause_path="$.Cause"), errors=[NOT_A_VEHICLE_ERROR]
        )
        ask.add_catch(
            sfn.Fail(
                self,
                "Review timed out",
                error=REVIEW_TIMED_OUT_ERROR,
                cause=f"No reviewer answered within the review timeout ({config.review_timeout_hours:g} hours"
                + (f", or within the {config.review_heartbeat_hours:g}-hour heartbeat" if heartbeat else "")
                + "); add reviewers (docs/deploying.md), or lengthen the wait with -c review_timeout_hours"
                + (" and -c review_heartbeat_hours" if heartbeat else "")
                + ".",
            ),
            errors=[sfn.Errors.TIMEOUT, sfn.Errors.HEARTBEAT_TIMEOUT],
        )
        return ask.next(sfn.Succeed(self, "Reviewed"))

    def _batch_definition(self, bucket: s3.IBucket, config: SconesConfig) -> sfn.IChainable:
        """Start the classification once per image under `$.prefix`, as child executions.

        Each image's outcome (status and inferences, or the error) goes to result files under
        `batch_results/` rather than into the execution's output, which could not hold millions of them.
        A child that ran and failed (low confidence, not an image) is an outcome, recorded like a success;
        an image whose classification could not run at all (its start still refused after retries, denied,
        timed out) fails its item, and more than `batch_tolerated_failure_percent` of those fail the batch.
        """
        classify_one = tasks.StepFunctionsStartExecution(
            self,
            "Classify one image",
            state_machine=self.state_machine,
            integration_pattern=sfn.IntegrationPattern.RUN_JOB,
            associate_with_parent=True,
            input=sfn.TaskInput.from_object(
                {"s3_bucket": bucket.bucket_name, "s3_key": sfn.JsonPath.string_at("$.Key")}
            ),
            result_selector={
                "status": sfn.JsonPath.string_at("$.Status"),
                "class": sfn.JsonPath.string_at("$.Output.class"),
                "inferences": sfn.JsonPath.list_at("$.Output.inferences"),
            },
            result_path="$.outcome",
        )
        classify_one.add_retry(
            errors=START_TRANSIENT_ERRORS,
            interval=Duration.seconds(2),
            max_attempts=5,
            backoff_rate=2,
            jitter_strategy=sfn.JitterType.FULL,
        )
        classify_one.add_catch(sfn.Pass(self, "Record failure"), errors=[CHILD_FAILED_ERROR], result_path="$.outcome")
        is_image = sfn.Condition.or_(
            *(sfn.Condition.string_matches("$.Key", f"*{suffix}") for suffix in IMAGE_SUFFIXES)
        )
        skip = sfn.Pass(self, "Skip non-image", parameters={"s3_key": sfn.JsonPath.string_at("$.Key"), "skipped": True})
        each = sfn.Choice(self, "Is an image").when(is_image, classify_one).otherwise(skip)
        every_image = sfn.DistributedMap(
            self,
            "Every image under the prefix",
            item_reader=sfn.S3ObjectsItemReader(bucket=bucket, prefix=sfn.JsonPath.string_at("$.prefix")),
            item_selector={"Key": sfn.JsonPath.string_at("$$.Map.Item.Value.Key")},
            max_concurrency=40,
            tolerated_failure_percentage=config.batch_tolerated_failure_percent,
            result_writer_v2=PrefixResultWriter(bucket, BATCH_RESULTS_PREFIX),
            label="ClassifyPrefix",
        )
        every_image.item_processor(each)
        return every_image
