"""The rules that start a retraining, made in the monitoring stack, which holds the drift alarm."""

from aws_cdk import (
    aws_cloudwatch as cloudwatch,
    aws_events as events,
    aws_events_targets as targets,
    aws_iam as iam,
    aws_stepfunctions as sfn,
)
from constructs import Construct

from stacks.config import SconesConfig

# The event the review API puts on the default bus when enough reviewed labels have accumulated
# (lambdas/review_api/retrain.py: SOURCE, DETAIL_TYPE).
REVIEW_EVENT_SOURCE = "scones.review"
LABELS_ACCUMULATED = "Reviewed labels accumulated"


def retraining_rules(
    scope: Construct,
    config: SconesConfig,
    training: sfn.IStateMachine,
    classify: sfn.IStateMachine,
    drift_alarm: cloudwatch.IAlarm,
) -> list[events.Rule]:
    """Start the training state machine when the drift alarm goes into ALARM, on the optional schedule, and
    when the review API reports that `retrain_after_labels` reviewed labels of this environment's classify
    state machine have accumulated (lambdas/review_api/retrain.py).

    A retraining only trains and records a model; the endpoint changes only when it is deployed again."""
    role = iam.Role(
        scope,
        "RetrainRole",
        assumed_by=iam.ServicePrincipal("events.amazonaws.com"),
        description="scones retraining rules: start the training state machine, nothing else",
    )

    def start_training(execution_input: dict) -> list[targets.SfnStateMachine]:
        return [targets.SfnStateMachine(training, role=role, input=events.RuleTargetInput.from_object(execution_input))]

    rules = [
        events.Rule(
            scope,
            "RetrainOnDrift",
            rule_name=f"{config.prefix}-retrain-on-drift",
            description="Starts a retraining when the drift alarm goes into ALARM.",
            event_pattern=events.EventPattern(
                source=["aws.cloudwatch"],
                detail_type=["CloudWatch Alarm State Change"],
                resources=[drift_alarm.alarm_arn],
                detail={"state": {"value": ["ALARM"]}},
            ),
            targets=start_training({"trigger": "drift", "alarm": events.EventField.from_path("$.detail.alarmName")}),
        )
    ]
    if config.retrain_schedule:
        rules.append(
            events.Rule(
                scope,
                "RetrainSchedule",
                rule_name=f"{config.prefix}-retrain-schedule",
                description=f"Starts a retraining on the schedule {config.retrain_schedule}.",
                schedule=events.Schedule.expression(config.retrain_schedule),
                targets=start_training({"trigger": "schedule"}),
            )
        )
    if config.retrain_after_labels is not None:
        rules.append(
            events.Rule(
                scope,
                "RetrainOnLabels",
                rule_name=f"{config.prefix}-retrain-on-labels",
                description=f"Starts a retraining each time reviewers have written {config.retrain_after_labels} "
                "labels.",
                event_pattern=events.EventPattern(
                    source=[REVIEW_EVENT_SOURCE],
                    detail_type=[LABELS_ACCUMULATED],
                    detail={"state_machine": [classify.state_machine_arn]},
                ),
                targets=start_training({"trigger": "labels", "labels": events.EventField.from_path("$.detail.labels")}),
            )
        )
    return rules
