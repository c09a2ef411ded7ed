"""The CloudWatch metrics the endpoint's rollback alarms and the monitoring stack's dashboard and alarms read:
SageMaker's endpoint metrics, per variant, and the filter Lambda's Embedded Metric Format output
(lambdas/filter_inferences/index.py), per endpoint."""

from aws_cdk import Duration, aws_cloudwatch as cloudwatch

from stacks.config import SconesConfig
from stacks.workflow_stack import METRIC_NAMESPACE

VARIANT_NAME = "AllTraffic"
TOP_PROBABILITY = "TopProbability"
LOW_CONFIDENCE = "LowConfidence"
PREDICTIONS = "Predictions"


def endpoint_metric(
    config: SconesConfig, name: str, statistic: str, period: Duration, namespace: str = "AWS/SageMaker"
) -> cloudwatch.Metric:
    return cloudwatch.Metric(
        namespace=namespace,
        metric_name=name,
        dimensions_map={"EndpointName": config.endpoint_name, "VariantName": VARIANT_NAME},
        statistic=statistic,
        period=period,
    )


def filter_metric(config: SconesConfig, name: str, statistic: str, period: Duration, **dimensions: str):
    return cloudwatch.Metric(
        namespace=METRIC_NAMESPACE,
        metric_name=name,
        statistic=statistic,
        dimensions_map={"EndpointName": config.endpoint_name, **dimensions},
        period=period,
    )


def low_confidence_rate(config: SconesConfig, period: Duration) -> cloudwatch.MathExpression:
    """The share of the filter's answers below the threshold, in percent (0 in a period without answers)."""
    return cloudwatch.MathExpression(
        expression="IF(answered > 0, 100 * lowconfidence / answered, 0)",
        using_metrics={
            "answered": filter_metric(config, TOP_PROBABILITY, "SampleCount", period),
            "lowconfidence": filter_metric(config, LOW_CONFIDENCE, "Sum", period),
        },
        label="answers below the threshold (%)",
        period=period,
    )
