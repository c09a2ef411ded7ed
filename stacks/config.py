"""One typed configuration for every stack, read from the CDK context.

Every default is written once, in a field of `SconesConfig` below, with what the key means (the README's
configuration table is rendered from them: `stacks.config_table`). Any key can be given on the command line
(`npx cdk synth -c env=prod -c threshold=0.9`) or kept in `cdk.json`'s `context`. Invalid values and unknown
keys fail at synth with a ConfigError naming the key.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from stacks import config_values as values
from stacks.config_values import ConfigError

if TYPE_CHECKING:
    from aws_cdk import RemovalPolicy

ENVIRONMENTS = ("dev", "prod")
ALGORITHMS = ("pytorch", "builtin")
REMOVAL_POLICIES = ("destroy", "retain")
LATENCY_STATISTICS = ("p99", "Average")
# The filter's confidence threshold while no trained model has recorded its own and none is given.
DEFAULT_THRESHOLD = 0.93
# The photos the batch state machine classifies under a prefix (by key, lower case) and `local classify` takes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# SageMaker's built-in image-classification algorithm, with the classic project's settings
# (ResNet-152 from scratch, 30 epochs). Values are strings as CreateTrainingJob wants them.
BUILTIN_HYPERPARAMETERS = {
    "image_shape": "3,32,32",
    "num_layers": "152",
    "epochs": "30",
    "mini_batch_size": "32",
    "learning_rate": "0.1",
    "use_pretrained_model": "0",
}
BUILTIN_HYPERPARAMETER_NAMES = set(BUILTIN_HYPERPARAMETERS) | {
    "num_classes",
    "num_training_samples",
    "optimizer",
    "momentum",
    "weight_decay",
    "lr_scheduler_factor",
    "lr_scheduler_step",
    "augmentation_type",
    "top_k",
    "precision_dtype",
    "early_stopping",
    "early_stopping_patience",
    "early_stopping_min_epochs",
    "early_stopping_tolerance",
}


# Context keys that belong to the CDK, not to this app: feature flags (`@aws-cdk/...`), what the CLI injects
# (`aws:cdk:enable-path-metadata`, `aws:cdk:bundling-stacks`...), `cdk-...` keys, `acknowledged-issue-numbers`
# (`cdk acknowledge`), and cached lookups in cdk.context.json (`availability-zones:account=...:region=...`).
CDK_KEY_PREFIXES = ("@", "aws:cdk:", "cdk-")
CDK_KEYS = {"acknowledged-issue-numbers"}


def stack_name(env_name: str, stack: str) -> str:
    """The CloudFormation stack name app.py gives a stack, e.g. `SconesDevTraining` for ("dev", "Training")."""
    return f"Scones{env_name.title()}{stack}"


# A review may wait from about a second (the tests' timeouts) to a year less a day: the batch state machine's
# timeout is the review's plus 24 hours, and a standard execution runs at most a year (8760 hours).
MIN_REVIEW_HOURS = 0.0001
MAX_REVIEW_HOURS = 8760 - 24

INSTANCE_TYPE = values.matching(r"ml\.[a-z0-9]+\.[0-9]*x?large|ml\.[a-z0-9]+\.(medium|small)")


def _setting(
    default: Any,
    meaning: str,
    read: Callable[[str, Any], Any],
    *,
    key: str | None = None,
    varies_with: str | None = None,
):
    """A configuration field: its default, what it means, how a context value is read, and its context key
    when that is not the field's name. `varies_with` names the field a derived default (None here, computed
    in `__post_init__`) depends on, so that the table shows it for each choice of that field."""
    metadata = {"meaning": meaning, "read": read, "key": key, "varies_with": varies_with}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SconesConfig:
    env_name: str = _setting(
        "dev", "`dev` or `prod`: names, and the removal policy's default", values.one_of(*ENVIRONMENTS), key="env"
    )
    account: str | None = _setting(
        None, "pin the stacks to an account; unset, they are environment-agnostic", values.matching(r"\d{12}")
    )
    region: str | None = _setting(
        None,
        "pin the stacks to a region; unset, they are environment-agnostic",
        values.matching(r"[a-z]{2}(-[a-z]+)+-\d"),
    )
    classes: tuple[str, ...] = _setting(
        ("bicycle", "motorcycle"), "CIFAR-100 fine label names, in label order", values.class_names
    )
    endpoint_name: str | None = _setting(
        None,
        "the endpoint the classify Lambda calls",
        values.matching(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"),
        varies_with="env_name",
    )
    endpoint_instance_type: str = _setting("ml.m5.large", "the endpoint's instance type", INSTANCE_TYPE)
    endpoint_instance_count: int = _setting(
        1, "instances the endpoint starts with (and scales in to)", values.number(int, 1)
    )
    endpoint_max_instances: int = _setting(2, "instances auto scaling may scale out to", values.number(int, 1))
    invocations_per_instance_target: int = _setting(
        600, "target tracking value (invocations per instance per minute)", values.number(int, 1)
    )
    capture_sampling_percentage: int = _setting(
        100, "share of requests captured (what the hourly drift job checks)", values.number(int, 0, 100)
    )
    capture_retention_days: int = _setting(30, "lifecycle of `data_capture/`", values.number(int, 1))
    threshold: float | None = _setting(
        None,
        "the filter's confidence threshold, overriding the served model's own; unset, the filter applies the "
        "threshold the training calibrated, which the endpoint stack records in SSM "
        f"`/scones/<env>/serving/threshold` once it serves the model ({DEFAULT_THRESHOLD:g} while none is recorded)",
        values.number(float, 0.0, 1.0),
    )
    training_algorithm: str = _setting(
        "pytorch",
        "`pytorch` (script mode, `training/train.py`) or `builtin` (SageMaker's image-classification "
        "algorithm with the classic hyperparameters: ResNet-152 from scratch, 30 epochs)",
        values.one_of(*ALGORITHMS),
    )
    training_instance_type: str | None = _setting(
        None, "training instance", INSTANCE_TYPE, varies_with="training_algorithm"
    )
    training_max_runtime_minutes: int = _setting(
        60, "the training job's stopping condition", values.number(int, 1, 28 * 24 * 60)
    )
    training_images: int = _setting(900, "`num_training_samples` for the built-in algorithm", values.number(int, 1))
    hyperparameters: Mapping[str, str] = _setting(
        {}, "JSON object merged over the algorithm's defaults", values.json_object
    )
    model_data_url: str | None = _setting(
        None,
        "an `s3://.../model.tar.gz` for the endpoint instead of the SSM parameter",
        values.matching(r"s3://[a-z0-9.\-]{3,63}/.+\.tar\.gz"),
    )
    removal_policy: str | None = _setting(
        None,
        "what deleting a stack does to buckets, logs and keys",
        values.one_of(*REMOVAL_POLICIES),
        varies_with="env_name",
    )
    alarm_email: str | None = _setting(
        None, "where alarms go (monitoring)", values.matching(r"[^@\s]+@[^@\s]+\.[^@\s]+")
    )
    low_confidence_alarm_percent: float = _setting(
        40.0,
        "alarm when more than this share of an hour's answers is below the threshold",
        values.number(float, 0.0, 100.0),
    )
    expect_traffic: bool = _setting(False, "also alarm on an hour without invocations", values.boolean)
    gate_min_accuracy: float = _setting(
        0.85,
        "evaluation gate: the lowest test accuracy a trained model is registered with (the built-in algorithm: "
        "its validation accuracy); below it the training fails with `ModelBelowGate`",
        values.number(float, 0.0, 1.0),
    )
    gate_min_accepted_accuracy: float = _setting(
        0.95,
        "evaluation gate: the lowest test accuracy of the answers accepted at the model's threshold",
        values.number(float, 0.0, 1.0),
    )
    gate_min_coverage: float = _setting(
        0.6,
        "evaluation gate: the lowest share of test images accepted at the model's threshold (the default model "
        "accepts 64 to 71% of the CIFAR test thumbnails, 83 to 85% of real photos)",
        values.number(float, 0.0, 1.0),
    )
    gate_max_neither_accepted: float = _setting(
        0.05,
        "evaluation gate, for a model that learns neither: the highest share of neither images it accepts",
        values.number(float, 0.0, 1.0),
    )
    auto_approve: bool = _setting(
        False,
        "register a model that passes the gate as `Approved` (it then serves) instead of `PendingManualApproval`",
        values.boolean,
    )
    batch_tolerated_failure_percent: float = _setting(
        5.0,
        "share of images under a prefix that may fail to be classified at all before the batch fails",
        values.number(float, 0.0, 100.0),
    )
    canary_percent: int = _setting(
        10,
        "share of the new fleet that takes traffic first when the endpoint is updated (a canary needs at least "
        "2 instances: with 1, all traffic shifts at once and still bakes and rolls back)",
        values.number(int, 1, 50),
    )
    canary_bake_minutes: int = _setting(
        10,
        "how long the canary, then the full new fleet, is watched by the rollback alarms before the update goes on",
        values.number(int, 0, 60),
    )
    deployment_timeout_minutes: int = _setting(
        60,
        "an endpoint update that takes longer fails and rolls back; more than twice the bake",
        values.number(int, 10, 480),
    )
    rollback_latency_ms: float = _setting(
        500.0, "roll an endpoint update back when the model latency statistic exceeds this", values.number(float, 1.0)
    )
    rollback_latency_statistic: str = _setting(
        "p99",
        "`p99` or `Average`: the model latency statistic the rollback alarm bounds",
        values.one_of(*LATENCY_STATISTICS),
    )
    rollback_low_confidence_rise: float = _setting(
        15.0,
        "roll an endpoint update back when the share of answers below the threshold rises more than this many "
        "percentage points above its 24-hour baseline",
        values.number(float, 1.0, 100.0),
    )
    rollback_low_confidence_percent: float = _setting(
        40.0,
        "while there is no 24-hour baseline (no answers for a day): roll an endpoint update back when more than "
        "this share of answers is below the threshold",
        values.number(float, 0.0, 100.0),
    )
    retrain_schedule: str | None = _setting(
        None,
        "also retrain on a schedule, e.g. `rate(7 days)` or `cron(0 3 ? * MON *)` (EventBridge syntax); unset, "
        "no schedule starts a retraining",
        values.schedule,
    )
    retrain_after_labels: int | None = _setting(
        None,
        "with `review` on, also retrain each time reviewers have written this many labels under `labels/`; unset, "
        "labels start no retraining",
        values.number(int, 1),
    )
    review: bool = _setting(
        True,
        "send an uncertain answer to a person (the review page) and wait for the answer; `false`: the execution "
        "fails with `ThresholdConfidenceNotMet`",
        values.boolean,
    )
    review_timeout_hours: float = _setting(
        24.0,
        "how long an execution waits for a reviewer before it fails with `ReviewTimedOut` (fractions allowed)",
        values.number(float, MIN_REVIEW_HOURS, MAX_REVIEW_HOURS),
    )
    review_heartbeat_hours: float | None = _setting(
        None,
        "the review task's heartbeat, shorter than `review_timeout_hours`; unset, only the timeout applies",
        values.number(float, MIN_REVIEW_HOURS, MAX_REVIEW_HOURS),
    )

    def __post_init__(self) -> None:
        """The defaults that depend on other fields, and the built-in algorithm's hyperparameters."""
        derived = {
            "endpoint_name": self.endpoint_name or f"scones-{self.env_name}",
            "training_instance_type": self.training_instance_type
            or ("ml.m5.xlarge" if self.training_algorithm == "pytorch" else "ml.p3.2xlarge"),
            "removal_policy": self.removal_policy or ("retain" if self.env_name == "prod" else "destroy"),
            "hyperparameters": _hyperparameters(
                self.hyperparameters, self.training_algorithm, len(self.classes), self.training_images
            ),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        self._check_deployment()
        self._check_review()

    def _check_deployment(self) -> None:
        """SageMaker refuses a canary above half the fleet and a timeout shorter than the waits it contains; the
        low-confidence rollback alarm fills a missing baseline with the bound minus the rise, which must not be
        negative."""
        canary_instances = math.ceil(self.endpoint_instance_count * self.canary_percent / 100)
        if self.endpoint_instance_count > 1 and 2 * canary_instances > self.endpoint_instance_count:
            raise ConfigError(
                f"context key 'canary_percent': {self.canary_percent}% of {self.endpoint_instance_count} instances "
                f"rounds up to {canary_instances}, more than half the fleet; lower it (at most "
                f"{100 * (self.endpoint_instance_count // 2) // self.endpoint_instance_count}%)"
            )
        if self.rollback_low_confidence_rise > self.rollback_low_confidence_percent:
            raise ConfigError(
                f"context key 'rollback_low_confidence_rise': {self.rollback_low_confidence_rise:g} points is above "
                f"'rollback_low_confidence_percent' ({self.rollback_low_confidence_percent:g}%), the bound while "
                "there is no baseline, so the first day would be judged more strictly than any later one; lower the "
                "rise or raise the bound"
            )
        waits = 2 * self.canary_bake_minutes  # the canary's bake, then the whole new fleet's
        if self.deployment_timeout_minutes <= waits:
            raise ConfigError(
                f"context key 'deployment_timeout_minutes': {self.deployment_timeout_minutes} is not more than the "
                f"update's bakes (twice canary_bake_minutes = {waits}); raise it or shorten the bake"
            )

    def _check_review(self) -> None:
        """Labels come only from reviews; Step Functions refuses a task whose HeartbeatSeconds is not smaller than
        its TimeoutSeconds."""
        if self.retrain_after_labels is not None and not self.review:
            raise ConfigError(
                f"context key 'retrain_after_labels': {self.retrain_after_labels} labels can never accumulate with "
                "'review' false (reviewers write the labels); set 'review' to true or leave 'retrain_after_labels' "
                "unset"
            )
        heartbeat, timeout = self.review_heartbeat_seconds, self.review_timeout_seconds
        if heartbeat is not None and heartbeat >= timeout:
            raise ConfigError(
                f"context key 'review_heartbeat_hours': {self.review_heartbeat_hours:g} ({heartbeat} s) is not "
                f"shorter than 'review_timeout_hours' ({self.review_timeout_hours:g}, {timeout} s); "
                "shorten the heartbeat or lengthen the timeout (unset, only the timeout applies)"
            )

    @property
    def uses_canary(self) -> bool:
        """A canary needs a fleet of two or more; one instance shifts all at once, then bakes."""
        return self.endpoint_instance_count > 1

    @property
    def prefix(self) -> str:
        """Stack and resource name prefix, e.g. `scones-dev`."""
        return f"scones-{self.env_name}"

    @property
    def model_parameter_name(self) -> str:
        """SSM parameter where the approval of a model package records its artifact, which the endpoint serves."""
        return f"/scones/{self.env_name}/model-data-url"

    @property
    def threshold_parameter_name(self) -> str:
        """SSM parameter where the approval of a model package records its calibrated threshold (or `default`)."""
        return f"/scones/{self.env_name}/threshold"

    @property
    def approved_parameter_name(self) -> str:
        """SSM parameter where the approval records `<artifact> <threshold> <package ARN>` in one write, which the
        endpoint stack reads: two approvals at once cannot leave one's artifact with the other's threshold."""
        return f"/scones/{self.env_name}/approved-model"

    @property
    def serving_model_parameter_name(self) -> str:
        """SSM parameter where the endpoint stack records the artifact it serves, once its update has succeeded."""
        return f"/scones/{self.env_name}/serving/model-data-url"

    @property
    def serving_threshold_parameter_name(self) -> str:
        """SSM parameter where the endpoint stack records the served model's threshold (or `default`), once its
        update has succeeded: the threshold the filter applies."""
        return f"/scones/{self.env_name}/serving/threshold"

    @property
    def model_package_group_name(self) -> str:
        """The SageMaker model package group (registry) the training registers its models in."""
        return self.prefix

    @property
    def model_package_parameter_name(self) -> str:
        """SSM parameter where the approval records the ARN of the approved model package that serves."""
        return f"/scones/{self.env_name}/model-package-arn"

    @property
    def review_timeout_seconds(self) -> int:
        """The review task's TimeoutSeconds: `review_timeout_hours` in whole seconds, at least one."""
        return _seconds(self.review_timeout_hours)

    @property
    def review_heartbeat_seconds(self) -> int | None:
        """The review task's HeartbeatSeconds, or None when no heartbeat is configured."""
        return None if self.review_heartbeat_hours is None else _seconds(self.review_heartbeat_hours)

    @property
    def review_queue_name(self) -> str:
        """The SQS queue the classification sends review tasks to."""
        return f"{self.prefix}-review"

    @property
    def review_table_name(self) -> str:
        """The DynamoDB table of waiting review tasks and answers."""
        return f"{self.prefix}-review"

    @property
    def removal(self) -> RemovalPolicy:
        """`removal_policy` as the CDK's RemovalPolicy, for every bucket, log group and key."""
        from aws_cdk import RemovalPolicy  # here: training.fit reads this config without starting the CDK

        return RemovalPolicy.DESTROY if self.removal_policy == "destroy" else RemovalPolicy.RETAIN

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> SconesConfig:
        """Build from the CDK context (`app.node.get_all_context()`); values from `-c` arrive as strings.

        Keys that are neither a setting below nor the CDK's own are refused, naming the closest setting."""
        check_keys(context)
        given = {}
        for setting in fields(cls):
            key = context_key(setting)
            value = context.get(key)
            if value not in (None, ""):
                given[setting.name] = setting.metadata["read"](key, value)
        return cls(**given)


def _seconds(hours: float) -> int:
    return max(1, round(hours * 3600))


def context_key(setting) -> str:
    """The context key of a SconesConfig field: its name, or the key its metadata gives (`env`)."""
    return setting.metadata["key"] or setting.name


def context_keys() -> list[str]:
    return [context_key(setting) for setting in fields(SconesConfig)]


def check_keys(keys: Iterable[str]) -> None:
    """Refuse a context key that is neither a setting nor the CDK's, suggesting the closest setting."""
    valid = context_keys()
    for key in keys:
        if key in valid or key in CDK_KEYS or key.startswith(CDK_KEY_PREFIXES) or ":" in key:
            continue
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"the keys are {', '.join(valid)}"
        raise ConfigError(f"unknown context key '{key}'; {hint}")


def _hyperparameters(
    given: Mapping[str, str], algorithm: str, num_classes: int, training_images: int
) -> dict[str, str]:
    if algorithm != "builtin":
        return dict(given)
    unknown = sorted(set(given) - BUILTIN_HYPERPARAMETER_NAMES)
    if unknown:
        raise ConfigError(
            f"context key 'hyperparameters': {', '.join(unknown)} not known to the built-in "
            f"image-classification algorithm; known: {', '.join(sorted(BUILTIN_HYPERPARAMETER_NAMES))}"
        )
    return {
        **BUILTIN_HYPERPARAMETERS,
        "num_classes": str(num_classes),
        "num_training_samples": str(training_images),
        **given,
    }
