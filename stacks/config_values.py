"""How one CDK context value is read and checked for a `SconesConfig` field (stacks/config.py): each reader
takes the key (for its error message) and the given value, a string from `-c` or any JSON value from cdk.json,
never None or "" (those mean "not given": the field keeps its default)."""

import json
import re
from collections.abc import Callable
from typing import Any

CIFAR100_FINE_LABELS = tuple(
    """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
    can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
    dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
    lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
    pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
    seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
    tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
    worm
    """.split()
)


class ConfigError(ValueError):
    """A context value is missing or invalid; the message names the key."""


def one_of(*choices: str) -> Callable[[str, Any], str]:
    def read(key: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"context key '{key}': {value!r} is not one of {', '.join(choices)}")
        return value

    return read


def matching(pattern: str) -> Callable[[str, Any], str]:
    def read(key: str, value: Any) -> str:
        if not re.fullmatch(pattern, str(value)):
            raise ConfigError(f"context key '{key}': {value!r} does not match {pattern}")
        return str(value)

    return read


def number(convert: type, low: float, high: float | None = None) -> Callable[[str, Any], Any]:
    def read(key: str, value: Any):
        try:
            number = convert(value)
        except (TypeError, ValueError):
            raise ConfigError(f"context key '{key}': {value!r} is not a {convert.__name__}") from None
        if number < low or (high is not None and number > high):
            raise ConfigError(f"context key '{key}': {number} is outside [{low}, {high if high is not None else '∞'}]")
        return number

    return read


def boolean(key: str, value: Any) -> bool:
    if str(value).lower() not in ("true", "false"):
        raise ConfigError(f"context key '{key}': {value!r} is not true or false")
    return str(value).lower() == "true"


def class_names(key: str, value: Any) -> tuple[str, ...]:
    names = tuple(str(name).strip() for name in (value.split(",") if isinstance(value, str) else value))
    unknown = [name for name in names if name not in CIFAR100_FINE_LABELS]
    if unknown:
        raise ConfigError(
            f"context key '{key}': unknown CIFAR-100 class {', '.join(unknown)}; "
            f"valid names: {', '.join(CIFAR100_FINE_LABELS)}"
        )
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"context key '{key}': give at least two distinct class names")
    return names


def json_object(key: str, value: Any) -> dict[str, str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"context key '{key}': not a JSON object, e.g. '{{\"epochs\": 30}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"context key '{key}': must be a JSON object of name to value")
    for name, setting in value.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(name)) or isinstance(setting, (dict, list)):
            raise ConfigError(f"context key '{key}': {name!r}={setting!r} is not a name=scalar pair")
    return {name: str(setting) for name, setting in value.items()}


def schedule(key: str, value: Any) -> str:
    text = str(value).strip()
    rate = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)", text)
    if rate and (int(rate.group(1)) == 1) == (not rate.group(2).endswith("s")) and int(rate.group(1)) > 0:
        return text
    cron = re.fullmatch(r"cron\(([^()]+)\)", text)
    if cron and len(cron.group(1).split()) == 6:
        return text
    raise ConfigError(
        f"context key '{key}': {value!r} is not an EventBridge schedule; give e.g. 'rate(7 days)', 'rate(1 day)' "
        "or 'cron(0 3 ? * MON *)' (six fields: minutes hours day-of-month month day-of-week year)"
    )
