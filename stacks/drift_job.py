"""The hourly drift job: a SageMaker processing job, started by a state machine on a schedule, that checks the
endpoint's captures of the hour that ended against the model's baseline and publishes the violations."""

import re
import shutil
from pathlib import Path

import jsii
from aws_cdk import (
    Annotations,
    ArnFormat,
    Aws,
    BundlingOptions,
    DockerImage,
    Duration,
    ILocalBundling,
    Stack,
    aws_events as events,
    aws_events_targets as targets,
    aws_iam as iam,
    aws_kms as kms,
    aws_s3 as s3,
    aws_s3_assets as s3_assets,
    aws_stepfunctions as sfn,
)
from cdk_nag import NagSuppressions
from constructs import Construct

from stacks.config import SconesConfig
from stacks.constructs import LoggedStateMachine
from stacks.data_stack import CAPTURE_PREFIX
from stacks.images import image_uri, repository_arn

# The drift job. The baseline of the deployed model is put at BASELINE_PREFIX by `python -m monitoring baseline
# ... --out s3://<bucket>/monitoring/baseline/` (README); each run writes its report under REPORTS_PREFIX.
MONITORING_PACKAGE = Path(__file__).resolve().parent.parent / "monitoring"
BASELINE_PREFIX = "monitoring/baseline/"
REPORTS_PREFIX = "monitoring/reports/"
# Ten minutes past every hour: the job checks the hour that just ended (the report's windows start on the hour),
# and SageMaker has had minutes to deliver that hour's last capture files.
DRIFT_SCHEDULE_MINUTE = "10"
DRIFT_INSTANCE_TYPE = "ml.t3.medium"  # 2 vCPUs, 4 GiB: an hour of captures is read at thousands of records/s
DRIFT_MAX_RUNTIME = Duration.minutes(40)  # a run ends well before the next one starts
PROCESSING_JOBS_LOG_GROUP = "/aws/sagemaker/ProcessingJobs"
CODE_DIR = "/opt/ml/processing/input/code"
BASELINE_DIR = "/opt/ml/processing/input/baseline"
REPORT_DIR = "/opt/ml/processing/report"


@jsii.implements(ILocalBundling)
class _PackageFolder:
    """Asset bundling without Docker: the folder is copied as a package (`monitoring/...` inside the zip), so
    that the zip itself can go on PYTHONPATH and `python -m monitoring` runs from it (zipimport)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def try_bundle(self, output_dir: str, *args, **options) -> bool:
        shutil.copytree(
            self.folder, Path(output_dir) / self.folder.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        return True


class DriftJob(Construct):
    """Every hour, the capture report of the hour that ended, run as a SageMaker processing job by a state
    machine, publishing its violations to CloudWatch in `metric_namespace` (`monitoring.metrics`).

    The report needs numpy, Pillow and matplotlib, which the workflow's Lambdas (boto3 and the standard library
    only) may not carry; SageMaker's PyTorch CPU training image has them, and the processing job runs the
    `monitoring` package from this repository in it, as an asset on PYTHONPATH.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: SconesConfig,
        bucket: s3.IBucket,
        capture_key: kms.IKey,
        metric_namespace: str,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        if config.capture_sampling_percentage == 0:
            Annotations.of(self).add_warning_v2(
                "scones:nothing-captured",
                "capture_sampling_percentage=0: the endpoint captures no request, "
                "so the hourly drift job will check nothing",
            )
        captures = f"{CAPTURE_PREFIX}{config.endpoint_name}/"
        package = s3_assets.Asset(
            self,
            "MonitoringPackage",
            path=str(MONITORING_PACKAGE),
            exclude=["__pycache__", "*.pyc"],
            bundling=BundlingOptions(
                image=DockerImage.from_registry("unused-local-bundling"), local=_PackageFolder(MONITORING_PACKAGE)
            ),
        )

        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
            description=f"scones drift job: read {captures} and the baseline, write reports, "
            f"put {metric_namespace} metrics",
        )
        statements = [
            iam.PolicyStatement(sid="PullImage", actions=["ecr:GetAuthorizationToken"], resources=["*"]),
            iam.PolicyStatement(
                sid="PullImageLayers",
                actions=["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
                resources=[repository_arn(stack, "pytorch", "training")],
            ),
            iam.PolicyStatement(
                sid="WriteJobLogs",
                actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                resources=[
                    stack.format_arn(
                        service="logs",
                        resource="log-group",
                        resource_name=f"{PROCESSING_JOBS_LOG_GROUP}:*",
                        arn_format=ArnFormat.COLON_RESOURCE_NAME,
                    )
                ],
            ),
            iam.PolicyStatement(
                sid="PutDriftMetrics",
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": metric_namespace}},
            ),
            iam.PolicyStatement(
                sid="ListCapturesAndBaseline",
                actions=["s3:ListBucket"],
                resources=[bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{captures}*", f"{BASELINE_PREFIX}*"]}},
            ),
            iam.PolicyStatement(
                sid="ReadCapturesAndBaseline",
                actions=["s3:GetObject"],
                resources=[bucket.arn_for_objects(f"{captures}*"), bucket.arn_for_objects(f"{BASELINE_PREFIX}*")],
            ),
            iam.PolicyStatement(
                sid="DecryptCaptures",
                actions=["kms:Decrypt"],
                resources=[capture_key.key_arn],
                conditions={"StringEquals": {"kms:ViaService": f"s3.{Aws.REGION}.amazonaws.com"}},
            ),
            iam.PolicyStatement(
                sid="WriteReports", actions=["s3:PutObject"], resources=[bucket.arn_for_objects(f"{REPORTS_PREFIX}*")]
            ),
            iam.PolicyStatement(
                sid="ListPackage",
                actions=["s3:ListBucket"],
                resources=[package.bucket.bucket_arn],
                conditions={"StringEquals": {"s3:prefix": package.s3_object_key}},
            ),
            iam.PolicyStatement(
                sid="ReadPackage",
                actions=["s3:GetObject"],
                resources=[package.bucket.arn_for_objects(package.s3_object_key)],
            ),
        ]
        for statement in statements:
            self.role.add_to_policy(statement)
        NagSuppressions.add_resource_suppressions(
            self.role,
            [
                {
                    "id": "AwsSolutions-IAM5",
                    "reason": "ecr:GetAuthorizationToken takes no resource and cloudwatch:PutMetricData none "
                    "either (it is "
                    "held to the metric namespace by a condition); SageMaker names the job's log streams at run "
                    "time; the S3 wildcards are the three key prefixes the job reads or writes: this endpoint's "
                    "captures, the baseline, the reports.",
                    "appliesTo": [
                        "Resource::*",
                        _nag_regex(
                            f"^Resource::arn:<AWS::Partition>:logs:.+:log-group:"
                            f"{re.escape(PROCESSING_JOBS_LOG_GROUP)}:\\*$"
                        ),
                        _nag_regex(
                            f"^Resource::.*/({re.escape(captures)}|{re.escape(BASELINE_PREFIX)}|"
                            f"{re.escape(REPORTS_PREFIX)})\\*$"
                        ),
                    ],
                }
            ],
            apply_to_children=True,
        )

        # The run's start time ends the checked hour: `--last 1h` reads the whole hour before it.
        started = sfn.JsonPath.string_at("$$.Execution.StartTime")
        self.job_name_prefix = f"{config.prefix}-drift-"
        run_report = sfn.CustomState(
            self,
            "Report on the last hour",
            state_json={
                "Type": "Task",
                "Resource": f"arn:{Aws.PARTITION}:states:::sagemaker:createProcessingJob.sync",
                "Parameters": {
                    "ProcessingJobName.$": sfn.JsonPath.format(f"{self.job_name_prefix}{{}}", sfn.JsonPath.uuid()),
                    "RoleArn": self.role.role_arn,
                    "AppSpecification": {
                        "ImageUri": image_uri(stack, "pytorch", "training"),
                        "ContainerEntrypoint": ["python3", "-m", "monitoring"],
                        "ContainerArguments.$": sfn.JsonPath.array(
                            "report",
                            bucket.s3_url_for_object(captures),
                            "--baseline",
                            BASELINE_DIR,
                            "--out",
                            REPORT_DIR,
                            "--last",
                            "1h",
                            "--until",
                            started,
                            "--publish-metrics",
                            metric_namespace,
                            "--endpoint-name",
                            config.endpoint_name,
                            "--allow-empty",
                            "--no-progress",
                        ),
                    },
                    "Environment": {
                        "PYTHONPATH": f"{CODE_DIR}/{package.s3_object_key}",
                        "AWS_DEFAULT_REGION": Aws.REGION,
                    },
                    "ProcessingInputs": [
                        _s3_input("code", package.s3_object_url, CODE_DIR),
                        _s3_input("baseline", bucket.s3_url_for_object(BASELINE_PREFIX), BASELINE_DIR),
                    ],
                    "ProcessingOutputConfig": {
                        "Outputs": [
                            {
                                "OutputName": "report",
                                "S3Output": {
                                    "S3Uri.$": sfn.JsonPath.format(
                                        bucket.s3_url_for_object(f"{REPORTS_PREFIX}{config.endpoint_name}/{{}}/"),
                                        started,
                                    ),
                                    "LocalPath": REPORT_DIR,
                                    "S3UploadMode": "EndOfJob",
                                },
                            }
                        ]
                    },
                    "ProcessingResources": {
                        "ClusterConfig": {"InstanceCount": 1, "InstanceType": DRIFT_INSTANCE_TYPE, "VolumeSizeInGB": 5}
                    },
                    "StoppingCondition": {"MaxRuntimeInSeconds": int(DRIFT_MAX_RUNTIME.to_seconds())},
                },
                "ResultSelector": {
                    "ProcessingJobName.$": "$.ProcessingJobName",
                    "ProcessingJobStatus.$": "$.ProcessingJobStatus",
                },
            },
        )
        run_report.add_retry(
            errors=["SageMaker.AmazonSageMakerException"], interval=Duration.seconds(30), max_attempts=3, backoff_rate=2
        )
        self.workflow = LoggedStateMachine(
            self,
            "Workflow",
            config=config,
            name="drift",
            definition=run_report,
            timeout=DRIFT_MAX_RUNTIME.plus(Duration.minutes(10)),
        )
        self.state_machine = self.workflow.state_machine
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=[
                    "sagemaker:CreateProcessingJob",
                    "sagemaker:DescribeProcessingJob",
                    "sagemaker:StopProcessingJob",
                ],
                resources=[
                    stack.format_arn(
                        service="sagemaker", resource="processing-job", resource_name=f"{self.job_name_prefix}*"
                    )
                ],
            )
        )
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                resources=[
                    stack.format_arn(
                        service="events",
                        resource="rule",
                        resource_name="StepFunctionsGetEventsForSageMakerProcessingJobsRule",
                    )
                ],
            )
        )
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=["iam:PassRole"],
                resources=[self.role.role_arn],
                conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
            )
        )
        NagSuppressions.add_resource_suppressions(
            self.workflow,
            [
                {
                    "id": "AwsSolutions-IAM5",
                    "reason": "X-Ray and CloudWatch Logs delivery actions take no resource; processing jobs are "
                    "named per "
                    "run (<prefix>-drift-<uuid>), so the job actions are granted on that name prefix.",
                    "appliesTo": [
                        "Resource::*",
                        _nag_regex(
                            f"^Resource::arn:<AWS::Partition>:sagemaker:.+:processing-job/"
                            f"{re.escape(self.job_name_prefix)}\\*$"
                        ),
                    ],
                }
            ],
            apply_to_children=True,
        )

        self.rule = events.Rule(
            self,
            "Hourly",
            rule_name=f"{config.prefix}-drift-hourly",
            description="Starts the drift job: the capture report of the hour that just ended.",
            schedule=events.Schedule.cron(minute=DRIFT_SCHEDULE_MINUTE),
            targets=[targets.SfnStateMachine(self.state_machine)],
        )


def _nag_regex(pattern: str) -> dict:
    """A cdk-nag `appliesTo` entry matching finding ids with a regular expression (a JavaScript literal)."""
    return {"regex": "/" + pattern.replace("/", "\\/") + "/"}


def _s3_input(name: str, uri: str, local_path: str) -> dict:
    return {
        "InputName": name,
        "S3Input": {
            "S3Uri": uri,
            "LocalPath": local_path,
            "S3DataType": "S3Prefix",
            "S3InputMode": "File",
            "S3DataDistributionType": "FullyReplicated",
        },
    }
