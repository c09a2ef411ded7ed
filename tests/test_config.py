import pytest

from stacks.config import ConfigError, SconesConfig


def config(**context) -> SconesConfig:
    return SconesConfig.from_context(context.get)


def test_defaults_are_the_classic_project_on_pytorch():
    default = config()
    assert default.classes == ("bicycle", "motorcycle")
    assert default.endpoint_name == "scones-dev"
    assert default.threshold == 0.93
    assert default.capture_sampling_percentage == 100
    assert default.training_algorithm == "pytorch"
    assert default.removal_policy == "destroy"
    assert default.account is None and default.region is None


def test_command_line_strings_are_typed():
    given = config(env="prod", threshold="0.8", classes="tank, tractor", endpoint_instance_count="3",
                   hyperparameters='{"epochs": 12}')
    assert given.threshold == 0.8
    assert given.classes == ("tank", "tractor")
    assert given.endpoint_instance_count == 3
    assert given.hyperparameters == {"epochs": "12"}
    assert given.removal_policy == "retain"
    assert given.endpoint_name == "scones-prod"


def test_builtin_gets_the_classic_hyperparameters_with_overrides():
    builtin = config(training_algorithm="builtin", hyperparameters={"epochs": 5}, training_images="1800",
                     classes="bicycle,motorcycle,tank")
    assert builtin.hyperparameters["epochs"] == "5"
    assert builtin.hyperparameters["num_layers"] == "152"
    assert builtin.hyperparameters["num_classes"] == "3"
    assert builtin.hyperparameters["num_training_samples"] == "1800"
    assert builtin.training_instance_type == "ml.p3.2xlarge"


@pytest.mark.parametrize("context, key", [
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
])
def test_invalid_values_fail_naming_the_key(context, key):
    with pytest.raises(ConfigError, match=key):
        config(**context)
