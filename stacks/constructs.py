"""Wiring shared by the stacks."""

from pathlib import Path

from aws_cdk import (
    ArnFormat,
    Duration,
    Stack,
    aws_iam as iam,
    aws_lambda as lambda_,
    aws_logs as logs,
    aws_stepfunctions as sfn,
)
from cdk_nag import NagSuppressions
from constructs import Construct

from stacks.config import SconesConfig


class LoggedStateMachine(Construct):
    """A standard state machine that logs every event to its own log group and is traced with X-Ray."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: SconesConfig,
        name: str,
        definition: sfn.IChainable,
        timeout: Duration,
    ) -> None:
        super().__init__(scope, construct_id)
        self.log_group = logs.LogGroup(
            self,
            "Logs",
            log_group_name=f"/aws/vendedlogs/states/{config.prefix}-{name}",
            retention=logs.RetentionDays.ONE_MONTH,
            removal_policy=config.removal,
        )
        self.state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            state_machine_name=f"{config.prefix}-{name}",
            state_machine_type=sfn.StateMachineType.STANDARD,
            definition_body=sfn.DefinitionBody.from_chainable(definition),
            timeout=timeout,
            tracing_enabled=True,
            logs=sfn.LogOptions(destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=True),
        )


class SageMakerRole(Construct):
    """An execution role for SageMaker jobs and models: pull the AWS-owned images, write logs and metrics.

    Data access is granted by the caller, per bucket prefix.
    """

    def __init__(self, scope: Construct, construct_id: str, *, description: str, repository_arns: list[str]) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.role = iam.Role(
            self, "Role", assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"), description=description
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                actions=["ecr:GetAuthorizationToken", "cloudwatch:PutMetricData"],
                resources=["*"],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                actions=["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
                resources=repository_arns,
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                actions=["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                resources=[
                    stack.format_arn(
                        service="logs",
                        resource="log-group",
                        resource_name="/aws/sagemaker/*",
                        arn_format=ArnFormat.COLON_RESOURCE_NAME,
                    )
                ],
            )
        )
        NagSuppressions.add_resource_suppressions(
            self.role,
            [
                {
                    "id": "AwsSolutions-IAM5",
                    "reason": "ecr:GetAuthorizationToken and cloudwatch:PutMetricData take no resource; log "
                    "streams are named by SageMaker at run "
                    "time; bucket wildcards are the key prefixes this role was granted.",
                }
            ],
            apply_to_children=True,
        )


class PythonFunction(Construct):
    """A Lambda function from `lambdas/<name>/`, with its own log group, tracing and a role that may only log.

    Each function's asset is the `lambdas/` folder without the other functions, so the shared
    `lambdas/common` package travels with every handler.
    """

    LAMBDAS = Path(__file__).resolve().parent.parent / "lambdas"

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: SconesConfig,
        name: str,
        environment: dict[str, str],
        timeout: Duration,
        memory_size: int = 256,
    ) -> None:
        super().__init__(scope, construct_id)
        others = [p.name for p in self.LAMBDAS.iterdir() if p.is_dir() and p.name not in (name, "common")]
        self.log_group = logs.LogGroup(
            self,
            "Logs",
            retention=logs.RetentionDays.ONE_MONTH,
            removal_policy=config.removal,
        )
        self.role = iam.Role(
            self, "Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"), description=f"scones {name} Lambda"
        )
        self.function = lambda_.Function(
            self,
            "Function",
            runtime=lambda_.Runtime.PYTHON_3_14,
            handler=f"{name}.index.handler",
            code=lambda_.Code.from_asset(str(self.LAMBDAS), exclude=[*others, "**/__pycache__", "**/*.pyc"]),
            role=self.role,
            environment=environment,
            timeout=timeout,
            memory_size=memory_size,
            tracing=lambda_.Tracing.ACTIVE,
            log_group=self.log_group,
        )
        self.log_group.grant_write(self.role)
        NagSuppressions.add_resource_suppressions(
            self.role,
            [
                {
                    "id": "AwsSolutions-IAM5",
                    "reason": "X-Ray's PutTraceSegments/PutTelemetryRecords take no resource (added by tracing); log "
                    "streams inside this function's own log group are named by Lambda at run time.",
                    "appliesTo": ["Resource::*", {"regex": "/^Resource::<.*Logs.*\\.Arn>:\\*$/"}],
                }
            ],
            apply_to_children=True,
        )
