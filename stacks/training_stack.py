"""The SageMaker training job, run by a state machine that gates the model it produced and registers it."""

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
from stacks.registry import ModelRegistry, metric_definitions
from training import photos, sourcedir

MODEL_PREFIX = "models/"
LABELS_PREFIX = "labels/"
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
            # The test images train.py measures the gate's figures on (the built-in algorithm takes no test channel).
            channels += [
                self._channel("test", bucket, "test", config),
                self._channel("test_lst", bucket, "test.lst", config),
                # Reviewed photos, <class>/<photo>: train.py checks, splits and learns them beside the staged data.
                self._channel("labels", bucket, LABELS_PREFIX, config),
            ]
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
                metric_definitions=metric_definitions(algorithm),
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
        definition = sfn.Chain.start(train)
        if algorithm == "pytorch":
            # SageMaker refuses a channel without objects: keep one under labels/ (training/photos.py skips it).
            marker = f"{LABELS_PREFIX}{photos.MARKER}"
            keep_labels_channel = tasks.CallAwsService(
                self,
                "KeepLabelsChannel",
                service="s3",
                action="putObject",
                parameters={
                    "Bucket": bucket.bucket_name,
                    "Key": marker,
                    "Body": "Reviewed photos land here as <class>/<photo>; each training learns them.",
                },
                iam_action="s3:PutObject",
                iam_resources=[bucket.arn_for_objects(marker)],
                result_path=sfn.JsonPath.DISCARD,
            )
            definition = keep_labels_channel.next(train)
        self.registry = ModelRegistry(self, "Registry", config=config)
        gate_and_register = self.registry.gate_and_register(
            self,
            algorithm=algorithm,
            inference_image=image_uri(self, algorithm, "inference"),
            done=sfn.Succeed(self, "Trained"),
        )
        self.workflow = LoggedStateMachine(
            self,
            "Training",
            config=config,
            name="training",
            definition=definition.next(create_model).next(gate_and_register),
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
                    "rule of the .sync integration; job and model names are generated per execution; the "
                    "package registered is a new version of this environment's group (model-package/<group>/*).",
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
            "ModelPackageGroupName",
            value=config.model_package_group_name,
            description="The model registry: each training that passes the evaluation gate registers a package "
            "here; approve one (SageMaker console, or python -m training.fit approve --latest) to serve it.",
        )
        CfnOutput(
            self,
            "ModelParameterName",
            value=config.model_parameter_name,
            description="The SSM parameter holding the approved model's S3 URL, which the endpoint serves.",
        )
        CfnOutput(
            self,
            "ModelPackageArnParameterName",
            value=config.model_package_parameter_name,
            description="The SSM parameter holding the ARN of the approved model package the endpoint serves.",
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
