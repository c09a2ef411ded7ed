import json
import re

import boto3
import pytest
from conftest import definition_of, synth_stacks, template
from moto import mock_aws

from local.executions import run_execution
from stacks import registry
from training import photos


def training_job_parameters(**context) -> tuple[dict, dict]:
    """The training state machine's states and its CreateTrainingJob parameters."""
    states = definition_of(synth_stacks(**context)["Training"].state_machine)["States"]
    return states, states["Train"]["Parameters"]


def test_training_runs_then_gates_and_registers_the_model():
    states, _ = training_job_parameters()
    assert states["Train"]["Resource"].endswith(":states:::sagemaker:createTrainingJob.sync")
    assert states["Train"]["Next"] == "CreateModel"
    assert states["CreateModel"]["Next"] == "HasMetrics"
    assert states["RegisterModel"]["Resource"].endswith(":states:::aws-sdk:sagemaker:createModelPackage")
    assert states["RegisterModel"]["Next"] == "Registered"
    assert states["Registered"]["Next"] == "Trained"
    assert states["Trained"]["Type"] == "Succeed"


def test_pytorch_script_mode_job():
    _, job = training_job_parameters(training_algorithm="pytorch")
    assert job["AlgorithmSpecification"]["TrainingImage"] == "<FindInMap:PytorchTrainingImage>"
    channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
    assert set(channels) == {
        "train", "validation", "train_lst", "validation_lst", "test", "test_lst", "labels", "code"
    }  # fmt: skip
    uri = lambda name: channels[name]["DataSource"]["S3DataSource"]["S3Uri"]  # noqa: E731
    assert uri("labels").endswith("/labels/")
    assert all(uri(name).startswith("s3://") for name in channels)
    assert uri("train").endswith("/train") and uri("train_lst").endswith("/train.lst")
    assert uri("validation_lst").endswith("/validation.lst")
    assert uri("test").endswith("/test") and uri("test_lst").endswith("/test.lst")
    submit_directory = job["HyperParameters"]["sagemaker_submit_directory"]
    assert submit_directory.startswith("/opt/ml/input/data/code/") and submit_directory.endswith(".gz")
    assert job["HyperParameters"]["sagemaker_program"] == "train.py"
    assert job["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert job["OutputDataConfig"]["S3OutputPath"].startswith("s3://")
    assert job["OutputDataConfig"]["S3OutputPath"].endswith("/models/")


def test_the_labels_channel_is_never_empty_and_the_marker_is_all_the_machine_may_write_there():
    """SageMaker refuses a channel without objects: before each pytorch training the state machine writes
    labels/.keep, which training/photos.py skips."""
    states, _ = training_job_parameters()
    keep = states["KeepLabelsChannel"]
    assert keep["Resource"].endswith(":states:::aws-sdk:s3:putObject")
    assert keep["Parameters"]["Key"] == f"labels/{photos.MARKER}" and keep["Next"] == "Train"
    assert keep["ResultPath"] is None
    statements = [
        statement
        for policy in template("Training").find_resources("AWS::IAM::Policy").values()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        if "/labels/" in json.dumps(statement["Resource"])
    ]
    writes = [statement for statement in statements if "s3:GetObject*" not in statement["Action"]]
    assert [statement["Action"] for statement in writes] == ["s3:PutObject"]
    assert json.dumps(writes[0]["Resource"]).endswith('/labels/.keep"]]}')


def test_builtin_algorithm_job_uses_the_classic_channels_and_hyperparameters():
    states, job = training_job_parameters(training_algorithm="builtin")
    assert "KeepLabelsChannel" not in states
    channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
    assert set(channels) == {"train", "validation", "train_lst", "validation_lst"}
    assert {c["ContentType"] for c in channels.values()} == {"application/x-image"}
    assert job["HyperParameters"] == {
        "image_shape": "3,32,32",
        "num_layers": "152",
        "epochs": "30",
        "mini_batch_size": "32",
        "learning_rate": "0.1",
        "use_pretrained_model": "0",
        "num_classes": "2",
        "num_training_samples": "900",
    }
    assert job["ResourceConfig"]["InstanceType"] == "ml.p3.2xlarge"


def test_image_resolves_per_region_from_the_sdk_tables():
    mappings = template("Training", training_algorithm="builtin").to_json()["Mappings"]
    assert (
        mappings["BuiltinTrainingImage"]["us-east-1"]["uri"]
        == "811284229777.dkr.ecr.us-east-1.amazonaws.com/image-classification:1"
    )
    pytorch = template("Training").to_json()["Mappings"]["PytorchTrainingImage"]
    assert pytorch["eu-west-1"]["uri"] == "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.6-cpu-py312"


def test_region_given_in_context_gives_a_literal_image():
    _, job = training_job_parameters(region="eu-west-1", account="123456789012")
    assert (
        job["AlgorithmSpecification"]["TrainingImage"]
        == "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.6-cpu-py312"
    )


def test_user_hyperparameters_reach_the_job():
    _, job = training_job_parameters(hyperparameters='{"epochs": 12, "lr": 0.01}')
    assert job["HyperParameters"]["epochs"] == "12"
    assert job["HyperParameters"]["lr"] == "0.01"


def test_outputs_name_the_state_machine_the_registry_and_the_parameters_the_approval_records():
    stack = synth_stacks()["Training"]
    outputs = template("Training").find_outputs("*")
    assert outputs["TrainingStateMachineArn"]["Value"] == {
        "Ref": stack.get_logical_id(stack.state_machine.node.default_child)
    }
    assert "training.fit --sagemaker" in outputs["TrainingStateMachineArn"]["Description"]
    assert outputs["ModelPackageGroupName"]["Value"] == "scones-dev"
    assert "training.fit approve" in outputs["ModelPackageGroupName"]["Description"]
    assert outputs["ModelParameterName"]["Value"] == "/scones/dev/model-data-url"
    assert outputs["ModelPackageArnParameterName"]["Value"] == "/scones/dev/model-package-arn"
    assert "approved" in outputs["ModelParameterName"]["Description"]


def test_pytorch_job_reports_the_gate_figures_as_metrics_the_builtin_one_its_own():
    _, job = training_job_parameters()
    assert {d["Name"]: d["Regex"] for d in job["AlgorithmSpecification"]["MetricDefinitions"]} == {
        "threshold": r"scones-threshold=([0-9.eE+-]+)",
        "test_accuracy": r"scones-test-accuracy=([0-9.eE+-]+)",
        "accepted_accuracy": r"scones-accepted-accuracy=([0-9.eE+-]+)",
        "coverage": r"scones-coverage=([0-9.eE+-]+)",
        "neither_accepted": r"scones-neither-accepted=([0-9.eE+-]+)",
    }
    _, builtin = training_job_parameters(training_algorithm="builtin")
    assert "MetricDefinitions" not in builtin["AlgorithmSpecification"]


@pytest.mark.parametrize("neither", [None, 0.004], ids=["resnet9", "photo model"])
def test_the_metric_definitions_read_the_figures_train_py_prints(tmp_path, capsys, neither):
    from training import train

    metrics = {
        "threshold": 0.8440000414848328,
        "test": {"accuracy": 0.94, "at_threshold": {"threshold": 0.844, "coverage": 0.92, "accuracy": 0.967391}},
        "validation": {"accuracy": 0.95, **({"neither_accepted": neither} if neither is not None else {})},
    }
    train.write_model(tmp_path, tmp_path, {"threshold": 0.8440000414848328}, metrics)
    out = capsys.readouterr().out
    read = {metric.name: float(value) for metric in registry.PYTORCH_METRICS for value in re.findall(metric.regex, out)}
    assert read == {
        "threshold": 0.8440000414848328,
        "test_accuracy": 0.94,
        "accepted_accuracy": 0.967391,
        "coverage": 0.92,
        **({"neither_accepted": neither} if neither is not None else {}),
    }


def test_a_training_without_test_images_prints_only_its_threshold(tmp_path, capsys):
    from training import train

    train.write_model(tmp_path, tmp_path, {"threshold": 0.9}, {"validation": {"accuracy": 0.9}})
    assert capsys.readouterr().out == "scones-threshold=0.9\n"


def test_the_training_state_machine_records_nothing_in_ssm_and_registers_only_into_its_group():
    """What serves is always an approved package: only the approval state machine writes the parameters."""
    training = synth_stacks()["Training"]
    policy = next(
        resource
        for logical_id, resource in template("Training").find_resources("AWS::IAM::Policy").items()
        if logical_id.startswith("TrainingStateMachineRoleDefaultPolicy")
    )
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    assert not [s for s in statements if "ssm:" in json.dumps(s["Action"])]
    (register,) = [s for s in statements if s["Action"] == "sagemaker:createModelPackage"]
    assert register["Resource"]["Fn::Join"][1][-1] == ":model-package/scones-dev/*"
    assert training.registry.packages_arn  # the same ARN the approval's role describes


def test_the_gate_floors_come_from_the_configuration():
    states, _ = training_job_parameters(gate_min_accuracy="0.8", gate_min_coverage="0.5", auto_approve="true")
    floors = {choice["Variable"]: choice["NumericLessThan"] for choice in states["EvaluationGate"]["Choices"]}
    assert floors == {
        "$.Metrics.test_accuracy[0]": 0.8,
        "$.Metrics.accepted_accuracy[0]": 0.95,
        "$.Metrics.coverage[0]": 0.5,
    }
    assert states["GateNeitherAccepted"]["Choices"][0]["NumericGreaterThan"] == 0.05
    assert states["RegisterModel"]["Parameters"]["ModelApprovalStatus"] == "Approved"
    default, _ = training_job_parameters()
    assert default["RegisterModel"]["Parameters"]["ModelApprovalStatus"] == "PendingManualApproval"


def test_the_package_request_names_the_inference_image_the_artifact_and_the_figures():
    states, _ = training_job_parameters()
    request = states["RegisterModel"]["Parameters"]
    assert request["ModelPackageGroupName"] == "scones-dev"
    assert request["InferenceSpecification"]["Containers"] == [
        {
            "Image": "<FindInMap:PytorchInferenceImage>",
            "ModelDataUrl.$": "$.ModelArtifacts.S3ModelArtifacts",
            "Environment": {"SAGEMAKER_PROGRAM": "inference.py"},
        }
    ]
    assert request["InferenceSpecification"]["SupportedContentTypes"] == [
        "image/png",
        "image/jpeg",
        "application/x-image",
    ]
    assert request["CustomerMetadataProperties.$"] == "$.Metadata"
    builtin, _ = training_job_parameters(training_algorithm="builtin")
    (container,) = builtin["RegisterModel"]["Parameters"]["InferenceSpecification"]["Containers"]
    assert container["Image"] == "<FindInMap:BuiltinInferenceImage>" and "Environment" not in container


# ------------------------------------------------------------------ the gate and registration on moto's engine

ARTIFACT = "s3://data/models/scones-dev-1/output/model.tar.gz"
# The default recipe's figures, seed 0 (bench/results/train.json).
PASSING = {"threshold": 0.843891978263855, "test_accuracy": 0.94, "accepted_accuracy": 0.967391312, "coverage": 0.92}


def run_definition(definition: dict, execution_input: dict, setup=None) -> tuple[dict, dict]:
    """Run a synthesized definition on moto's Step Functions engine; answers (the execution's description,
    what moto's SageMaker and SSM then hold: {"packages": [...], "parameters": {...}})."""
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        sagemaker, ssm = boto3.client("sagemaker", "us-east-1"), boto3.client("ssm", "us-east-1")
        stepfunctions = boto3.client("stepfunctions", "us-east-1")
        sagemaker.create_model_package_group(ModelPackageGroupName="scones-dev")
        if setup:
            execution_input = setup(sagemaker, ssm) or execution_input
        text = json.dumps(definition).replace("arn:<Ref:AWS::Partition>:", "arn:aws:")
        text = text.replace("<FindInMap:PytorchInferenceImage>", "pytorch-inference:2.6-cpu-py312")
        text = text.replace("<FindInMap:BuiltinInferenceImage>", "image-classification:1")
        machine = stepfunctions.create_state_machine(
            name="under-test", definition=text, roleArn="arn:aws:iam::123456789012:role/under-test"
        )["stateMachineArn"]
        described = run_execution(stepfunctions, machine, execution_input, timeout=30)
        packages = [
            sagemaker.describe_model_package(ModelPackageName=summary["ModelPackageArn"])
            for summary in sagemaker.list_model_packages(ModelPackageGroupName="scones-dev")["ModelPackageSummaryList"]
        ]
        names = [parameter["Name"] for parameter in ssm.describe_parameters()["Parameters"]]
        parameters = {p["Name"]: p["Value"] for p in ssm.get_parameters(Names=names)["Parameters"]} if names else {}
    return described, {"packages": packages, "parameters": parameters}


def after_training(figures: dict | None, **context) -> tuple[dict, dict]:
    """The training definition's states after the job (moto cannot run createTrainingJob.sync or createModel),
    run from a job description that reports `figures`."""
    states, _ = training_job_parameters(**context)
    tail = {"StartAt": "HasMetrics", "States": {k: v for k, v in states.items() if k not in ("Train", "CreateModel")}}
    job = {"TrainingJobName": "scones-dev-1", "ModelArtifacts": {"S3ModelArtifacts": ARTIFACT}}
    if figures is not None:
        job["FinalMetricDataList"] = [
            {"MetricName": name, "Value": value, "Timestamp": "2026-12-05T10:00:00Z"} for name, value in figures.items()
        ]
    return run_definition(tail, job)


def test_a_model_that_passes_the_gate_is_registered_pending_approval_with_its_figures():
    described, held = after_training({**PASSING, "validation:accuracy": 0.95})
    assert described["status"] == "SUCCEEDED", described
    (package,) = held["packages"]
    assert json.loads(described["output"]) == {
        "S3ModelArtifacts": ARTIFACT,
        "ModelPackageArn": package["ModelPackageArn"],
        "ModelApprovalStatus": "PendingManualApproval",
    }
    assert package["ModelPackageArn"].endswith(":model-package/scones-dev/1")
    assert package["ModelApprovalStatus"] == "PendingManualApproval"
    assert package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"] == ARTIFACT
    assert package["CustomerMetadataProperties"] == {
        "threshold": "0.843891978263855",
        "test_accuracy": "0.94",
        "accepted_accuracy": "0.967391312",
        "coverage": "0.92",
        "training_job": "scones-dev-1",
    }
    assert held["parameters"] == {}  # nothing serves before an approval


def test_auto_approve_registers_the_package_approved():
    described, held = after_training(PASSING, auto_approve="true")
    assert described["status"] == "SUCCEEDED"
    assert [package["ModelApprovalStatus"] for package in held["packages"]] == ["Approved"]


@pytest.mark.parametrize(
    "figures, cause",
    [
        ({**PASSING, "test_accuracy": 0.8}, "test_accuracy 0.8 is below the floor 0.85 (gate_min_accuracy)"),
        (
            {**PASSING, "accepted_accuracy": 0.9},
            "accepted_accuracy 0.9 is below the floor 0.95 (gate_min_accepted_accuracy)",
        ),
        ({**PASSING, "coverage": 0.41}, "coverage 0.41 is below the floor 0.6 (gate_min_coverage)"),
        (
            {**PASSING, "neither_accepted": 0.2},
            "neither_accepted 0.2 is above the ceiling 0.05 (gate_max_neither_accepted)",
        ),
        (
            {"threshold": 0.9},
            "the training job reported no test_accuracy metric, which the evaluation gate needs: train.py "
            "measures the test figures on the staged test images (python -m training.etl)",
        ),
        (None, "the training job reported no metrics, which the evaluation gate needs"),
    ],
    ids=["accuracy", "accepted accuracy", "coverage", "neither accepted", "no test figures", "no metrics"],
)
def test_a_model_below_the_gate_fails_the_training_naming_the_figure_and_registers_nothing(figures, cause):
    described, held = after_training(figures)
    assert (described["status"], described.get("error"), described.get("cause")) == ("FAILED", "ModelBelowGate", cause)
    assert held["packages"] == []


def test_a_photo_model_within_the_neither_ceiling_registers_its_neither_figure():
    described, held = after_training({**PASSING, "neither_accepted": 0.004})
    assert described["status"] == "SUCCEEDED", described
    assert held["packages"][0]["CustomerMetadataProperties"]["neither_accepted"] == "0.004"


@pytest.mark.parametrize("accuracy, status", [(0.95, "SUCCEEDED"), (0.8, "FAILED")])
def test_the_builtin_algorithm_is_gated_on_its_validation_accuracy(accuracy, status):
    described, held = after_training(
        {"train:accuracy": 0.99, "validation:accuracy": accuracy}, training_algorithm="builtin"
    )
    assert described["status"] == status
    if status == "FAILED":
        assert described["cause"] == f"validation:accuracy {accuracy} is below the floor 0.85 (gate_min_accuracy)"
    else:
        assert held["packages"][0]["CustomerMetadataProperties"] == {
            "validation_accuracy": "0.95",
            "training_job": "scones-dev-1",
        }
