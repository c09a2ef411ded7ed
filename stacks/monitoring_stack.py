"""What a team needs to run the workflow: a dashboard, alarms that reach people through SNS, the hourly
drift job (stacks/drift_job.py) that checks the endpoint's captures against the model's baseline, and the
rules that start a retraining when drift is found (and, if configured, on a schedule or once enough reviewed labels
have accumulated); with the review on, the review queue's row and alarms."""

from aws_cdk import (
    Aws,
    CfnOutput,
    Duration,
    Stack,
    aws_cloudwatch as cloudwatch,
    aws_cloudwatch_actions as actions,
    aws_iam as iam,
    aws_kms as kms,
    aws_lambda as lambda_,
    aws_s3 as s3,
    aws_sns as sns,
    aws_sns_subscriptions as subscriptions,
    aws_stepfunctions as sfn,
)
from constructs import Construct

from monitoring import metrics as drift_metrics
from stacks import metrics
from stacks.config import SconesConfig
from stacks.drift_job import BASELINE_PREFIX, REPORTS_PREFIX, DriftJob
from stacks.endpoint_stack import ROLLBACK_PERIOD, rollback_alarm_names
from stacks.metrics import LOW_CONFIDENCE, PREDICTIONS, TOP_PROBABILITY
from stacks.retraining import retraining_rules
from stacks.review_stack import MAX_RECEIVES, ReviewStack
from stacks.workflow_stack import METRIC_NAMESPACE

FIVE_MINUTES = Duration.minutes(5)
ONE_HOUR = Duration.hours(1)


class MonitoringStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: SconesConfig,
        state_machine: sfn.IStateMachine,
        state_machine_log_group_name: str,
        training_state_machine: sfn.IStateMachine,
        functions: list[lambda_.IFunction],
        review: ReviewStack | None,
        bucket: s3.IBucket,
        capture_key: kms.IKey,
        **kwargs,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)

        def endpoint_metric(name: str, statistic: str = "Sum", namespace: str = "AWS/SageMaker"):
            return metrics.endpoint_metric(config, name, statistic, FIVE_MINUTES, namespace)

        def scones_metric(name: str, statistic: str = "Sum", **dimensions: str):
            return metrics.filter_metric(config, name, statistic, FIVE_MINUTES, **dimensions)

        invocations = endpoint_metric("Invocations")
        errors_5xx = endpoint_metric("Invocation5XXErrors")
        started = state_machine.metric_started(period=FIVE_MINUTES)
        failed = state_machine.metric_failed(period=FIVE_MINUTES)
        low_confidence = scones_metric(LOW_CONFIDENCE)
        answered = scones_metric(TOP_PROBABILITY, statistic="SampleCount")

        key = kms.Key(
            self,
            "AlarmTopicKey",
            description="scones alarm topic",
            enable_key_rotation=True,
            removal_policy=config.removal,
        )
        key.grant(iam.ServicePrincipal("cloudwatch.amazonaws.com"), "kms:Decrypt", "kms:GenerateDataKey*")
        self.topic = sns.Topic(self, "Alarms", display_name=f"{config.prefix} alarms", master_key=key, enforce_ssl=True)
        if config.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(config.alarm_email))

        self.drift = DriftJob(
            self, "Drift", config=config, bucket=bucket, capture_key=capture_key, metric_namespace=METRIC_NAMESPACE
        )
        drift_violations = scones_metric(drift_metrics.VIOLATIONS, "Maximum").with_(period=ONE_HOUR)
        drift_failed = self.drift.state_machine.metric_failed(period=ONE_HOUR)
        drift_timed_out = self.drift.state_machine.metric_timed_out(period=ONE_HOUR)

        self.drift_alarm = drift_violations.create_alarm(
            self,
            "DriftViolations",
            alarm_name=f"{config.prefix}-drift-violations",
            alarm_description="The hourly capture report found a violation: the last hour's images or answers "
            "drifted from the model's baseline; a retraining starts. Its report (which check, which numbers) is "
            f"under s3://<bucket>/{REPORTS_PREFIX}{config.endpoint_name}/.",
            threshold=1,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.alarms = [
            self._failure_rate(config, started, failed, low_confidence).create_alarm(
                self,
                "ExecutionFailureRate",
                alarm_name=f"{config.prefix}-execution-failure-rate",
                alarm_description="More than 5% of classification executions failed for a reason other than "
                "an uncertain answer or a reviewer's 'neither' (missing or bad images, endpoint errors after "
                "retries, reviews timed out).",
                threshold=5,
                evaluation_periods=2,
                datapoints_to_alarm=2,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            errors_5xx.create_alarm(
                self,
                "Endpoint5xx",
                alarm_name=f"{config.prefix}-endpoint-5xx",
                alarm_description="The endpoint answered 5xx errors in two of the last three 5-minute periods.",
                threshold=1,
                evaluation_periods=3,
                datapoints_to_alarm=2,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            metrics.low_confidence_rate(config, ONE_HOUR).create_alarm(
                self,
                "LowConfidenceRate",
                alarm_name=f"{config.prefix}-low-confidence-rate",
                alarm_description=f"Over an hour, more than {config.low_confidence_alarm_percent}% of answers "
                "were below the filter's threshold: the cheapest sign that the "
                "images drifted from what the model was trained on.",
                threshold=config.low_confidence_alarm_percent,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            self.drift_alarm,
            cloudwatch.MathExpression(
                expression="failed + timedout",
                using_metrics={"failed": drift_failed, "timedout": drift_timed_out},
                label="drift job runs failed or timed out",
                period=ONE_HOUR,
            ).create_alarm(
                self,
                "DriftJobFailed",
                alarm_name=f"{config.prefix}-drift-job-failed",
                alarm_description="The hourly drift job failed or timed out (no baseline under "
                f"{BASELINE_PREFIX}, an image pull or S3 error): drift is not being checked.",
                threshold=1,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
        ]
        if config.expect_traffic:
            self.alarms.append(
                endpoint_metric("Invocations")
                .with_(period=Duration.hours(1))
                .create_alarm(
                    self,
                    "NoInvocations",
                    alarm_name=f"{config.prefix}-no-invocations",
                    alarm_description="The endpoint served no request for an hour while traffic is expected.",
                    threshold=1,
                    evaluation_periods=1,
                    comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                    treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
                )
            )
        if review:
            self.alarms += self._review_alarms(config, review)
            functions = [*functions, review.intake, review.api_function]
        for alarm in self.alarms:
            alarm.add_alarm_action(actions.SnsAction(self.topic))
            alarm.add_ok_action(actions.SnsAction(self.topic))

        self.retrain_rules = retraining_rules(self, config, training_state_machine, state_machine, self.drift_alarm)

        dashboard = cloudwatch.Dashboard(
            self, "Dashboard", dashboard_name=config.prefix, default_interval=Duration.hours(6)
        )
        dashboard.add_widgets(cloudwatch.AlarmStatusWidget(title="Alarms", alarms=self.alarms, width=24, height=3))
        dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(
                title="Endpoint update: rollback alarms (they act only while an update bakes)",
                alarms=[
                    cloudwatch.Alarm.from_alarm_name(self, f"Rollback{index}", name)
                    for index, name in enumerate(rollback_alarm_names(config))
                ],
                width=12,
                height=6,
            ),
            cloudwatch.GraphWidget(
                title="Rollback ML signal: answers below the threshold per minute, and their baseline (%)",
                width=12,
                height=6,
                left=[
                    metrics.low_confidence_rate(config, ROLLBACK_PERIOD),
                    metrics.low_confidence_baseline(config, ROLLBACK_PERIOD),
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0, max=100),
            ),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Endpoint invocations and errors",
                width=8,
                left=[invocations, endpoint_metric("Invocation4XXErrors"), errors_5xx],
            ),
            cloudwatch.GraphWidget(
                title="Endpoint latency (µs)",
                width=8,
                left=[
                    endpoint_metric("ModelLatency", "p50"),
                    endpoint_metric("ModelLatency", "p99"),
                    endpoint_metric("OverheadLatency", "p50"),
                ],
            ),
            cloudwatch.GraphWidget(
                title="Endpoint instances (%)",
                width=8,
                left=[
                    endpoint_metric(name, "Average", "/aws/sagemaker/Endpoints")
                    for name in ("CPUUtilization", "MemoryUtilization", "DiskUtilization")
                ],
            ),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Classification executions",
                width=8,
                left=[
                    started,
                    state_machine.metric_succeeded(period=FIVE_MINUTES),
                    failed,
                    state_machine.metric_timed_out(period=FIVE_MINUTES),
                ],
            ),
            cloudwatch.LogQueryWidget(
                title="Failed executions by error",
                width=8,
                log_group_names=[state_machine_log_group_name],
                query_lines=['filter type = "ExecutionFailed"', "stats count(*) as executions by details.error"],
            ),
            cloudwatch.GraphWidget(
                title="Lambda errors and duration (p99, ms)",
                width=8,
                left=[function.metric_errors(period=FIVE_MINUTES) for function in functions],
                right=[function.metric_duration(period=FIVE_MINUTES, statistic="p99") for function in functions],
            ),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Confidence: top probability",
                width=8,
                left=[scones_metric(TOP_PROBABILITY, "Average"), scones_metric(TOP_PROBABILITY, "p10")],
                left_y_axis=cloudwatch.YAxisProps(min=0, max=1),
            ),
            cloudwatch.GraphWidget(title="Low-confidence answers", width=8, left=[low_confidence, answered]),
            cloudwatch.GraphWidget(
                title="Predicted class mix",
                width=8,
                stacked=True,
                left=[
                    scones_metric(PREDICTIONS, PredictedClass=str(label)).with_(label=name)
                    for label, name in enumerate(config.classes)
                ],
            ),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Drift: violations of the hourly capture report",
                width=8,
                stacked=True,
                left=[
                    scones_metric(drift_metrics.VIOLATIONS, "Maximum", CheckType=check_type).with_(
                        period=ONE_HOUR, label=check_type
                    )
                    for check_type in drift_metrics.CHECK_TYPES
                ],
                right=[
                    scones_metric(drift_metrics.CHECKED_RECORDS, "Maximum").with_(
                        period=ONE_HOUR, label="records checked"
                    )
                ],
            ),
            cloudwatch.GraphWidget(
                title="Drift: answers most likely neither (%)",
                width=8,
                left=[
                    scones_metric(drift_metrics.NEITHER_SHARE, "Maximum").with_(
                        period=ONE_HOUR, label="neither bicycle nor motorcycle"
                    )
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0, max=100),
            ),
            cloudwatch.GraphWidget(
                title="Drift job runs",
                width=8,
                left=[self.drift.state_machine.metric_succeeded(period=ONE_HOUR), drift_failed, drift_timed_out],
            ),
        )
        if review:
            dashboard.add_widgets(*self._review_widgets(config, review))
        self.dashboard = dashboard

        CfnOutput(
            self,
            "DashboardUrl",
            description="The CloudWatch dashboard: endpoint, executions, confidence, drift.",
            value=f"https://console.aws.amazon.com/cloudwatch/home?region={Aws.REGION}"
            f"#dashboards:name={dashboard.dashboard_name}",
        )
        CfnOutput(
            self,
            "AlarmTopicArn",
            value=self.topic.topic_arn,
            description="The SNS topic every alarm notifies: subscribe to it to hear of failures and drift.",
        )

    @staticmethod
    def _failure_rate(config: SconesConfig, started, failed, low_confidence) -> cloudwatch.MathExpression:
        """Executions that failed for a reason other than the answer itself, in percent: without review an
        uncertain answer fails its execution (ThresholdConfidenceNotMet); with review a reviewer's "neither" does
        (NotAVehicle), and an uncertain answer waits instead."""
        if config.review:
            expected = {"notavehicle": metrics.review_metric(config, metrics.NOT_A_VEHICLE, "Sum", FIVE_MINUTES)}
        else:
            expected = {"lowconfidence": low_confidence}
        (name,) = expected
        return cloudwatch.MathExpression(
            expression=f"IF(started > 0, 100 * (failed - {name}) / started, 0)",
            using_metrics={"started": started, "failed": failed, **expected},
            label="executions failed for reasons other than the answer (%)",
            period=FIVE_MINUTES,
        )

    def _review_alarms(self, config: SconesConfig, review: ReviewStack) -> list[cloudwatch.Alarm]:
        deadline_near = round(0.8 * config.review_timeout_seconds)
        return [
            review.queue.metric_approximate_age_of_oldest_message(
                period=FIVE_MINUTES, statistic="Maximum"
            ).create_alarm(
                self,
                "ReviewIntakeStuck",
                alarm_name=f"{config.prefix}-review-intake-stuck",
                alarm_description="A review task has waited more than 5 minutes in the review queue: the intake "
                "Lambda is not recording tasks, so reviewers do not see them (its errors are in its log group).",
                threshold=300,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            review.dead_letter_queue.metric_approximate_number_of_messages_visible(
                period=FIVE_MINUTES, statistic="Maximum"
            ).create_alarm(
                self,
                "ReviewDeadLetters",
                alarm_name=f"{config.prefix}-review-dead-letters",
                alarm_description=f"Review tasks the intake failed to record {MAX_RECEIVES} times are in "
                f"{config.review_queue_name}-dlq: their executions wait until they time out unless the tasks are "
                "redriven to the review queue once the cause is fixed.",
                threshold=0,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
            metrics.review_metric(config, metrics.OLDEST_REVIEW_AGE, "Maximum", FIVE_MINUTES).create_alarm(
                self,
                "ReviewDeadlineNear",
                alarm_name=f"{config.prefix}-review-deadline-near",
                alarm_description=f"The oldest waiting review is older than 80% of the review timeout "
                f"({deadline_near} s of {config.review_timeout_seconds} s): answer it on the review page before "
                "its execution fails with ReviewTimedOut.",
                threshold=deadline_near,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            ),
        ]

    def _review_widgets(self, config: SconesConfig, review: ReviewStack) -> list[cloudwatch.IWidget]:
        return [
            cloudwatch.GraphWidget(
                title="Reviews waiting, and the oldest's age (s)",
                width=6,
                left=[
                    metrics.review_metric(config, metrics.REVIEWS_WAITING, "Maximum", FIVE_MINUTES).with_(
                        label="waiting"
                    )
                ],
                right=[
                    metrics.review_metric(config, metrics.OLDEST_REVIEW_AGE, "Maximum", FIVE_MINUTES).with_(
                        label="oldest waiting (s)"
                    )
                ],
            ),
            cloudwatch.GraphWidget(
                title="Reviews answered per hour, by the model's class",
                width=6,
                stacked=True,
                left=[
                    metrics.review_metric(
                        config, metrics.REVIEW_ANSWERS, "Sum", ONE_HOUR, ModelClass=model_class
                    ).with_(label=model_class)
                    for model_class in metrics.review_model_classes(config)
                ],
            ),
            cloudwatch.GraphWidget(
                title="Reviewers agreeing with the model (hourly)",
                width=6,
                left=[metrics.review_agreement(config, ONE_HOUR)],
                left_y_axis=cloudwatch.YAxisProps(min=0, max=1),
            ),
            cloudwatch.GraphWidget(
                title="Review queue: oldest message (s), dead letters",
                width=6,
                left=[
                    review.queue.metric_approximate_age_of_oldest_message(
                        period=FIVE_MINUTES, statistic="Maximum", label="oldest in the review queue (s)"
                    )
                ],
                right=[
                    review.dead_letter_queue.metric_approximate_number_of_messages_visible(
                        period=FIVE_MINUTES, statistic="Maximum", label="in the dead-letter queue"
                    )
                ],
            ),
        ]
