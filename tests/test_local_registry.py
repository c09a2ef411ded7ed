"""The model registry of the local mode: the model `up` trained goes through the synthesized training definition's
evaluation gate and registration into moto's model package group, is approved, and the synthesized approval state
machine records it in SSM (the local AWS as `make run` starts it, in the background)."""

import json

import boto3
import pytest
from conftest import assembly_directory, definition_of, environment_restored, synth_stacks
from test_local_classify import PASSING_METRICS as PASSING, model_archive

from local import registry
from local.__main__ import LocalRun, main
from stacks.config import SconesConfig

pytestmark = pytest.mark.slow

CONFIG = SconesConfig(env_name="dev")
BELOW = {"test": {"accuracy": 0.94, "at_threshold": {"accuracy": 0.99, "coverage": 0.51}}}


def test_the_gate_runs_from_the_state_after_the_training_job():
    definition = definition_of(synth_stacks()["Training"].state_machine)
    gate = registry.gate_definition(definition)
    assert gate["StartAt"] == definition["States"]["CreateModel"]["Next"]
    assert set(definition["States"]) - set(gate["States"]) == {"KeepLabelsChannel", "Train", "CreateModel"}


def test_the_job_description_reports_the_figures_the_metric_definitions_read():
    definition = definition_of(synth_stacks()["Training"].state_machine)
    job = registry.job_description(definition, "local-1", "s3://b/m.tar.gz", {"threshold": 0.9}, PASSING)
    assert job["ModelArtifacts"] == {"S3ModelArtifacts": "s3://b/m.tar.gz"}
    assert {metric["MetricName"]: metric["Value"] for metric in job["FinalMetricDataList"]} == {
        "threshold": 0.9,
        "test_accuracy": 0.94,
        "accepted_accuracy": 0.967391312,
        "coverage": 0.92,
    }


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The local AWS with the Data stack deployed and the colour model (threshold 0.9) trained on its data; the
    first registration done as `up` does it: (the LocalRun, the model's URL, the served package)."""
    state_dir = tmp_path_factory.mktemp("state")
    with environment_restored():
        run = LocalRun(state_dir, assembly_directory(), "dev")
        run.start_aws()
        try:
            deployment = run.deploy([run.stack("Data")])
            bucket = deployment.created(run.stack("Data"), "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
            model_dir = state_dir / "model"
            model_dir.mkdir()
            (model_dir / "model.tar.gz").write_bytes(model_archive())
            (model_dir / "metrics.json").write_text(json.dumps(PASSING))
            (model_dir / "trained-on.sha256").write_text("0" * 64)
            model_url = run.train("0" * 64, bucket)
            yield run, model_url, run.register(model_url)
        finally:
            run.aws.stop()


def parameters() -> dict:
    ssm = boto3.client("ssm")
    names = [parameter["Name"] for parameter in ssm.describe_parameters()["Parameters"]]
    return {p["Name"]: p["Value"] for p in ssm.get_parameters(Names=names)["Parameters"]} if names else {}


def held_packages() -> list[dict]:
    return registry.packages(boto3.client("sagemaker"), CONFIG.model_package_group_name)


def test_a_model_past_the_gate_is_registered_approved_and_recorded_for_the_endpoint(local):
    _, model_url, package = local
    (held,) = held_packages()
    assert held["ModelPackageArn"] == package["ModelPackageArn"]
    assert held["ModelPackageArn"].endswith(":model-package/scones-dev/1")
    assert held["ModelApprovalStatus"] == "Approved"
    assert registry.model_url_of(held) == model_url
    assert held["CustomerMetadataProperties"] == {
        "threshold": "0.9",
        "test_accuracy": "0.94",
        "accepted_accuracy": "0.967391312",
        "coverage": "0.92",
        "training_job": "local-000000000000",
    }
    assert parameters() == {
        CONFIG.model_parameter_name: model_url,
        CONFIG.threshold_parameter_name: "0.9",
        CONFIG.model_package_parameter_name: held["ModelPackageArn"],
        CONFIG.approved_parameter_name: f"{model_url} 0.9 {held['ModelPackageArn']}",
    }


def test_a_second_run_with_the_same_model_reuses_its_package(local, capsys):
    run, model_url, package = local
    again = run.register(model_url)
    assert again["ModelPackageArn"] == package["ModelPackageArn"]
    assert len(held_packages()) == 1
    assert f"reusing {package['ModelPackageArn']} (Approved)" in capsys.readouterr().out


def test_a_model_below_the_gate_fails_naming_the_figure_and_records_nothing(local):
    run, _, _ = local
    metrics = run.state_dir / "model" / "metrics.json"
    before = parameters()
    metrics.write_text(json.dumps(BELOW))
    (run.state_dir / "model" / "trained-on.sha256").write_text("1" * 64)
    try:
        other_url = run.train(
            "1" * 64, run.deployment.created(run.stack("Data"), "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
        )
        with pytest.raises(registry.RegistryError) as failed:
            run.register(other_url)
    finally:
        metrics.write_text(json.dumps(PASSING))
        (run.state_dir / "model" / "trained-on.sha256").write_text("0" * 64)
    message = str(failed.value)
    assert "ModelBelowGate: coverage 0.51 is below the floor 0.6 (gate_min_coverage)" in message
    assert message.startswith("the trained model was not registered, and nothing was recorded for the endpoint")
    assert message.endswith('`make run CONTEXT="-c gate_min_coverage=<value>"` runs with another')
    assert len(held_packages()) == 1
    assert parameters() == before


def test_registry_lists_the_packages_and_which_one_serves(local, capsys):
    run, _, package = local
    capsys.readouterr()
    assert main(["registry", "--state-dir", str(run.state_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "scones-dev: 1 package"
    header, row = lines[1].split(), lines[2].split()
    assert header[:3] == ["version", "status", "created"]
    assert row[:2] == ["1", "Approved"] and row[-1] == "serving"
    assert "0.94" in row and "0.92" in row and "0.9" in row


def test_registry_without_a_running_local_aws_says_to_start_it(tmp_path, capsys):
    assert main(["registry", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("local: error: no local AWS runs for") and "`make run`" in err


def test_with_auto_approve_the_package_is_registered_approved_and_not_approved_again(tmp_path, capsys):
    with environment_restored():
        run = LocalRun(tmp_path, assembly_directory(auto_approve="true"), "dev")
        run.start_aws()
        try:
            deployment = run.deploy([run.stack("Data")])
            bucket = deployment.created(run.stack("Data"), "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
            (tmp_path / "model").mkdir()
            (tmp_path / "model" / "model.tar.gz").write_bytes(model_archive())
            (tmp_path / "model" / "metrics.json").write_text(json.dumps(PASSING))
            (tmp_path / "model" / "trained-on.sha256").write_text("0" * 64)
            package = run.register(run.train("0" * 64, bucket))
            printed = capsys.readouterr().out
            assert f"registered {package['ModelPackageArn']} (Approved)" in printed
            assert "locally" not in printed
            assert parameters()[CONFIG.model_package_parameter_name] == package["ModelPackageArn"]
        finally:
            run.aws.stop()
