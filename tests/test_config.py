import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from stacks.config import ConfigError, SconesConfig, context_keys
from stacks.config_table import config_table


def config(**context) -> SconesConfig:
    return SconesConfig.from_context(context)


def test_defaults_are_the_classic_project_on_pytorch():
    default = config()
    assert default.classes == ("bicycle", "motorcycle")
    assert default.endpoint_name == "scones-dev"
    assert default.threshold is None  # the trained model's own, read by the filter from SSM
    assert default.threshold_parameter_name == "/scones/dev/threshold"
    assert default.capture_sampling_percentage == 100
    assert default.training_algorithm == "pytorch"
    assert default.removal_policy == "destroy"
    assert default.account is None and default.region is None


def test_command_line_strings_are_typed():
    given = config(
        env="prod",
        threshold="0.8",
        classes="tank, tractor",
        endpoint_instance_count="3",
        hyperparameters='{"epochs": 12}',
    )
    assert given.threshold == 0.8
    assert given.classes == ("tank", "tractor")
    assert given.endpoint_instance_count == 3
    assert given.hyperparameters == {"epochs": "12"}
    assert given.removal_policy == "retain"
    assert given.endpoint_name == "scones-prod"


def test_builtin_gets_the_classic_hyperparameters_with_overrides():
    builtin = config(
        training_algorithm="builtin",
        hyperparameters={"epochs": 5},
        training_images="1800",
        classes="bicycle,motorcycle,tank",
    )
    assert builtin.hyperparameters["epochs"] == "5"
    assert builtin.hyperparameters["num_layers"] == "152"
    assert builtin.hyperparameters["num_classes"] == "3"
    assert builtin.hyperparameters["num_training_samples"] == "1800"
    assert builtin.training_instance_type == "ml.p3.2xlarge"


@pytest.mark.parametrize(
    "context, key",
    [
        ({"env": "staging"}, "'env'"),
        ({"threshold": "1.5"}, "'threshold'"),
        ({"threshold": "high"}, "'threshold'"),
        ({"capture_sampling_percentage": "101"}, "'capture_sampling_percentage'"),
        ({"classes": "bicycle,unicorn"}, "unicorn"),
        ({"classes": "bicycle"}, "'classes'"),
        ({"training_algorithm": "xgboost"}, "'training_algorithm'"),
        ({"training_algorithm": "builtin", "hyperparameters": '{"epoch": 3}'}, "epoch"),
        ({"hyperparameters": "epochs=3"}, "'hyperparameters'"),
        ({"endpoint_instance_type": "m5.large"}, "'endpoint_instance_type'"),
        ({"account": "12345"}, "'account'"),
        ({"alarm_email": "ops"}, "'alarm_email'"),
        ({"model_data_url": "https://bucket/model.tar.gz"}, "'model_data_url'"),
        ({"removal_policy": "snapshot"}, "'removal_policy'"),
        ({"batch_tolerated_failure_percent": "101"}, "'batch_tolerated_failure_percent'"),
    ],
)
def test_invalid_values_fail_naming_the_key(context, key):
    with pytest.raises(ConfigError, match=key):
        config(**context)


def test_a_misspelt_key_is_refused_naming_the_closest_key():
    with pytest.raises(ConfigError, match=r"^unknown context key 'threshhold'; did you mean 'threshold'\?$"):
        config(threshhold="0.5")
    with pytest.raises(ConfigError, match=r"did you mean 'capture_sampling_percentage'\?$"):
        config(**{"capture-sampling-percentage": "0"})


def test_an_unknown_key_with_no_close_one_is_refused_listing_the_keys():
    with pytest.raises(ConfigError, match=r"^unknown context key 'colour'; the keys are env, account, region, "):
        config(colour="red")


def test_the_cdks_own_context_keys_are_accepted():
    """What `npx cdk synth` puts in the context besides ours: feature flags, CLI settings, cached lookups."""
    cdk_keys = {
        "@aws-cdk/core:checkSecretUsage": True,
        "aws:cdk:enable-path-metadata": True,
        "aws:cdk:bundling-stacks": ["**"],
        "@aws-cdk/core:failSynthOnValidationErrors": False,
        "acknowledged-issue-numbers": [32775],
        "cdk-migrate": True,
        "availability-zones:account=123456789012:region=eu-west-1": ["eu-west-1a"],
    }
    assert config(**cdk_keys) == SconesConfig()


def test_cdk_json_holds_only_cdk_feature_flags():
    context = json.loads((ROOT / "cdk.json").read_text())["context"]
    assert context and all(key.startswith("@aws-cdk/") for key in context)


def test_derived_defaults_follow_the_environment_and_algorithm():
    assert (SconesConfig(env_name="prod").endpoint_name, SconesConfig(env_name="prod").removal_policy) == (
        "scones-prod",
        "retain",
    )
    assert SconesConfig(endpoint_name="bikes", removal_policy="destroy", env_name="prod").removal_policy == "destroy"
    assert SconesConfig(training_algorithm="builtin").training_instance_type == "ml.p3.2xlarge"


def test_removal_is_the_cdk_removal_policy():
    from aws_cdk import RemovalPolicy

    assert (config().removal, config(env="prod").removal) == (RemovalPolicy.DESTROY, RemovalPolicy.RETAIN)
    assert config(env="prod", removal_policy="destroy").removal == RemovalPolicy.DESTROY


def test_config_table_has_one_row_per_key_with_its_default():
    rows = config_table().splitlines()
    assert rows[:2] == ["| key | default | meaning |", "|---|---|---|"]
    assert len(rows) == 2 + len(context_keys())
    assert (
        "| `threshold` | unset | the filter's confidence threshold, overriding the served model's own; unset, the "
        "filter applies the threshold the training calibrated, which the endpoint stack records in SSM "
        "`/scones/<env>/serving/threshold` once it serves the model (0.93 while none is recorded) |"
    ) in config_table()
    assert "| `removal_policy` | `destroy` (`prod`: `retain`) |" in config_table()
    assert "| `training_instance_type` | `ml.m5.xlarge` (`builtin`: `ml.p3.2xlarge`) |" in config_table()
    assert "| `classes` | `bicycle,motorcycle` |" in config_table()


def test_readme_configuration_table_is_the_rendered_one():
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- config-table -->\n(.*?)<!-- /config-table -->", readme, re.S)
    assert found, "README.md has no <!-- config-table --> ... <!-- /config-table --> markers"
    assert found.group(1) == config_table(), (
        "README's configuration table is stale: paste `python -c 'from stacks.config_table import config_table; "
        'print(config_table(), end="")\'` between the markers'
    )


def _synth(*context: str) -> subprocess.CompletedProcess:
    """`app.py` as `npx cdk synth -c ...` runs it, in an environment without the Makefile's JSII_ settings."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("JSII_", "CDK_"))}
    environment["CDK_CONTEXT_JSON"] = json.dumps(dict(pair.split("=", 1) for pair in context))
    return subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "context, message",
    [
        (["threshold=2"], "scones: context key 'threshold': 2.0 is outside [0.0, 1.0]\n"),
        (["threshhold=0.5"], "scones: unknown context key 'threshhold'; did you mean 'threshold'?\n"),
    ],
)
def test_the_app_answers_a_config_error_with_one_line_and_no_traceback_or_node_warning(context, message):
    run = _synth(*context)
    assert (run.returncode, run.stderr, run.stdout) == (1, message, "")


def test_review_is_on_by_default_waiting_a_day_without_heartbeat():
    default = config()
    assert (default.review, default.review_timeout_hours, default.review_heartbeat_hours) == (True, 24, None)
    assert (default.review_timeout_seconds, default.review_heartbeat_seconds) == (86400, None)
    assert (default.review_queue_name, default.review_table_name) == ("scones-dev-review", "scones-dev-review")
    assert config(env="prod").review_queue_name == "scones-prod-review"
    assert config(review="false").review is False
    assert config(review="True").review is True


def test_review_hours_take_fractions_and_round_to_whole_seconds_of_at_least_one():
    given = config(review_timeout_hours="0.0006", review_heartbeat_hours="0.0003")
    assert (given.review_timeout_seconds, given.review_heartbeat_seconds) == (2, 1)
    assert config(review_timeout_hours="0.0001").review_timeout_seconds == 1
    assert config(review_timeout_hours="1.5").review_timeout_seconds == 5400
    assert config(review_timeout_hours="8736").review_timeout_seconds == 8736 * 3600  # + the batch's day: a year
    assert config(review_timeout_hours=2, review_heartbeat_hours=1.99).review_heartbeat_seconds == 7164


@pytest.mark.parametrize(
    "context, message",
    [
        ({"review": "maybe"}, r"'review': 'maybe' is not true or false"),
        ({"review_timeout_hours": "0"}, r"'review_timeout_hours': 0.0 is outside \[0.0001, 8736\]"),
        ({"review_timeout_hours": "8737"}, r"'review_timeout_hours': 8737.0 is outside"),
        ({"review_timeout_hours": "a day"}, r"'review_timeout_hours': 'a day' is not a float"),
        ({"review_heartbeat_hours": "-1"}, r"'review_heartbeat_hours': -1.0 is outside"),
        (
            {"review_heartbeat_hours": "25"},
            r"^context key 'review_heartbeat_hours': 25 \(90000 s\) is not shorter than 'review_timeout_hours' "
            r"\(24, 86400 s\); shorten the heartbeat or lengthen the timeout \(unset, only the timeout applies\)$",
        ),
        # Step Functions wants the heartbeat strictly shorter, in whole seconds
        ({"review_heartbeat_hours": "24"}, r"'review_heartbeat_hours': 24 \(86400 s\) is not shorter"),
        ({"review_timeout_hours": "0.0003", "review_heartbeat_hours": "0.0002"}, r"\(1 s\) is not shorter"),
    ],
)
def test_bad_review_settings_fail_naming_the_key(context, message):
    with pytest.raises(ConfigError, match=message):
        config(**context)
