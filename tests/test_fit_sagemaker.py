"""`python -m training.fit --sagemaker` against the training stack's state machine deployed into moto.

The Data and Training stacks are deployed with the local deployment from their template snapshots
(tests/snapshots/, which test_nag_and_snapshots keeps equal to what the app synthesizes), because an
in-process synth costs 15-25 s here. moto cannot run `sagemaker:createTrainingJob.sync`: with
SF_EXECUTION_HISTORY_TYPE=FAILURE (set for every test here, so that no test can wait forever) executions
fail at once with moto's canned history (error "AnError", cause "An error occurred!"); with SUCCESS they
stay RUNNING.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from local.assembly import REGION, Stack
from local.deploy import LocalDeployment
from training import fit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = Path(__file__).parent / "snapshots"
STATE_MACHINE = "scones-dev-training"
STAGED = ("train.lst", "validation.lst", "test.lst", "train/bicycle_s_000017.png", "test/bicycle_s_000017.png")


@pytest.fixture(scope="module")
def aws():
    """A moto server holding the deployed Data and Training stacks and staged data; answers its environment."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    environment = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        patch.setenv("SF_EXECUTION_HISTORY_TYPE", "FAILURE")  # read by moto's server, in this process
        patch.setenv("MOTO_PORT", str(port))  # where its Step Functions engine calls the other services
        deployment = deploy_training_stack()
        bucket = deployment.created("SconesDevData", "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
        for key in STAGED:
            boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"staged")
        yield {
            "environment": environment,
            "bucket": bucket,
            "arn": deployment.created("SconesDevTraining", "AWS::StepFunctions::StateMachine")[
                "TrainingStateMachineEAE34FB3"
            ]["Arn"],
        }
    server.stop()


def deploy_training_stack() -> LocalDeployment:
    deployment = LocalDeployment()
    for name in ("Data", "Training"):
        deployment.deploy(Stack(f"SconesDev{name}", json.loads((SNAPSHOTS / f"{name}.json").read_text()), {}))
    return deployment


def run_fit(capsys, *arguments) -> tuple[int, str]:
    """Run `python -m training.fit` in this process; answers (exit status, stderr)."""
    try:
        fit.main(list(arguments))
        status = 0
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


def set_engine(aws, execute: bool) -> None:
    """Whether moto's Step Functions engine runs definitions (it cannot run `createTrainingJob.sync`)."""
    request = urllib.request.Request(
        f"{aws['environment']['AWS_ENDPOINT_URL']}/moto-api/config",
        method="POST",
        data=json.dumps({"stepfunctions": {"execute_state_machine": execute}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10).close()


def executions(aws) -> list[dict]:
    stepfunctions = boto3.client("stepfunctions")
    return [
        stepfunctions.describe_execution(executionArn=execution["executionArn"])
        for execution in stepfunctions.list_executions(stateMachineArn=aws["arn"])["executions"]
    ]


def test_starts_the_deployed_training_state_machine_with_the_console_input(aws, capsys):
    before = {execution["executionArn"] for execution in executions(aws)}
    run_fit(capsys, "--sagemaker", "--algorithm", "pytorch")
    started = [execution for execution in executions(aws) if execution["executionArn"] not in before]
    assert len(started) == 1
    assert started[0]["stateMachineArn"] == aws["arn"]
    assert started[0]["input"] == "{}"
    assert started[0]["name"].startswith("fit-")


def test_failed_execution_exits_1_with_one_line_naming_the_cause(aws, capsys):
    status, stderr = run_fit(capsys, "--sagemaker")
    assert status == 1
    progress, error = stderr.splitlines()[:-1], stderr.splitlines()[-1]
    assert f"started {STATE_MACHINE} (pytorch): arn:aws:states:" in progress[0]
    assert error.startswith("fit: error: execution FAILED: AnError: An error occurred! (arn:aws:states:")
    assert [line for line in stderr.splitlines() if "error" in line] == [error]


def test_execution_failing_in_the_engine_names_its_error_and_cause(aws):
    """moto's engine runs the deployed definition and fails at the training step it cannot run."""
    set_engine(aws, execute=True)
    try:
        deploy_training_stack()  # the executing engine keeps its own state machines
        with pytest.raises(fit.TrainingFailed) as failed:
            fit.fit_sagemaker(poll_seconds=0.05, say=lambda text: None)
    finally:
        set_engine(aws, execute=False)
    assert str(failed.value).startswith(
        "execution FAILED: States.Runtime: RuntimeError(Unsupported sync callback procedure in resource "
        "arn:aws:states:::sagemaker:createTrainingJob.sync) (arn:aws:states:"
    )


def test_another_algorithm_deployed_fails_saying_how_to_redeploy(aws, capsys):
    before = len(executions(aws))
    status, stderr = run_fit(capsys, "--sagemaker", "--algorithm", "builtin")
    assert status == 2
    assert stderr == (
        f"fit: error: {STATE_MACHINE} trains pytorch, not builtin: redeploy it with "
        '`make deploy STACKS="SconesDevTraining" CONTEXT="-c training_algorithm=builtin"` '
        "(and deploy the endpoint with the same context)\n"
    )
    assert len(executions(aws)) == before


def test_stack_not_deployed_says_how_to_deploy_or_train_locally(aws, capsys):
    status, stderr = run_fit(capsys, "--sagemaker", "--env", "prod")
    assert status == 2
    assert stderr == (
        f"fit: error: no state machine scones-prod-training in {REGION}: deploy the training stack with "
        '`make deploy STACKS="SconesProdData SconesProdTraining" CONTEXT="-c env=prod"` (see README), '
        "or train on this machine with --local\n"
    )


def test_no_credentials_says_what_to_do(aws, capsys, monkeypatch, tmp_path):
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    status, stderr = run_fit(capsys, "--sagemaker")
    assert status == 2
    assert stderr == (
        "fit: error: no AWS credentials: configure them (`aws configure`, AWS_PROFILE) and deploy with "
        "`make deploy`, or train on this machine with --local\n"
    )


def test_unstaged_data_fails_before_starting(aws, capsys):
    s3 = boto3.client("s3")
    s3.delete_object(Bucket=aws["bucket"], Key="validation.lst")
    try:
        before = len(executions(aws))
        status, stderr = run_fit(capsys, "--sagemaker")
    finally:
        s3.put_object(Bucket=aws["bucket"], Key="validation.lst", Body=b"staged")
    assert status == 2
    assert stderr == (
        f"fit: error: s3://{aws['bucket']}/validation.lst is empty: stage the data first with "
        f"`python -m training.etl --out data --bucket {aws['bucket']}`\n"
    )
    assert len(executions(aws)) == before


def test_ctrl_c_leaves_the_execution_running_and_says_how_to_stop_it(aws, monkeypatch):
    monkeypatch.setenv("SF_EXECUTION_HISTORY_TYPE", "SUCCESS")  # the execution stays RUNNING
    # Python keeps SIGINT ignored when it starts with it ignored, as in a job a shell started in the background
    # (`make test &`): the child is given Python's own handler so that the test does not depend on how it is run.
    fit = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('training.fit', run_name='__main__', alter_sys=True)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", fit, "--sagemaker"],
        cwd=ROOT,
        text=True,
        env={**os.environ, **aws["environment"]},
        stderr=subprocess.PIPE,
    )
    try:
        first = process.stderr.readline()
        assert f"started {STATE_MACHINE} (pytorch): " in first, first
        execution_arn = first.rsplit(": ", 1)[1].strip()
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=20)
        assert process.returncode == 130
    finally:
        process.kill()
    assert rest.splitlines()[-1] == (
        "fit: interrupted; the execution keeps running, and its training job with it. "
        f"Stop it with: aws stepfunctions stop-execution --execution-arn {execution_arn}"
    )
    assert boto3.client("stepfunctions").describe_execution(executionArn=execution_arn)["status"] == "RUNNING"


def test_training_job_progress_is_a_line_per_secondary_status(aws):
    """A job created with the deployed Train state's own parameters, as the state machine would create it."""
    definition = boto3.client("stepfunctions").describe_state_machine(stateMachineArn=aws["arn"])["definition"]
    parameters = {
        name: value
        for name, value in fit.training_job_parameters(json.loads(definition)).items()
        if not name.endswith(".$")
    }
    sagemaker = boto3.client("sagemaker")
    sagemaker.create_training_job(TrainingJobName="scones-dev-progress", **parameters)
    job = sagemaker.describe_training_job(TrainingJobName="scones-dev-progress")
    assert fit.training_job_lines(job) == [
        f"training job scones-dev-progress: {transition['Status']}: {transition['StatusMessage']}"
        for transition in job["SecondaryStatusTransitions"]
    ]
    assert fit.algorithm_of(parameters) == "pytorch"


def test_the_newest_training_job_is_followed():
    """TaskScheduled events as the Step Functions API documents them; a retry schedules a new job."""

    def scheduled(resource_type, resource, name):
        return {
            "type": "TaskScheduled",
            "taskScheduledEventDetails": {
                "resourceType": resource_type,
                "resource": resource,
                "region": "us-east-1",
                "parameters": json.dumps({"TrainingJobName": name, "RoleArn": "arn:aws:iam::123456789012:role/r"}),
            },
        }

    assert fit.training_job_name([{"type": "ExecutionStarted"}]) is None
    assert (
        fit.training_job_name(
            [
                scheduled("sagemaker", "createTrainingJob.sync", "scones-dev-1"),
                scheduled("sagemaker", "createModel", "not-a-job"),
                scheduled("sagemaker", "createTrainingJob.sync", "scones-dev-2"),
            ]
        )
        == "scones-dev-2"
    )


def test_model_artifact_comes_from_the_output_else_the_recorded_parameter(aws):
    ssm = boto3.client("ssm")
    ssm.put_parameter(
        Name="/scones/dev/model-data-url",
        Value="s3://b/models/recorded/output/model.tar.gz",
        Type="String",
        Overwrite=True,
    )
    output = {"output": json.dumps({"S3ModelArtifacts": "s3://b/models/job/output/model.tar.gz"})}
    assert fit.model_artifact(ssm, output, "/scones/dev/model-data-url") == "s3://b/models/job/output/model.tar.gz"
    assert fit.model_artifact(ssm, {}, "/scones/dev/model-data-url") == "s3://b/models/recorded/output/model.tar.gz"


def test_failure_reason_prefers_the_training_jobs_own():
    job = {
        "TrainingJobName": "scones-dev-1",
        "TrainingJobStatus": "Failed",
        "FailureReason": "ClientError: No S3 objects found under S3 URL",
    }
    assert (
        fit.failure_reason(None, {"status": "FAILED"}, job)
        == "training job scones-dev-1 Failed: ClientError: No S3 objects found under S3 URL"
    )
    cause = json.dumps({"TrainingJobName": "scones-dev-2", "FailureReason": "AlgorithmError: out of\nmemory"})
    assert (
        fit.failure_reason(None, {"error": "States.TaskFailed", "cause": cause}, None)
        == "States.TaskFailed: AlgorithmError: out of memory"
    )


@pytest.mark.parametrize(
    "arguments, message",
    [
        ((), "one of the arguments --local --sagemaker is required"),
        (("--local", "--sagemaker"), "argument --sagemaker: not allowed with argument --local"),
        (
            ("--local", "--data", "d", "--out", "o", "--algorithm", "builtin"),
            "the built-in image-classification algorithm runs only in SageMaker: deploy the training stack with "
            "-c training_algorithm=builtin and use --sagemaker",
        ),
        (("--local",), "--local needs --data DIR and --out DIR"),
        (
            ("--sagemaker", "--epochs", "3"),
            "--epochs is for --local: with --sagemaker the hyperparameters are the "
            "deployed stack's (context key `hyperparameters`, see README)",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, arguments, message):
    assert run_fit(capsys, *arguments) == (2, f"fit: error: {message}\n")
