"""What a team needs to run the workflow: a dashboard, alarms that reach people through SNS, and the hourly
drift job that checks the endpoint's captures against the model's baseline and publishes the violations."""

import re
import shutil
from pathlib import Path

import jsii
from aws_cdk import ArnFormat, Aws, BundlingOptions, DockerImage, Duration, ILocalBundling, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_stepfunctions as sfn
from cdk_nag import NagSuppressions
from constructs import Construct

from monitoring import metrics as drift_metrics
from stacks.config import SconesConfig
from stacks.constructs import LoggedStateMachine
from stacks.data_stack import CAPTURE_PREFIX
from stacks.endpoint_stack import VARIANT_NAME
from stacks.images import image_uri, repository_arn

# The filter Lambda's Embedded Metric Format output (lambdas/filter_inferences/index.py).
METRIC_NAMESPACE = "Scones"
TOP_PROBABILITY = "TopProbability"
LOW_CONFIDENCE = "LowConfidence"
PREDICTIONS = "Predictions"
FIVE_MINUTES = Duration.minutes(5)
ONE_HOUR = Duration.hours(1)

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
        shutil.copytree(self.folder, Path(output_dir) / self.folder.name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return True


class DriftJob(Construct):
    """Every hour, the capture report of the hour that ended, run as a SageMaker processing job by a state
    machine, publishing its violations to CloudWatch (`monitoring.metrics`).

    The report needs numpy, Pillow and matplotlib, which the workflow's Lambdas (boto3 and the standard library
    only) may not carry; SageMaker's PyTorch CPU training image has them, and the processing job runs the
    `monitoring` package from this repository in it, as an asset on PYTHONPATH.
    """

    def __init__(self, scope: Construct, construct_id: str, *, config: SconesConfig, bucket: s3.IBucket,
                 capture_key: kms.IKey) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        captures = f"{CAPTURE_PREFIX}{config.endpoint_name}/"
        package = s3_assets.Asset(
            self, "MonitoringPackage", path=str(MONITORING_PACKAGE),
            exclude=["__pycache__", "*.pyc"],
            bundling=BundlingOptions(image=DockerImage.from_registry("unused-local-bundling"),
                                     local=_PackageFolder(MONITORING_PACKAGE)),
        )

        self.role = iam.Role(self, "Role", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
                             description=f"scones drift job: read {captures} and the baseline, write reports, "
                                         f"put {METRIC_NAMESPACE} metrics")
        statements = [
            iam.PolicyStatement(sid="PullImage", actions=["ecr:GetAuthorizationToken"], resources=["*"]),
            iam.PolicyStatement(
                sid="PullImageLayers",
                actions=["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
                resources=[repository_arn(stack, "pytorch", "training")]),
            iam.PolicyStatement(
                sid="WriteJobLogs",
                actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                resources=[stack.format_arn(service="logs", resource="log-group",
                                            resource_name=f"{PROCESSING_JOBS_LOG_GROUP}:*",
                                            arn_format=ArnFormat.COLON_RESOURCE_NAME)]),
            iam.PolicyStatement(
                sid="PutDriftMetrics", actions=["cloudwatch:PutMetricData"], resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": METRIC_NAMESPACE}}),
            iam.PolicyStatement(
                sid="ListCapturesAndBaseline", actions=["s3:ListBucket"], resources=[bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{captures}*", f"{BASELINE_PREFIX}*"]}}),
            iam.PolicyStatement(
                sid="ReadCapturesAndBaseline", actions=["s3:GetObject"],
                resources=[bucket.arn_for_objects(f"{captures}*"), bucket.arn_for_objects(f"{BASELINE_PREFIX}*")]),
            iam.PolicyStatement(sid="DecryptCaptures", actions=["kms:Decrypt"], resources=[capture_key.key_arn],
                                conditions={"StringEquals": {"kms:ViaService": f"s3.{Aws.REGION}.amazonaws.com"}}),
            iam.PolicyStatement(sid="WriteReports", actions=["s3:PutObject"],
                                resources=[bucket.arn_for_objects(f"{REPORTS_PREFIX}*")]),
            iam.PolicyStatement(
                sid="ListPackage", actions=["s3:ListBucket"], resources=[package.bucket.bucket_arn],
                conditions={"StringEquals": {"s3:prefix": package.s3_object_key}}),
            iam.PolicyStatement(sid="ReadPackage", actions=["s3:GetObject"],
                                resources=[package.bucket.arn_for_objects(package.s3_object_key)]),
        ]
        for statement in statements:
            self.role.add_to_policy(statement)
        NagSuppressions.add_resource_suppressions(self.role, [{
            "id": "AwsSolutions-IAM5",
            "reason": "ecr:GetAuthorizationToken takes no resource and cloudwatch:PutMetricData none either (it is "
                      "held to the Scones namespace by a condition); SageMaker names the job's log streams at run time; the S3 wildcards "
                      "are the three key prefixes the job reads or writes: this endpoint's captures, the baseline, "
                      "the reports.",
            "appliesTo": [
                "Resource::*",
                _nag_regex(f"^Resource::arn:<AWS::Partition>:logs:.+:log-group:"
                           f"{re.escape(PROCESSING_JOBS_LOG_GROUP)}:\\*$"),
                _nag_regex(f"^Resource::.*/({re.escape(captures)}|{re.escape(BASELINE_PREFIX)}|"
                           f"{re.escape(REPORTS_PREFIX)})\\*$"),
            ],
        }], apply_to_children=True)

        # The run's start time ends the checked hour: `--last 1h` reads the whole hour before it.
        started = sfn.JsonPath.string_at("$$.Execution.StartTime")
        self.job_name_prefix = f"{config.prefix}-drift-"
        run_report = sfn.CustomState(self, "Report on the last hour", state_json={
            "Type": "Task",
            "Resource": f"arn:{Aws.PARTITION}:states:::sagemaker:createProcessingJob.sync",
            "Parameters": {
                "ProcessingJobName.$": sfn.JsonPath.format(f"{self.job_name_prefix}{{}}", sfn.JsonPath.uuid()),
                "RoleArn": self.role.role_arn,
                "AppSpecification": {
                    "ImageUri": image_uri(stack, "pytorch", "training"),
                    "ContainerEntrypoint": ["python3", "-m", "monitoring"],
                    "ContainerArguments.$": sfn.JsonPath.array(
                        "report", bucket.s3_url_for_object(captures), "--baseline", BASELINE_DIR, "--out", REPORT_DIR,
                        "--last", "1h", "--until", started, "--publish-metrics", METRIC_NAMESPACE,
                        "--endpoint-name", config.endpoint_name, "--allow-empty", "--no-progress"),
                },
                "Environment": {"PYTHONPATH": f"{CODE_DIR}/{package.s3_object_key}",
                                "AWS_DEFAULT_REGION": Aws.REGION},
                "ProcessingInputs": [
                    _s3_input("code", package.s3_object_url, CODE_DIR),
                    _s3_input("baseline", bucket.s3_url_for_object(BASELINE_PREFIX), BASELINE_DIR),
                ],
                "ProcessingOutputConfig": {"Outputs": [{
                    "OutputName": "report",
                    "S3Output": {
                        "S3Uri.$": sfn.JsonPath.format(
                            bucket.s3_url_for_object(f"{REPORTS_PREFIX}{config.endpoint_name}/{{}}/"), started),
                        "LocalPath": REPORT_DIR,
                        "S3UploadMode": "EndOfJob",
                    },
                }]},
                "ProcessingResources": {"ClusterConfig": {
                    "InstanceCount": 1, "InstanceType": DRIFT_INSTANCE_TYPE, "VolumeSizeInGB": 5}},
                "StoppingCondition": {"MaxRuntimeInSeconds": int(DRIFT_MAX_RUNTIME.to_seconds())},
            },
            "ResultSelector": {"ProcessingJobName.$": "$.ProcessingJobName",
                               "ProcessingJobStatus.$": "$.ProcessingJobStatus"},
        })
        run_report.add_retry(errors=["SageMaker.AmazonSageMakerException"], interval=Duration.seconds(30),
                             max_attempts=3, backoff_rate=2)
        self.workflow = LoggedStateMachine(self, "Workflow", config=config, name="drift", definition=run_report,
                                           timeout=DRIFT_MAX_RUNTIME.plus(Duration.minutes(10)))
        self.state_machine = self.workflow.state_machine
        self.state_machine.add_to_role_policy(iam.PolicyStatement(
            actions=["sagemaker:CreateProcessingJob", "sagemaker:DescribeProcessingJob",
                     "sagemaker:StopProcessingJob"],
            resources=[stack.format_arn(service="sagemaker", resource="processing-job",
                                        resource_name=f"{self.job_name_prefix}*")]))
        self.state_machine.add_to_role_policy(iam.PolicyStatement(
            actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
            resources=[stack.format_arn(service="events", resource="rule",
                                        resource_name="StepFunctionsGetEventsForSageMakerProcessingJobsRule")]))
        self.state_machine.add_to_role_policy(iam.PolicyStatement(
            actions=["iam:PassRole"], resources=[self.role.role_arn],
            conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}))
        NagSuppressions.add_resource_suppressions(self.workflow, [{
            "id": "AwsSolutions-IAM5",
            "reason": "X-Ray and CloudWatch Logs delivery actions take no resource; processing jobs are named per "
                      "run (<prefix>-drift-<uuid>), so the job actions are granted on that name prefix.",
            "appliesTo": ["Resource::*",
                          _nag_regex(f"^Resource::arn:<AWS::Partition>:sagemaker:.+:processing-job/"
                                     f"{re.escape(self.job_name_prefix)}\\*$")],
        }], apply_to_children=True)

        self.rule = events.Rule(
            self, "Hourly", rule_name=f"{config.prefix}-drift-hourly",
            description="Starts the drift job: the capture report of the hour that just ended.",
            schedule=events.Schedule.cron(minute=DRIFT_SCHEDULE_MINUTE),
            targets=[targets.SfnStateMachine(self.state_machine)])


def _nag_regex(pattern: str) -> dict:
    """A cdk-nag `appliesTo` entry matching finding ids with a regular expression (a JavaScript literal)."""
    return {"regex": "/" + pattern.replace("/", "\\/") + "/"}


def _s3_input(name: str, uri: str, local_path: str) -> dict:
    return {"InputName": name, "S3Input": {"S3Uri": uri, "LocalPath": local_path, "S3DataType": "S3Prefix",
                                           "S3InputMode": "File", "S3DataDistributionType": "FullyReplicated"}}


class MonitoringStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, config: SconesConfig,
                 state_machine: sfn.IStateMachine, state_machine_log_group_name: str,
                 functions: list[lambda_.IFunction], bucket: s3.IBucket, capture_key: kms.IKey,
                 **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        endpoint = {"EndpointName": config.endpoint_name, "VariantName": VARIANT_NAME}
        by_endpoint = {"EndpointName": config.endpoint_name}

        def endpoint_metric(name: str, statistic: str = "Sum", namespace: str = "AWS/SageMaker"):
            return cloudwatch.Metric(namespace=namespace, metric_name=name, dimensions_map=endpoint,
                                     statistic=statistic, period=FIVE_MINUTES)

        def scones_metric(name: str, statistic: str = "Sum", **dimensions: str):
            return cloudwatch.Metric(namespace=METRIC_NAMESPACE, metric_name=name, statistic=statistic,
                                     dimensions_map={**by_endpoint, **dimensions}, period=FIVE_MINUTES)

        invocations = endpoint_metric("Invocations")
        errors_5xx = endpoint_metric("Invocation5XXErrors")
        started = state_machine.metric_started(period=FIVE_MINUTES)
        failed = state_machine.metric_failed(period=FIVE_MINUTES)
        low_confidence = scones_metric(LOW_CONFIDENCE)
        answered = scones_metric(TOP_PROBABILITY, statistic="SampleCount")

        key = kms.Key(self, "AlarmTopicKey", description="scones alarm topic", enable_key_rotation=True,
                      removal_policy=config.removal)
        key.grant(iam.ServicePrincipal("cloudwatch.amazonaws.com"), "kms:Decrypt", "kms:GenerateDataKey*")
        self.topic = sns.Topic(self, "Alarms", display_name=f"{config.prefix} alarms", master_key=key,
                               enforce_ssl=True)
        if config.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(config.alarm_email))

        self.drift = DriftJob(self, "Drift", config=config, bucket=bucket, capture_key=capture_key)
        drift_violations = scones_metric(drift_metrics.VIOLATIONS, "Maximum").with_(period=ONE_HOUR)
        drift_failed = self.drift.state_machine.metric_failed(period=ONE_HOUR)
        drift_timed_out = self.drift.state_machine.metric_timed_out(period=ONE_HOUR)

        self.alarms = [
            cloudwatch.MathExpression(
                expression="IF(started > 0, 100 * (failed - lowconfidence) / started, 0)",
                using_metrics={"started": started, "failed": failed, "lowconfidence": low_confidence},
                label="executions failed for reasons other than low confidence (%)", period=FIVE_MINUTES,
            ).create_alarm(
                self, "ExecutionFailureRate", alarm_name=f"{config.prefix}-execution-failure-rate",
                alarm_description="More than 5% of classification executions failed for a reason other than "
                                  "low confidence (missing or bad images, endpoint errors after retries).",
                threshold=5, evaluation_periods=2, datapoints_to_alarm=2,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING),
            errors_5xx.create_alarm(
                self, "Endpoint5xx", alarm_name=f"{config.prefix}-endpoint-5xx",
                alarm_description="The endpoint answered 5xx errors in two of the last three 5-minute periods.",
                threshold=1, evaluation_periods=3, datapoints_to_alarm=2,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING),
            cloudwatch.MathExpression(
                expression="IF(answered > 0, 100 * lowconfidence / answered, 0)",
                using_metrics={"answered": answered, "lowconfidence": low_confidence},
                label="answers below the threshold (%)", period=Duration.hours(1),
            ).create_alarm(
                self, "LowConfidenceRate", alarm_name=f"{config.prefix}-low-confidence-rate",
                alarm_description=f"Over an hour, more than {config.low_confidence_alarm_percent}% of answers "
                                  f"were below the threshold {config.threshold}: the cheapest sign that the "
                                  "images drifted from what the model was trained on.",
                threshold=config.low_confidence_alarm_percent, evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING),
            drift_violations.create_alarm(
                self, "DriftViolations", alarm_name=f"{config.prefix}-drift-violations",
                alarm_description="The hourly capture report found a violation: the last hour's images or answers "
                                  "drifted from the model's baseline. Its report (which check, which numbers) is "
                                  f"under s3://<bucket>/{REPORTS_PREFIX}{config.endpoint_name}/.",
                threshold=1, evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING),
            cloudwatch.MathExpression(
                expression="failed + timedout", using_metrics={"failed": drift_failed, "timedout": drift_timed_out},
                label="drift job runs failed or timed out", period=ONE_HOUR,
            ).create_alarm(
                self, "DriftJobFailed", alarm_name=f"{config.prefix}-drift-job-failed",
                alarm_description="The hourly drift job failed or timed out (no baseline under "
                                  f"{BASELINE_PREFIX}, an image pull or S3 error): drift is not being checked.",
                threshold=1, evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING),
        ]
        if config.expect_traffic:
            self.alarms.append(endpoint_metric("Invocations").with_(period=Duration.hours(1)).create_alarm(
                self, "NoInvocations", alarm_name=f"{config.prefix}-no-invocations",
                alarm_description="The endpoint served no request for an hour while traffic is expected.",
                threshold=1, evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.BREACHING))
        for alarm in self.alarms:
            alarm.add_alarm_action(actions.SnsAction(self.topic))
            alarm.add_ok_action(actions.SnsAction(self.topic))

        dashboard = cloudwatch.Dashboard(self, "Dashboard", dashboard_name=config.prefix,
                                         default_interval=Duration.hours(6))
        dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(title="Alarms", alarms=self.alarms, width=24, height=3))
        dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Endpoint invocations and errors", width=8, left=[
                invocations, endpoint_metric("Invocation4XXErrors"), errors_5xx]),
            cloudwatch.GraphWidget(title="Endpoint latency (µs)", width=8, left=[
                endpoint_metric("ModelLatency", "p50"), endpoint_metric("ModelLatency", "p99"),
                endpoint_metric("OverheadLatency", "p50")]),
            cloudwatch.GraphWidget(title="Endpoint instances (%)", width=8, left=[
                endpoint_metric(name, "Average", "/aws/sagemaker/Endpoints")
                for name in ("CPUUtilization", "MemoryUtilization", "DiskUtilization")]),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Classification executions", width=8, left=[
                started, state_machine.metric_succeeded(period=FIVE_MINUTES), failed,
                state_machine.metric_timed_out(period=FIVE_MINUTES)]),
            cloudwatch.LogQueryWidget(
                title="Failed executions by error", width=8, log_group_names=[state_machine_log_group_name],
                query_lines=['filter type = "ExecutionFailed"', "stats count(*) as executions by details.error"]),
            cloudwatch.GraphWidget(title="Lambda errors and duration (p99, ms)", width=8,
                                   left=[function.metric_errors(period=FIVE_MINUTES) for function in functions],
                                   right=[function.metric_duration(period=FIVE_MINUTES, statistic="p99")
                                          for function in functions]),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Confidence: top probability", width=8, left=[
                scones_metric(TOP_PROBABILITY, "Average"), scones_metric(TOP_PROBABILITY, "p10")],
                left_y_axis=cloudwatch.YAxisProps(min=0, max=1)),
            cloudwatch.GraphWidget(title="Low-confidence answers", width=8, left=[low_confidence, answered]),
            cloudwatch.GraphWidget(title="Predicted class mix", width=8, stacked=True, left=[
                scones_metric(PREDICTIONS, PredictedClass=str(label)).with_(label=name)
                for label, name in enumerate(config.classes)]),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Drift: violations of the hourly capture report", width=16, stacked=True,
                left=[scones_metric(drift_metrics.VIOLATIONS, "Maximum", CheckType=check_type).with_(
                    period=ONE_HOUR, label=check_type) for check_type in drift_metrics.CHECK_TYPES],
                right=[scones_metric(drift_metrics.CHECKED_RECORDS, "Maximum").with_(
                    period=ONE_HOUR, label="records checked")]),
            cloudwatch.GraphWidget(title="Drift job runs", width=8, left=[
                self.drift.state_machine.metric_succeeded(period=ONE_HOUR), drift_failed, drift_timed_out]),
        )
        self.dashboard = dashboard
