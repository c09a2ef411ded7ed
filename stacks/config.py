"""One typed configuration for every stack, read from cdk.json context.

Every key can be overridden on the command line: `npx cdk synth -c env=prod -c threshold=0.9`.
Invalid values fail at synth with a ConfigError naming the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

ALGORITHMS = ("pytorch", "builtin")
REMOVAL_POLICIES = ("destroy", "retain")
CIFAR100_FINE_LABELS = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

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
    "num_classes", "num_training_samples", "optimizer", "momentum", "weight_decay", "lr_scheduler_factor",
    "lr_scheduler_step", "augmentation_type", "top_k", "precision_dtype", "early_stopping",
    "early_stopping_patience", "early_stopping_min_epochs", "early_stopping_tolerance",
}


class ConfigError(ValueError):
    """A context value is missing or invalid; the message names the key."""


def stack_name(env_name: str, stack: str) -> str:
    """The CloudFormation stack name app.py gives a stack, e.g. `SconesDevTraining` for ("dev", "Training")."""
    return f"Scones{env_name.title()}{stack}"


@dataclass(frozen=True)
class SconesConfig:
    env_name: str = "dev"
    account: str | None = None
    region: str | None = None
    classes: tuple[str, ...] = ("bicycle", "motorcycle")
    endpoint_name: str = "scones-dev"
    endpoint_instance_type: str = "ml.m5.large"
    endpoint_instance_count: int = 1
    endpoint_max_instances: int = 2
    invocations_per_instance_target: int = 600
    capture_sampling_percentage: int = 100
    capture_retention_days: int = 30
    threshold: float = 0.93
    training_algorithm: str = "pytorch"
    training_instance_type: str = "ml.m5.xlarge"
    training_max_runtime_minutes: int = 60
    training_images: int = 900
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    model_data_url: str | None = None
    removal_policy: str = "destroy"
    alarm_email: str | None = None
    low_confidence_alarm_percent: float = 40.0
    expect_traffic: bool = False
    batch_tolerated_failure_percent: float = 5.0

    @property
    def prefix(self) -> str:
        """Stack and resource name prefix, e.g. `scones-dev`."""
        return f"scones-{self.env_name}"

    @property
    def model_parameter_name(self) -> str:
        """SSM parameter where the training state machine records the newest model artifact."""
        return f"/scones/{self.env_name}/model-data-url"

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> "SconesConfig":
        """Build from `node.try_get_context`; values from `-c` arrive as strings."""
        env_name = _choice(get, "env", ("dev", "prod"), "dev")
        algorithm = _choice(get, "training_algorithm", ALGORITHMS, "pytorch")
        classes = _classes(get("classes"))
        training_images = _int(get, "training_images", 900, 1)
        return cls(
            env_name=env_name,
            account=_optional(get, "account", r"\d{12}"),
            region=_optional(get, "region", r"[a-z]{2}(-[a-z]+)+-\d"),
            classes=classes,
            endpoint_name=_optional(get, "endpoint_name", r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}") or f"scones-{env_name}",
            endpoint_instance_type=_instance_type(get, "endpoint_instance_type", "ml.m5.large"),
            endpoint_instance_count=_int(get, "endpoint_instance_count", 1, 1),
            endpoint_max_instances=_int(get, "endpoint_max_instances", 2, 1),
            invocations_per_instance_target=_int(get, "invocations_per_instance_target", 600, 1),
            capture_sampling_percentage=_int(get, "capture_sampling_percentage", 100, 0, 100),
            capture_retention_days=_int(get, "capture_retention_days", 30, 1),
            threshold=_float(get, "threshold", 0.93, 0.0, 1.0),
            training_algorithm=algorithm,
            training_instance_type=_instance_type(
                get, "training_instance_type", "ml.m5.xlarge" if algorithm == "pytorch" else "ml.p3.2xlarge"
            ),
            training_max_runtime_minutes=_int(get, "training_max_runtime_minutes", 60, 1, 28 * 24 * 60),
            training_images=training_images,
            hyperparameters=_hyperparameters(get("hyperparameters"), algorithm, len(classes), training_images),
            model_data_url=_optional(get, "model_data_url", r"s3://[a-z0-9.\-]{3,63}/.+\.tar\.gz"),
            removal_policy=_choice(get, "removal_policy", REMOVAL_POLICIES, "retain" if env_name == "prod" else "destroy"),
            alarm_email=_optional(get, "alarm_email", r"[^@\s]+@[^@\s]+\.[^@\s]+"),
            low_confidence_alarm_percent=_float(get, "low_confidence_alarm_percent", 40.0, 0.0, 100.0),
            expect_traffic=_bool(get, "expect_traffic", False),
            batch_tolerated_failure_percent=_float(get, "batch_tolerated_failure_percent", 5.0, 0.0, 100.0),
        )


def _given(get: Callable[[str], Any], key: str) -> Any:
    value = get(key)
    return None if value in (None, "") else value


def _choice(get, key: str, choices: tuple[str, ...], default: str) -> str:
    value = _given(get, key) or default
    if value not in choices:
        raise ConfigError(f"context key '{key}': {value!r} is not one of {', '.join(choices)}")
    return value


def _optional(get, key: str, pattern: str) -> str | None:
    value = _given(get, key)
    if value is not None and not re.fullmatch(pattern, str(value)):
        raise ConfigError(f"context key '{key}': {value!r} does not match {pattern}")
    return None if value is None else str(value)


def _bool(get, key: str, default: bool) -> bool:
    value = _given(get, key)
    if value is None:
        return default
    if str(value).lower() not in ("true", "false"):
        raise ConfigError(f"context key '{key}': {value!r} is not true or false")
    return str(value).lower() == "true"


def _instance_type(get, key: str, default: str) -> str:
    return _optional(get, key, r"ml\.[a-z0-9]+\.[0-9]*x?large|ml\.[a-z0-9]+\.(medium|small)") or default


def _number(get, key: str, default, convert, low, high):
    value = _given(get, key)
    if value is None:
        return default
    try:
        number = convert(value)
    except (TypeError, ValueError):
        raise ConfigError(f"context key '{key}': {value!r} is not a {convert.__name__}") from None
    if number < low or (high is not None and number > high):
        raise ConfigError(f"context key '{key}': {number} is outside [{low}, {high if high is not None else '∞'}]")
    return number


def _int(get, key: str, default: int, low: int, high: int | None = None) -> int:
    return _number(get, key, default, int, low, high)


def _float(get, key: str, default: float, low: float, high: float) -> float:
    return _number(get, key, default, float, low, high)


def _classes(value: Any) -> tuple[str, ...]:
    if value in (None, ""):
        return ("bicycle", "motorcycle")
    names = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(name).strip() for name in names)
    unknown = [name for name in names if name not in CIFAR100_FINE_LABELS]
    if unknown:
        raise ConfigError(f"context key 'classes': unknown CIFAR-100 class {', '.join(unknown)}; "
                          f"valid names: {', '.join(CIFAR100_FINE_LABELS)}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError("context key 'classes': give at least two distinct class names")
    return names


def _hyperparameters(value: Any, algorithm: str, num_classes: int, training_images: int) -> dict[str, str]:
    if value in (None, ""):
        given = {}
    elif isinstance(value, str):
        try:
            given = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError("context key 'hyperparameters': not a JSON object, e.g. '{\"epochs\": 30}'") from None
    else:
        given = value
    if not isinstance(given, dict):
        raise ConfigError("context key 'hyperparameters': must be a JSON object of name to value")
    for name, setting in given.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(name)) or isinstance(setting, (dict, list)):
            raise ConfigError(f"context key 'hyperparameters': {name!r}={setting!r} is not a name=scalar pair")
    if algorithm == "builtin":
        unknown = sorted(set(given) - BUILTIN_HYPERPARAMETER_NAMES)
        if unknown:
            raise ConfigError(f"context key 'hyperparameters': {', '.join(unknown)} not known to the built-in "
                              f"image-classification algorithm; known: {', '.join(sorted(BUILTIN_HYPERPARAMETER_NAMES))}")
        defaults = {**BUILTIN_HYPERPARAMETERS, "num_classes": str(num_classes),
                    "num_training_samples": str(training_images)}
    else:
        defaults = {}
    return {**defaults, **{name: str(setting) for name, setting in given.items()}}
