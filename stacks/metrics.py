"""The CloudWatch metrics the endpoint's rollback alarms and the monitoring stack's dashboard and alarms read:
SageMaker's endpoint metrics, per variant, and the filter Lambda's Embedded Metric Format output
(lambdas/filter_inferences/index.py) and its baseline (lambdas/rollback_baseline), per endpoint."""

from aws_cdk import Duration, aws_cloudwatch as cloudwatch

from stacks.config import SconesConfig
from stacks.workflow_stack import METRIC_NAMESPACE

VARIANT_NAME = "AllTraffic"
TOP_PROBABILITY = "TopProbability"
LOW_CONFIDENCE = "LowConfidence"
PREDICTIONS = "Predictions"
# The share of the filter's answers below the threshold over the trailing BASELINE_WINDOW_HOURS, in percent, by
# EndpointName (lambdas/rollback_baseline), one datapoint a minute: what the low-confidence rollback alarm compares
# with. A day: an update's bake, minutes long, barely moves it.
LOW_CONFIDENCE_BASELINE = "LowConfidenceBaseline"
BASELINE_WINDOW_HOURS = 24


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


def low_confidence_baseline(config: SconesConfig, period: Duration) -> cloudwatch.Metric:
    """The share of the filter's answers below the threshold over the trailing BASELINE_WINDOW_HOURS, in percent
    (none while there were no answers)."""
    return filter_metric(config, LOW_CONFIDENCE_BASELINE, "Average", period).with_(
        label=f"{BASELINE_WINDOW_HOURS}-hour baseline of answers below the threshold (%)"
    )


# The review API's Embedded Metric Format output (lambdas/review_api/answers.py), each by the environment's
# review table: the waiting tasks, published every 5 minutes, and one datapoint per answer or correction, by the
# model's class.
REVIEWS_WAITING = "ReviewsWaiting"
OLDEST_REVIEW_AGE = "OldestReviewAgeSeconds"
REVIEW_ANSWERS = "ReviewAnswers"
OVERRULED = "Overruled"
NOT_A_VEHICLE = "NotAVehicle"  # 1 per review task a reviewer answered "neither" (its execution fails on purpose)
REVIEW_TABLE = "ReviewTable"  # every review metric's dimension
NEITHER = "neither"


def review_metric(
    config: SconesConfig, name: str, statistic: str, period: Duration, **dimensions: str
) -> cloudwatch.Metric:
    """A metric of the review API, by its environment's review table (and `dimensions`)."""
    return cloudwatch.Metric(
        namespace=METRIC_NAMESPACE,
        metric_name=name,
        statistic=statistic,
        dimensions_map={REVIEW_TABLE: config.review_table_name, **dimensions},
        period=period,
    )


def review_model_classes(config: SconesConfig) -> tuple[str, ...]:
    """The ModelClass dimension's values: the model's answer for a reviewed photo, `neither` included."""
    return (*config.classes, NEITHER)


def _review_total(config: SconesConfig, name: str, period: Duration) -> cloudwatch.MathExpression:
    """A review metric summed over the model's classes (a class without answers in a period counts 0)."""
    parts = {
        f"{name.lower()}{index}": review_metric(config, name, "Sum", period, ModelClass=model_class)
        for index, model_class in enumerate(review_model_classes(config))
    }
    return cloudwatch.MathExpression(
        expression=" + ".join(f"FILL({part}, 0)" for part in parts), using_metrics=parts, period=period
    )


def review_agreement(config: SconesConfig, period: Duration) -> cloudwatch.MathExpression:
    """The share of reviewed answers where the reviewer kept the model's class (none in a period without answers)."""
    return cloudwatch.MathExpression(
        expression="IF(answers > 0, 1 - overruled / answers)",
        using_metrics={
            "answers": _review_total(config, REVIEW_ANSWERS, period),
            "overruled": _review_total(config, OVERRULED, period),
        },
        label="agreement with the model",
        period=period,
    )
