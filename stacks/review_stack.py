"""The review of uncertain answers: the queue the classification sends review tasks to, the table of waiting
tasks and answers, the intake Lambda between them, and the review page and API behind a Cognito user pool."""

import json

import jsii
from aws_cdk import (
    ArnFormat,
    Aws,
    CfnOutput,
    Duration,
    RemovalPolicy,
    Stack,
    aws_apigateway as apigateway,
    aws_apigatewayv2 as apigwv2,
    aws_apigatewayv2_authorizers as authorizers,
    aws_apigatewayv2_integrations as integrations,
    aws_cognito as cognito,
    aws_dynamodb as dynamodb,
    aws_events as events,
    aws_events_targets as targets,
    aws_iam as iam,
    aws_kms as kms,
    aws_lambda_event_sources as event_sources,
    aws_logs as logs,
    aws_s3 as s3,
    aws_sqs as sqs,
    aws_stepfunctions as sfn,
)
from cdk_nag import NagSuppressions
from constructs import Construct

from stacks.config import SconesConfig
from stacks.constructs import PythonFunction
from stacks.workflow_stack import CLASSIFY_STATE_MACHINE, METRIC_NAMESPACE

# Where every answer is written: the photo under labels/<class>/ (the layout training.etl --photos stages) and
# one JSON line under reviews/.
LABELS_PREFIX = "labels/"
REVIEWS_PREFIX = "reviews/"
INTAKE_SECONDS = 30
# Receives before a review task that the intake cannot record goes to the dead-letter queue.
MAX_RECEIVES = 5
PUBLISH_QUEUE_METRICS = {"action": "publish_queue_metrics"}
ACCESS_LOG_FORMAT = {
    "requestId": "$context.requestId",
    "ip": "$context.identity.sourceIp",
    "requestTime": "$context.requestTime",
    "routeKey": "$context.routeKey",
    "status": "$context.status",
    "responseLength": "$context.responseLength",
    "integrationError": "$context.integrationErrorMessage",
    "authorizerError": "$context.authorizer.error",
}


@jsii.implements(apigwv2.IAccessLogSettings)
class _AccessLogs:
    """The HTTP API stage's access log settings: one JSON line per request into `log_group`."""

    def __init__(self, log_group: logs.ILogGroup) -> None:
        self._destination = apigwv2.LogGroupLogDestination(log_group)

    @property
    def destination(self) -> apigwv2.IAccessLogDestination:
        return self._destination

    @property
    def format(self) -> apigateway.AccessLogFormat:
        return apigateway.AccessLogFormat.custom(json.dumps(ACCESS_LOG_FORMAT))


class ReviewStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, config: SconesConfig, bucket: s3.IBucket, **kwargs
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.key = kms.Key(
            self,
            "QueueKey",
            description="scones review queue and its dead-letter queue",
            enable_key_rotation=True,
            removal_policy=config.removal,
        )
        self.dead_letter_queue = sqs.Queue(
            self,
            "DeadLetterQueue",
            queue_name=f"{config.review_queue_name}-dlq",
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=self.key,
            enforce_ssl=True,
            retention_period=Duration.days(14),
            removal_policy=config.removal,
        )
        self.queue = sqs.Queue(
            self,
            "Queue",
            queue_name=config.review_queue_name,
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=self.key,
            enforce_ssl=True,
            visibility_timeout=Duration.seconds(6 * INTAKE_SECONDS),  # what Lambda advises for a queue it consumes
            dead_letter_queue=sqs.DeadLetterQueue(max_receive_count=MAX_RECEIVES, queue=self.dead_letter_queue),
            removal_policy=config.removal,
        )
        self.table = dynamodb.Table(
            self,
            "Table",
            table_name=config.review_table_name,
            partition_key=dynamodb.Attribute(name="pk", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="sk", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            time_to_live_attribute="expires_at",
            removal_policy=config.removal,
        )

        intake = PythonFunction(
            self,
            "ReviewIntake",
            config=config,
            name="review_intake",
            environment={
                "TABLE_NAME": self.table.table_name,
                "REVIEW_TIMEOUT_SECONDS": str(config.review_timeout_seconds),
            },
            timeout=Duration.seconds(INTAKE_SECONDS),
        )
        self.intake = intake.function
        self.table.grant(self.intake, "dynamodb:PutItem")
        self.intake.add_event_source(
            event_sources.SqsEventSource(self.queue, batch_size=10, report_batch_item_failures=True)
        )

        self.user_pool, self.user_pool_client = self._user_pool(config)
        classify_name = f"{config.prefix}-{CLASSIFY_STATE_MACHINE}"
        # Built from the name, not taken from the workflow stack, which depends on this one (the queue).
        classify = sfn.StateMachine.from_state_machine_name(self, "Classify", classify_name)
        api = PythonFunction(
            self,
            "ReviewApi",
            config=config,
            name="review_api",
            environment={
                "TABLE_NAME": self.table.table_name,
                "BUCKET_NAME": bucket.bucket_name,
                "CLASS_NAMES": ",".join(config.classes),
                "STATE_MACHINE_ARN": classify.state_machine_arn,
                "METRIC_NAMESPACE": METRIC_NAMESPACE,
                "USER_POOL_CLIENT_ID": self.user_pool_client.user_pool_client_id,
                "USER_POOL_REGION": Aws.REGION,
                # lets the task list start after the oldest task still answerable
                "REVIEW_TIMEOUT_SECONDS": str(config.review_timeout_seconds),
                **(
                    {"RETRAIN_AFTER_LABELS": str(config.retrain_after_labels)}
                    if config.retrain_after_labels is not None
                    else {}
                ),
            },
            timeout=Duration.seconds(20),
        )
        self.api_function = api.function
        self._grant_api(bucket, classify, classify_name, counts_labels=config.retrain_after_labels is not None)
        self.api, self.stage = self._http_api(config)

        self.metrics_schedule = events.Rule(
            self,
            "PublishQueueMetrics",
            rule_name=f"{config.prefix}-review-queue-metrics",
            description="Every 5 minutes the review API publishes the number of waiting reviews and the oldest's age.",
            schedule=events.Schedule.rate(Duration.minutes(5)),
            targets=[
                targets.LambdaFunction(
                    self.api_function, event=events.RuleTargetInput.from_object(PUBLISH_QUEUE_METRICS)
                )
            ],
        )

        CfnOutput(
            self,
            "ReviewPageUrl",
            value=self.stage.url,
            description="The review page: reviewers sign in with the user pool's account an administrator created.",
        )
        pool_id = self.user_pool.user_pool_id
        CfnOutput(self, "UserPoolId", value=pool_id, description="The reviewers' user pool.")
        CfnOutput(
            self,
            "AddReviewerCommand",
            description="Adds a reviewer who signs in on the review page with this e-mail address and password "
            "(replace both; the password: 12 characters or more, upper and lower case, a digit, a symbol). See "
            "docs/deploying.md.",
            value=f"aws cognito-idp admin-create-user --region {Aws.REGION} --user-pool-id {pool_id} "
            "--username reviewer@example.com --message-action SUPPRESS "
            "--user-attributes Name=email,Value=reviewer@example.com Name=email_verified,Value=true && "
            f"aws cognito-idp admin-set-user-password --region {Aws.REGION} --user-pool-id {pool_id} "
            "--username reviewer@example.com --password 'CHANGE-me-2-a-strong-one' --permanent",
        )
        self._suppress()

    def _user_pool(self, config: SconesConfig) -> tuple[cognito.UserPool, cognito.UserPoolClient]:
        """Reviewers: accounts an administrator creates (no self sign-up), signing in with their e-mail."""
        pool = cognito.UserPool(
            self,
            "Reviewers",
            user_pool_name=f"{config.prefix}-reviewers",
            self_sign_up_enabled=False,
            sign_in_aliases=cognito.SignInAliases(email=True),
            password_policy=cognito.PasswordPolicy(
                min_length=12,
                require_lowercase=True,
                require_uppercase=True,
                require_digits=True,
                require_symbols=True,
                temp_password_validity=Duration.days(3),
            ),
            account_recovery=cognito.AccountRecovery.EMAIL_ONLY,
            feature_plan=cognito.FeaturePlan.LITE,
            deletion_protection=config.removal == RemovalPolicy.RETAIN,
            removal_policy=config.removal,
        )
        # The page's own login form: InitiateAuth with USER_PASSWORD_AUTH from the browser, so no secret.
        client = pool.add_client(
            "Page",
            user_pool_client_name=f"{config.prefix}-review-page",
            auth_flows=cognito.AuthFlow(user_password=True),
            generate_secret=False,
            disable_o_auth=True,
            prevent_user_existence_errors=True,
            id_token_validity=Duration.hours(8),
        )
        return pool, client

    def _grant_api(
        self, bucket: s3.IBucket, classify: sfn.IStateMachine, classify_name: str, *, counts_labels: bool
    ) -> None:
        """The review API's access: its table, answering the classify executions' review tasks and reading those
        executions, reading photos, and writing only labels and answer records; when it counts labels towards a
        retraining, updating the count and putting events on the default bus."""
        function = self.api_function
        table_actions = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:Query"]
        self.table.grant(function, *table_actions, *(["dynamodb:UpdateItem"] if counts_labels else []))
        if counts_labels:
            function.add_to_role_policy(
                iam.PolicyStatement(
                    actions=["events:PutEvents"],
                    resources=[self.format_arn(service="events", resource="event-bus", resource_name="default")],
                )
            )
        classify.grant_task_response(function)
        function.add_to_role_policy(
            iam.PolicyStatement(actions=["states:ListExecutions"], resources=[classify.state_machine_arn])
        )
        function.add_to_role_policy(
            iam.PolicyStatement(
                actions=["states:DescribeExecution"],
                resources=[
                    self.format_arn(
                        service="states",
                        resource="execution",
                        resource_name=f"{classify_name}:*",
                        arn_format=ArnFormat.COLON_RESOURCE_NAME,
                    )
                ],
            )
        )
        function.add_to_role_policy(
            iam.PolicyStatement(actions=["s3:GetObject"], resources=[bucket.arn_for_objects("*")])
        )
        function.add_to_role_policy(
            iam.PolicyStatement(
                actions=["s3:PutObject"],
                resources=[bucket.arn_for_objects(f"{prefix}*") for prefix in (LABELS_PREFIX, REVIEWS_PREFIX)],
            )
        )

    def _http_api(self, config: SconesConfig) -> tuple[apigwv2.HttpApi, apigwv2.HttpStage]:
        """`GET /` serves the page shell, which holds no data; every `/api/` route needs a reviewer's token."""
        api = apigwv2.HttpApi(
            self,
            "Api",
            api_name=f"{config.prefix}-review",
            description="scones review page and API",
            create_default_stage=False,
        )
        access_logs = logs.LogGroup(
            self, "AccessLogs", retention=logs.RetentionDays.ONE_MONTH, removal_policy=config.removal
        )
        stage = apigwv2.HttpStage(
            self,
            "Stage",
            http_api=api,
            stage_name="$default",
            auto_deploy=True,
            access_log_settings=_AccessLogs(access_logs),
            # A reviewer's page polls twice a second; this leaves room for a team and stops a flood.
            throttle=apigwv2.ThrottleSettings(rate_limit=50, burst_limit=100),
        )
        integration = integrations.HttpLambdaIntegration("ReviewApi", self.api_function)
        authorizer = authorizers.HttpUserPoolAuthorizer(
            "Reviewers", self.user_pool, user_pool_clients=[self.user_pool_client]
        )
        (self.page_route,) = api.add_routes(path="/", methods=[apigwv2.HttpMethod.GET], integration=integration)
        api.add_routes(
            path="/api/{proxy+}", methods=[apigwv2.HttpMethod.ANY], integration=integration, authorizer=authorizer
        )
        return api, stage

    def _suppress(self) -> None:
        NagSuppressions.add_resource_suppressions(
            self.user_pool,
            [
                {
                    "id": "AwsSolutions-COG2",
                    "reason": "Reviewers are a few accounts an administrator creates, with a 12-character password "
                    "of four character classes; the page's own login form speaks USER_PASSWORD_AUTH only.",
                },
                {
                    "id": "AwsSolutions-COG8",
                    "reason": "Threat protection needs the Plus feature plan, billed per active user; self sign-up "
                    "is off, so the only users are the few reviewers an administrator created, with strong passwords.",
                },
            ],
        )
        NagSuppressions.add_resource_suppressions(
            self.page_route,
            [
                {
                    "id": "AwsSolutions-APIG4",
                    "reason": "GET / serves the page shell, which holds no data and no photo; every /api/ route "
                    "(tasks, photos, answers) has the Cognito JWT authorizer.",
                }
            ],
            apply_to_children=True,
        )
        NagSuppressions.add_resource_suppressions(
            self.api_function.role,
            [
                {
                    "id": "AwsSolutions-IAM5",
                    "reason": "The review API reads whichever photo a task names (s3:GetObject on the bucket's "
                    "objects, for presigned URLs and the label copy), writes only under labels/ and reviews/, "
                    "and describes the classify state machine's executions, named at run time.",
                    "appliesTo": [
                        {"regex": "/^Resource::.*Data.*\\/(\\*|labels\\/\\*|reviews\\/\\*)$/"},
                        {"regex": "/^Resource::arn:.*:execution:.*-classify-image:\\*$/"},
                    ],
                }
            ],
            apply_to_children=True,
        )
