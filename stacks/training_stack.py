"""The SageMaker training job, run by a state machine that also registers the model it produced."""

from pathlib import Path

import jsii
from aws_cdk import (
    Aws,
    CfnOutput,
    Duration,
    Size,
    Stack,
    Stage,
    aws_ec2 as ec2,
    aws_s3 as s3,
    aws_s3_assets as s3_assets,
    aws_stepfunctions as sfn,
    aws_stepfunctions_tasks as tasks,
)
from cdk_nag import NagSuppressions
from constructs import Construct

from stacks.config import SconesConfig
from stacks.constructs import LoggedStateMachine, SageMakerRole
from stacks.images import image_uri, repository_arn
from training import sourcedir

MODEL_PREFIX = "models/"
# train.py prints the calibrated threshold as `scones-threshold=<value>`; SageMaker reads it into the job's
# FinalMetricDataList under this name, from which the state machine records it beside the model.
THRESHOLD_METRIC = "threshold"
THRESHOLD_METRIC_REGEX = r"scones-threshold=([0-9.eE+-]+)"
# What the aws-sdk integration raises when the parameter to delete does not exist: AWS names the service Ssm,
# moto's engine (the tests run this definition on it) ssm. Error names are case-sensitive.
PARAMETER_NOT_FOUND_ERRORS = ["Ssm.ParameterNotFoundException", "ssm.ParameterNotFoundException"]
# Where SageMaker puts the `code` channel; the PyTorch container's toolkit extracts the source archive found
# there (`sagemaker_submit_directory`) and runs `sagemaker_program` from it.
CODE_CHANNEL_DIR = "/opt/ml/input/data/code"


class S3Uri(tasks.S3Location):
    """An S3 location rendered as `s3://bucket/key`.

    `tasks.S3Location.from_bucket` renders an https URL, which SageMaker has been seen to misread
    as a bucket named after the host; this keeps the same grants and renders the URI SageMaker documents.
    """

    def __init__(self, bucket: s3.IBucket, key: str) -> None:
        super().__init__()
        self.bucket = bucket
        self.key = key

    @jsii.member(jsii_name="bind")
    def bind(self, task, *, for_reading=None, for_writing=None) -> tasks.S3LocationConfig:
        if for_reading:
            self.bucket.grant_read(task, f"{self.key}*")
        if for_writing:
            self.bucket.grant_write(task, f"{self.key}*")
        return tasks.S3LocationConfig(uri=self.bucket.s3_url_for_object(self.key))


class TrainingStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, config: SconesConfig, bucket: s3.IBucket, **kwargs
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        algorithm = config.training_algorithm
        self.role = SageMakerRole(
            self,
            "SageMakerRole",
            description="scones training jobs and the models they produce",
            repository_arns=list(
                dict.fromkeys(repository_arn(self, algorithm, purpose) for purpose in ("training", "inference"))
            ),
        ).role

        # A folder asset would arrive as a zip, which the container does not extract: ship SageMaker's tar.gz.
        archive = sourcedir.pack(Path(Stage.of(self).outdir) / "training-sourcedir.tar.gz")
        script = s3_assets.Asset(self, "TrainingScript", path=str(archive))
        script.grant_read(self.role)

        image = tasks.DockerImage.from_registry(image_uri(self, algorithm, "training"))
        hyperparameters = dict(config.hyperparameters)
        channels = [
            self._channel("train", bucket, "train", config),
            self._channel("validation", bucket, "train", config),
            self._channel("train_lst", bucket, "train.lst", config),
            self._channel("validation_lst", bucket, "validation.lst", config),
        ]
        if algorithm == "pytorch":
            channels.append(
                tasks.Channel(
                    channel_name="code",
                    data_source=tasks.DataSource(
                        s3_data_source=tasks.S3DataSource(
                            s3_location=S3Uri(script.bucket, script.s3_object_key),
                            s3_data_type=tasks.S3DataType.S3_PREFIX,
                        )
                    ),
                )
            )
            archive_name = script.s3_object_key.rsplit("/", 1)[-1]
            hyperparameters.update(
                sagemaker_program=sourcedir.ENTRY_POINT,
                sagemaker_submit_directory=f"{CODE_CHANNEL_DIR}/{archive_name}",
                sagemaker_region=Aws.REGION,
            )

        train = tasks.SageMakerCreateTrainingJob(
            self,
            "Train",
            integration_pattern=sfn.IntegrationPattern.RUN_JOB,
            training_job_name=sfn.JsonPath.format(f"{config.prefix}-{{}}", sfn.JsonPath.uuid()),
            role=self.role,
            algorithm_specification=tasks.AlgorithmSpecification(
                training_image=image,
                training_input_mode=tasks.InputMode.FILE,
                # The built-in algorithm reports its own metrics only; it has no calibrated threshold.
                metric_definitions=[tasks.MetricDefinition(name=THRESHOLD_METRIC, regex=THRESHOLD_METRIC_REGEX)]
                if algorithm == "pytorch"
                else None,
            ),
            input_data_config=channels,
            output_data_config=tasks.OutputDataConfig(s3_output_location=S3Uri(bucket, MODEL_PREFIX)),
            resource_config=tasks.ResourceConfig(
                instance_count=1,
                instance_type=ec2.InstanceType(config.training_instance_type.removeprefix("ml.")),
                volume_size=Size.gibibytes(30),
            ),
            stopping_condition=tasks.StoppingCondition(
                max_runtime=Duration.minutes(config.training_max_runtime_minutes),
            ),
            hyperparameters=hyperparameters,
        )
        train.add_retry(
            errors=["SageMaker.AmazonSageMakerException"], interval=Duration.seconds(30), max_attempts=3, backoff_rate=2
        )

        create_model = tasks.SageMakerCreateModel(
            self,
            "CreateModel",
            model_name=sfn.JsonPath.string_at("$.TrainingJobName"),
            role=self.role,
            primary_container=tasks.ContainerDefinition(
                image=tasks.DockerImage.from_registry(image_uri(self, algorithm, "inference")),
                model_s3_location=tasks.S3Location.from_json_expression("$.ModelArtifacts.S3ModelArtifacts"),
            ),
            result_path="$.Model",
        )
        self.model_parameter_arn = self.format_arn(
            service="ssm",
            resource="parameter",
            resource_name=config.model_parameter_name.lstrip("/"),
        )
        record_model = tasks.CallAwsService(
            self,
            "RecordModel",
            service="ssm",
            action="putParameter",
            parameters={
                "Name": config.model_parameter_name,
                "Value": sfn.JsonPath.string_at("$.ModelArtifacts.S3ModelArtifacts"),
                "Type": "String",
                "Overwrite": True,
            },
            iam_resources=[self.model_parameter_arn],
            result_path=sfn.JsonPath.DISCARD,
        )
        trained = sfn.Succeed(self, "Trained", output_path="$.ModelArtifacts")
        self.workflow = LoggedStateMachine(
            self,
            "Training",
            config=config,
            name="training",
            definition=train.next(create_model).next(record_model).next(self._record_threshold(config, trained)),
            timeout=Duration.minutes(config.training_max_runtime_minutes + 30),
        )
        self.state_machine = self.workflow.state_machine
        NagSuppressions.add_resource_suppressions(
            self.state_machine,
            [
                {
                    "id": "AwsSolutions-IAM5",
                    "reason": "CDK's SageMaker tasks grant sagemaker:*TrainingJob on training-job/<prefix>* and "
                    "the events "
                    "rule of the .sync integration; job and model names are generated per execution.",
                }
            ],
            apply_to_children=True,
        )

        CfnOutput(
            self,
            "TrainingStateMachineArn",
            value=self.state_machine.state_machine_arn,
            description="Trains a model on the staged data and records it: start it with {} "
            "(or python -m training.fit --sagemaker).",
        )
        CfnOutput(
            self,
            "ModelParameterName",
            value=config.model_parameter_name,
            description="The SSM parameter holding the newest model's S3 URL, which the endpoint serves.",
        )

    def _record_threshold(self, config: SconesConfig, trained: sfn.State) -> sfn.IChainable:
        """Record the job's `threshold` metric in SSM beside the model URL, or delete a previous model's.

        The filter applies the recorded threshold; without one (the built-in algorithm) it applies the
        default, not the threshold of a model that is no longer the newest.
        """
        self.threshold_parameter_arn = self.format_arn(
            service="ssm", resource="parameter", resource_name=config.threshold_parameter_name.lstrip("/")
        )
        record = tasks.CallAwsService(
            self,
            "RecordThreshold",
            service="ssm",
            action="putParameter",
            parameters={
                "Name": config.threshold_parameter_name,
                "Value": sfn.JsonPath.json_to_string(sfn.JsonPath.number_at("$.Value")),
                "Type": "String",
                "Overwrite": True,
            },
            iam_resources=[self.threshold_parameter_arn],
            result_path=sfn.JsonPath.DISCARD,
        )
        forget = tasks.CallAwsService(
            self,
            "ForgetThreshold",
            service="ssm",
            action="deleteParameter",
            parameters={"Name": config.threshold_parameter_name},
            iam_resources=[self.threshold_parameter_arn],
            result_path=sfn.JsonPath.DISCARD,
        )
        forget.add_catch(trained, errors=PARAMETER_NOT_FOUND_ERRORS, result_path=sfn.JsonPath.DISCARD)
        forget.next(trained)
        # Each metric in turn, recording the threshold when it is one, then forgetting any older one if none was.
        # Not a JSONPath filter ([?(@.MetricName == ...)]): one that matches nothing fails the state on moto's
        # engine, and AWS documents no answer for that case.
        is_threshold = sfn.Condition.string_equals("$.MetricName", THRESHOLD_METRIC)
        each_metric = sfn.Map(self, "EachMetric", items_path="$.FinalMetricDataList", result_path="$.Recorded")
        each_metric.item_processor(
            sfn.Choice(self, "IsThreshold")
            .when(is_threshold, record.next(sfn.Pass(self, "Recorded", result=sfn.Result.from_boolean(True))))
            .otherwise(sfn.Pass(self, "OtherMetric", result=sfn.Result.from_boolean(False)))
        )
        any_recorded = sfn.Pass(
            self,
            "AnyRecorded",
            parameters={"Any.$": "States.ArrayContains($.Recorded, true)"},
            result_path="$.Recorded",
        )
        each_metric.next(any_recorded).next(
            sfn.Choice(self, "ThresholdRecorded")
            .when(sfn.Condition.boolean_equals("$.Recorded.Any", True), trained)
            .otherwise(forget)
        )
        return (
            sfn.Choice(self, "HasMetrics")
            .when(sfn.Condition.is_present("$.FinalMetricDataList"), each_metric)
            .otherwise(forget)
        )

    def _channel(self, name: str, bucket: s3.IBucket, key: str, config: SconesConfig) -> tasks.Channel:
        return tasks.Channel(
            channel_name=name,
            content_type="application/x-image" if config.training_algorithm == "builtin" else None,
            data_source=tasks.DataSource(
                s3_data_source=tasks.S3DataSource(
                    s3_location=S3Uri(bucket, key),
                    s3_data_type=tasks.S3DataType.S3_PREFIX,
                )
            ),
        )
