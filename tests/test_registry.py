"""The model registry: its group, the approval rule and state machine (run on moto's engine), their
least-privilege roles, and `python -m training.fit approve` against moto's SageMaker."""

import json
import re

import boto3
import pytest
from conftest import definition_of, synth_stacks, template
from moto import mock_aws
from test_training_stack import ARTIFACT, run_definition

from stacks.config import ConfigError, SconesConfig
from stacks.registry import DEFAULT_THRESHOLD_VALUE
from training import fit, registry

THRESHOLD, MODEL, PACKAGE = "/scones/dev/threshold", "/scones/dev/model-data-url", "/scones/dev/model-package-arn"
APPROVED = "/scones/dev/approved-model"  # what the endpoint stack reads: the three values in one write


def test_one_model_package_group_per_environment_kept_in_prod():
    for env, policy in (("dev", "Delete"), ("prod", "Retain")):
        (group,) = template("Training", env=env).find_resources("AWS::SageMaker::ModelPackageGroup").values()
        assert group["Properties"]["ModelPackageGroupName"] == f"scones-{env}"
        assert (group["DeletionPolicy"], group["UpdateReplacePolicy"]) == (policy, policy)


def test_an_approval_of_this_groups_package_starts_the_approval_state_machine():
    stack = synth_stacks()["Training"]
    (rule,) = template("Training").find_resources("AWS::Events::Rule").values()
    assert rule["Properties"]["EventPattern"] == {
        "source": ["aws.sagemaker"],
        "detail-type": ["SageMaker Model Package State Change"],
        "detail": {"ModelPackageGroupName": ["scones-dev"], "ModelApprovalStatus": ["Approved"]},
    }
    (target,) = rule["Properties"]["Targets"]
    approval = stack.registry.approval.state_machine
    assert target["Arn"] == {"Ref": stack.get_logical_id(approval.node.default_child)}
    assert approval.node.default_child.state_machine_name == "scones-dev-approval"


def _statements(logical_prefix: str) -> list[tuple[str, list[str]]]:
    """(action, resource ARN tails) of the policy of the role whose logical id starts with `logical_prefix`."""
    (policy,) = [
        resource
        for logical_id, resource in template("Training").find_resources("AWS::IAM::Policy").items()
        if logical_id.startswith(logical_prefix)
    ]
    tail = lambda arn: arn["Fn::Join"][1][-1] if isinstance(arn, dict) else arn  # noqa: E731
    return sorted(
        (
            s["Action"] if isinstance(s["Action"], str) else ",".join(s["Action"]),
            sorted(map(tail, s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]])),
        )
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
    )


def test_the_approval_role_may_describe_this_groups_packages_and_write_its_four_parameters_only():
    statements = [
        s
        for s in _statements("RegistryApprovalStateMachineRoleDefaultPolicy")
        if "xray" not in s[0] and "logs:" not in s[0]
    ]
    assert statements == [
        ("sagemaker:describeModelPackage", [":model-package/scones-dev/*"]),
        (
            "ssm:putParameter",
            [
                ":parameter/scones/dev/approved-model",
                ":parameter/scones/dev/model-data-url",
                ":parameter/scones/dev/model-package-arn",
                ":parameter/scones/dev/threshold",
            ],
        ),
    ]


def test_the_rule_may_start_the_approval_state_machine_only():
    stack = synth_stacks()["Training"]
    (policy,) = [
        resource
        for logical_id, resource in template("Training").find_resources("AWS::IAM::Policy").items()
        if logical_id.startswith("RegistryApprovalStateMachineEventsRole")
    ]
    assert policy["Properties"]["PolicyDocument"]["Statement"] == [
        {
            "Action": "states:StartExecution",
            "Effect": "Allow",
            "Resource": {"Ref": stack.get_logical_id(stack.registry.approval.state_machine.node.default_child)},
        }
    ]


def approval_event(arn: str) -> dict:
    """What EventBridge delivers when a package is approved (the fields the definition reads)."""
    return {
        "source": "aws.sagemaker",
        "detail-type": "SageMaker Model Package State Change",
        "detail": {"ModelPackageGroupName": "scones-dev", "ModelPackageArn": arn, "ModelApprovalStatus": "Approved"},
    }


def register(sagemaker, status: str, metadata: dict | None) -> str:
    return sagemaker.create_model_package(
        ModelPackageGroupName="scones-dev",
        ModelApprovalStatus=status,
        InferenceSpecification={
            "Containers": [{"Image": "pytorch-inference:2.6-cpu-py312", "ModelDataUrl": ARTIFACT}],
            "SupportedContentTypes": ["image/png"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
        **({"CustomerMetadataProperties": metadata} if metadata else {}),
    )["ModelPackageArn"]


def run_approval(status: str, metadata: dict | None, before: dict | None = None) -> tuple[dict, dict]:
    definition = definition_of(synth_stacks()["Training"].registry.approval.state_machine)

    def setup(sagemaker, ssm):
        for name, value in (before or {}).items():
            ssm.put_parameter(Name=name, Value=value, Type="String")
        return approval_event(register(sagemaker, status, metadata))

    return run_definition(definition, {}, setup)


def test_an_approved_package_becomes_the_served_model_and_threshold():
    described, held = run_approval(
        "Approved", {"threshold": "0.843891978263855", "test_accuracy": "0.94"}, before={THRESHOLD: "0.5"}
    )
    assert described["status"] == "SUCCEEDED", described
    arn = held["packages"][0]["ModelPackageArn"]
    assert held["parameters"] == {
        MODEL: ARTIFACT,
        THRESHOLD: "0.843891978263855",
        PACKAGE: arn,
        APPROVED: f"{ARTIFACT} 0.843891978263855 {arn}",
    }
    assert json.loads(described["output"]) == {"ModelPackageArn": arn, "ModelDataUrl": ARTIFACT}


@pytest.mark.parametrize("before", [{THRESHOLD: "0.844"}, {}], ids=["an older threshold", "none"])
def test_a_package_without_a_threshold_leaves_the_filter_its_default(before):
    described, held = run_approval("Approved", {"validation_accuracy": "0.95"}, before=before)
    assert described["status"] == "SUCCEEDED", described
    assert held["parameters"][THRESHOLD] == DEFAULT_THRESHOLD_VALUE
    assert held["parameters"][MODEL] == ARTIFACT
    assert held["parameters"][APPROVED].split(" ")[:2] == [ARTIFACT, DEFAULT_THRESHOLD_VALUE]


def test_an_event_for_a_package_no_longer_approved_records_nothing():
    described, held = run_approval("Rejected", {"threshold": "0.9"}, before={MODEL: "s3://data/models/old.tar.gz"})
    assert described["status"] == "SUCCEEDED"
    assert json.loads(described["output"])["ModelApprovalStatus"] == "Rejected"
    assert held["parameters"] == {MODEL: "s3://data/models/old.tar.gz"}


def test_a_package_approved_with_approve_serves_with_the_threshold_it_was_registered_with():
    definition = definition_of(synth_stacks()["Training"].registry.approval.state_machine)

    def setup(sagemaker, ssm):
        arn = register(sagemaker, "PendingManualApproval", {"threshold": "0.844", "coverage": "0.92"})
        assert registry.approve(package=arn, sagemaker=sagemaker)["ModelApprovalStatus"] == "Approved"
        return approval_event(arn)

    described, held = run_definition(definition, {}, setup)
    assert described["status"] == "SUCCEEDED", described
    assert held["parameters"][THRESHOLD] == "0.844"
    assert held["packages"][0]["CustomerMetadataProperties"] == {"threshold": "0.844", "coverage": "0.92"}


# --------------------------------------------------------------------------- python -m training.fit approve


@pytest.fixture
def sagemaker(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SAGEMAKER", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield boto3.client("sagemaker", "us-east-1")


def run_approve(capsys, *arguments) -> tuple[int, str, str]:
    try:
        fit.main(["approve", *arguments])
        status = 0
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_approve_latest_approves_the_newest_package(sagemaker, capsys):
    sagemaker.create_model_package_group(ModelPackageGroupName="scones-dev")
    first = register(sagemaker, "PendingManualApproval", {"threshold": "0.9"})
    newest = register(sagemaker, "PendingManualApproval", {"threshold": "0.844", "test_accuracy": "0.94"})
    status, out, err = run_approve(capsys, "--latest")
    assert (status, out) == (0, newest + "\n")
    assert f"{newest} is Approved (test_accuracy 0.94, threshold 0.844)" in err
    assert 'make deploy STACKS="SconesDevEndpoint"' in err
    statuses = {
        arn: sagemaker.describe_model_package(ModelPackageName=arn)["ModelApprovalStatus"] for arn in (first, newest)
    }
    assert statuses == {first: "PendingManualApproval", newest: "Approved"}


def test_approve_a_named_package(sagemaker, capsys):
    sagemaker.create_model_package_group(ModelPackageGroupName="scones-dev")
    first = register(sagemaker, "PendingManualApproval", None)
    register(sagemaker, "PendingManualApproval", None)
    status, out, _ = run_approve(capsys, "--package", first)
    assert (status, out) == (0, first + "\n")
    assert sagemaker.describe_model_package(ModelPackageName=first)["ModelApprovalStatus"] == "Approved"


@pytest.mark.parametrize(
    "groups, arguments, message",
    [
        ([], ["--latest"], "no model registry scones-dev: deploy the training stack with `make deploy"),
        (["scones-dev"], ["--latest"], "the model registry scones-dev holds no package yet: train one"),
        (["scones-dev", "scones-prod"], ["--latest", "--env", "prod"], "the model registry scones-prod holds no"),
        (["scones-prod"], ["--package", "PROD"], "is a package of scones-prod, not of scones-dev: pass --env"),
    ],
    ids=["no group", "no package", "another env's empty group", "another env's package"],
)
def test_approve_refuses_naming_what_to_do(sagemaker, capsys, groups, arguments, message):
    for group in groups:
        sagemaker.create_model_package_group(ModelPackageGroupName=group)
    if "PROD" in arguments:
        prod = sagemaker.create_model_package(
            ModelPackageGroupName="scones-prod",
            InferenceSpecification={
                "Containers": [{"Image": "x", "ModelDataUrl": ARTIFACT}],
                "SupportedContentTypes": ["image/png"],
                "SupportedResponseMIMETypes": ["application/json"],
            },
        )["ModelPackageArn"]
        arguments = [prod if argument == "PROD" else argument for argument in arguments]
    status, out, err = run_approve(capsys, *arguments)
    assert (status, out) == (2, "")
    assert err.startswith("approve: error: ") and message in err, err


def test_approve_needs_a_package_or_latest(capsys):
    status, _, err = run_approve(capsys)
    assert status == 2 and "one of the arguments --package --latest is required" in err


def test_approve_is_refused_no_credentials_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(registry, "approve", lambda *a: (_ for _ in ()).throw(registry.ApproveError("x")))
    status, _, err = run_approve(capsys, "--latest")
    assert (status, err) == (2, "approve: error: x\n")


@pytest.mark.parametrize(
    "context, message",
    [
        ({"gate_min_coverage": "1.5"}, "context key 'gate_min_coverage': 1.5 is outside [0.0, 1.0]"),
        ({"gate_min_accuracy": "high"}, "context key 'gate_min_accuracy': 'high' is not a float"),
        ({"auto_approve": "yes"}, "context key 'auto_approve': 'yes' is not true or false"),
    ],
)
def test_bad_gate_settings_fail_at_synth_naming_the_key(context, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        SconesConfig.from_context(context)


def test_fit_says_what_the_training_registered_and_how_to_approve_it():
    arn = "arn:aws:sagemaker:us-east-1:123456789012:model-package/scones-prod/3"
    output = {"S3ModelArtifacts": ARTIFACT, "ModelPackageArn": arn, "ModelApprovalStatus": "PendingManualApproval"}
    assert fit.registration_lines({"output": json.dumps(output)}, "prod") == [
        f"registered {arn} (PendingManualApproval)",
        "approve it with `python -m training.fit approve --latest --env prod`",
    ]
    approved = {**output, "ModelApprovalStatus": "Approved"}
    assert fit.registration_lines({"output": json.dumps(approved)}, "dev") == [f"registered {arn} (Approved)"]


def test_fit_reports_a_model_below_the_gate_with_the_gates_cause():
    described = {
        "executionArn": "arn:aws:states:us-east-1:123456789012:execution:scones-dev-training:fit-1",
        "status": "FAILED",
        "error": "ModelBelowGate",
        "cause": "coverage 0.51 is below the floor 0.6 (gate_min_coverage)",
    }
    job = {"TrainingJobName": "scones-dev-1", "TrainingJobStatus": "Completed"}
    assert fit.failure_reason(None, described, job) == (
        "ModelBelowGate: coverage 0.51 is below the floor 0.6 (gate_min_coverage)"
    )
