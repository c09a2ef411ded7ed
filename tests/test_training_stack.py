import json
import re
import time

import boto3
import pytest
from conftest import definition_of, synth_stacks, template
from moto import mock_aws

from stacks import training_stack


def training_job_parameters(**context) -> tuple[dict, dict]:
    """The training state machine's states and its CreateTrainingJob parameters."""
    states = definition_of(synth_stacks(**context)["Training"].state_machine)["States"]
    return states, states["Train"]["Parameters"]


def test_training_runs_then_registers_the_model_and_records_its_artifact():
    states, _ = training_job_parameters()
    assert states["Train"]["Resource"].endswith(":states:::sagemaker:createTrainingJob.sync")
    assert states["Train"]["Next"] == "CreateModel"
    assert states["CreateModel"]["Next"] == "RecordModel"
    assert states["RecordModel"]["Parameters"]["Name"] == "/scones/dev/model-data-url"
    assert states["RecordModel"]["Parameters"]["Value.$"] == "$.ModelArtifacts.S3ModelArtifacts"
    assert states["Trained"]["Type"] == "Succeed"


def test_pytorch_script_mode_job():
    _, job = training_job_parameters(training_algorithm="pytorch")
    assert job["AlgorithmSpecification"]["TrainingImage"] == "<FindInMap:PytorchTrainingImage>"
    channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
    assert set(channels) == {"train", "validation", "train_lst", "validation_lst", "code"}
    uri = lambda name: channels[name]["DataSource"]["S3DataSource"]["S3Uri"]  # noqa: E731
    assert all(uri(name).startswith("s3://") for name in channels)
    assert uri("train").endswith("/train") and uri("train_lst").endswith("/train.lst")
    assert uri("validation_lst").endswith("/validation.lst")
    submit_directory = job["HyperParameters"]["sagemaker_submit_directory"]
    assert submit_directory.startswith("/opt/ml/input/data/code/") and submit_directory.endswith(".gz")
    assert job["HyperParameters"]["sagemaker_program"] == "train.py"
    assert job["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert job["OutputDataConfig"]["S3OutputPath"].startswith("s3://")
    assert job["OutputDataConfig"]["S3OutputPath"].endswith("/models/")


def test_builtin_algorithm_job_uses_the_classic_channels_and_hyperparameters():
    _, job = training_job_parameters(training_algorithm="builtin")
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


def test_outputs_name_the_training_state_machine_and_the_model_parameter():
    stack = synth_stacks()["Training"]
    outputs = template("Training").find_outputs("*")
    assert outputs["TrainingStateMachineArn"]["Value"] == {
        "Ref": stack.get_logical_id(stack.state_machine.node.default_child)
    }
    assert outputs["ModelParameterName"]["Value"] == "/scones/dev/model-data-url"
    assert "training.fit --sagemaker" in outputs["TrainingStateMachineArn"]["Description"]
    assert "SSM parameter" in outputs["ModelParameterName"]["Description"]


def test_pytorch_job_reports_the_calibrated_threshold_as_a_metric_the_builtin_one_does_not():
    _, job = training_job_parameters()
    assert job["AlgorithmSpecification"]["MetricDefinitions"] == [
        {"Name": "threshold", "Regex": training_stack.THRESHOLD_METRIC_REGEX}
    ]
    _, builtin = training_job_parameters(training_algorithm="builtin")
    assert "MetricDefinitions" not in builtin["AlgorithmSpecification"]


def test_the_metric_regex_reads_the_threshold_train_py_prints(tmp_path, capsys):
    from training import train

    train.write_model(tmp_path, tmp_path, {"threshold": 0.8440000414848328}, {})
    (value,) = re.findall(training_stack.THRESHOLD_METRIC_REGEX, capsys.readouterr().out)
    assert float(value) == 0.8440000414848328


def test_the_threshold_states_and_their_exact_permissions():
    states, _ = training_job_parameters()
    assert states["RecordModel"]["Next"] == "HasMetrics"
    record = states["EachMetric"]["ItemProcessor"]["States"]["RecordThreshold"]
    assert record["Resource"].endswith(":states:::aws-sdk:ssm:putParameter")
    assert record["Parameters"] == {
        "Name": "/scones/dev/threshold",
        "Value.$": "States.JsonToString($.Value)",
        "Type": "String",
        "Overwrite": True,
    }
    assert states["ForgetThreshold"]["Resource"].endswith(":states:::aws-sdk:ssm:deleteParameter")
    ssm = sorted(
        (
            s["Action"],
            sorted(
                r["Fn::Join"][1][-1] for r in (s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]])
            ),
        )
        for policy in template("Training").find_resources("AWS::IAM::Policy").values()
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
        if "ssm:" in json.dumps(s["Action"])
    )
    assert ssm == [
        ("ssm:deleteParameter", [":parameter/scones/dev/threshold"]),
        ("ssm:putParameter", [":parameter/scones/dev/model-data-url", ":parameter/scones/dev/threshold"]),
    ]


THRESHOLD, MODEL = "/scones/dev/threshold", "/scones/dev/model-data-url"


@pytest.mark.parametrize(
    "metrics, before, after",
    [
        ([{"MetricName": "threshold", "Value": 0.844}], None, "0.844"),
        ([{"MetricName": "loss", "Value": 0.3}, {"MetricName": "threshold", "Value": 0.9}], "0.844", "0.9"),
        ([{"MetricName": "validation:accuracy", "Value": 0.93}], "0.844", None),
        ([], None, None),
        (None, "0.844", None),
    ],
    ids=["recorded", "among other metrics", "builtin forgets an older one", "no metrics", "no metric list"],
)
def test_after_the_job_the_state_machine_records_its_threshold_beside_the_model(metrics, before, after):
    """The definition's states after the training job, run on moto's Step Functions engine (which cannot
    run createTrainingJob.sync or createModel), from what the job's description holds."""
    states, _ = training_job_parameters()
    tail = {
        "StartAt": "RecordModel",
        "States": {name: state for name, state in states.items() if name not in ("Train", "CreateModel")},
    }
    job = {"TrainingJobName": "scones-dev-1", "ModelArtifacts": {"S3ModelArtifacts": "s3://data/models/1/model.tar.gz"}}
    if metrics is not None:
        job["FinalMetricDataList"] = [{**metric, "Timestamp": "2026-12-05T10:00:00Z"} for metric in metrics]
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        ssm, stepfunctions = boto3.client("ssm", "us-east-1"), boto3.client("stepfunctions", "us-east-1")
        if before:
            ssm.put_parameter(Name=THRESHOLD, Value=before, Type="String")
        machine = stepfunctions.create_state_machine(
            name="training-tail",
            definition=json.dumps(tail).replace("arn:<Ref:AWS::Partition>:", "arn:aws:"),
            roleArn="arn:aws:iam::123456789012:role/training",
        )["stateMachineArn"]
        execution = stepfunctions.start_execution(stateMachineArn=machine, input=json.dumps(job))["executionArn"]
        deadline = time.monotonic() + 30
        while (described := stepfunctions.describe_execution(executionArn=execution))["status"] == "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        recorded = {p["Name"]: p["Value"] for p in ssm.get_parameters(Names=[THRESHOLD, MODEL])["Parameters"]}
    assert (described["status"], json.loads(described["output"])) == (
        "SUCCEEDED",
        {"S3ModelArtifacts": "s3://data/models/1/model.tar.gz"},
    )
    assert recorded == {MODEL: "s3://data/models/1/model.tar.gz", **({THRESHOLD: after} if after else {})}
