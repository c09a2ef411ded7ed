"""The local stack as `make run` builds it (moto and the endpoint server as background processes, the synthesized
stacks deployed into them), under a fault: the endpoint stopped in the middle of a batch and started again."""

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor, wait

import boto3
import pytest
from conftest import ROOT, assembly_directory, environment_restored
from PIL import Image

from local.__main__ import LocalRun, main, print_summary
from local.executions import run_execution
from stacks.config import SconesConfig
from stacks.registry import DEFAULT_THRESHOLD_VALUE

pytestmark = pytest.mark.slow

# A model whose inference.py always answers a confident bicycle: the fault, not the model, is under test.
CONFIDENT_MODEL = """
import json

def model_fn(model_dir):
    return None

def input_fn(request_body, content_type):
    return request_body

def predict_fn(data, model):
    return [0.97, 0.03]

def output_fn(prediction, accept):
    return json.dumps(prediction), "application/json"
"""
IMAGES = 24


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("state")
    with environment_restored():
        run = LocalRun(state_dir, assembly_directory(), "dev")
        info = run.start_aws()
        try:
            deployment = run.deploy([run.stack("Data")])
            bucket = deployment.created(run.stack("Data"), "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
            s3 = boto3.client("s3")
            model = io.BytesIO()
            with tarfile.open(fileobj=model, mode="w:gz") as archive:
                code = CONFIDENT_MODEL.encode()
                member = tarfile.TarInfo("code/inference.py")
                member.size = len(code)
                archive.addfile(member, io.BytesIO(code))
            s3.put_object(Bucket=bucket, Key="models/confident/output/model.tar.gz", Body=model.getvalue())
            config = SconesConfig(env_name="dev")
            artifact = f"s3://{bucket}/models/confident/output/model.tar.gz"
            boto3.client("ssm").put_parameter(  # what the approval of a package without a threshold records
                Name=config.approved_parameter_name,
                Type="String",
                Value=f"{artifact} {DEFAULT_THRESHOLD_VALUE} arn:aws:sagemaker:us-east-1:1:model-package/x/1",
            )
            run.deploy([run.stack("Review"), run.stack("Workflow"), run.stack("Endpoint")])
            run.serve_endpoint(deployment, info["sagemaker_runtime"])
            for number in range(IMAGES):
                image = io.BytesIO()
                Image.new("RGB", (32, 32), (number * 10, 40, 90)).save(image, "PNG")
                s3.put_object(Bucket=bucket, Key=f"test/image_{number:02d}.png", Body=image.getvalue())
            state_machine = next(
                machine["Ref"]
                for machine in deployment.created(run.stack("Workflow"), "AWS::StepFunctions::StateMachine").values()
                if machine["Name"].endswith("-classify-image")
            )
            yield run, deployment, bucket, state_machine, info
        finally:
            run.endpoint.stop()
            run.aws.stop()


def test_executions_retry_through_an_endpoint_restart_and_complete(local_run):
    run, deployment, bucket, state_machine, info = local_run
    stepfunctions = boto3.client("stepfunctions")
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(
                run_execution,
                stepfunctions,
                state_machine,
                {"s3_bucket": bucket, "s3_key": f"test/image_{number:02d}.png"},
            )
            for number in range(IMAGES)
        ]
        while sum(future.done() for future in futures) < 3:
            time.sleep(0.05)
        assert run.endpoint.stop()
        time.sleep(1.5)
        run.serve_endpoint(deployment, info["sagemaker_runtime"])
        wait(futures)
    executions = [future.result() for future in futures]
    assert [(e["status"], e.get("error")) for e in executions] == [("SUCCEEDED", None)] * IMAGES
    assert {tuple(json.loads(e["output"])["inferences"]) for e in executions} == {(0.97, 0.03)}

    retried = []
    for execution in executions:
        events = stepfunctions.get_execution_history(executionArn=execution["executionArn"])["events"]
        errors = [e["taskFailedEventDetails"]["error"] for e in events if e["type"] == "TaskFailed"]
        if errors:
            retried.append(errors)
    # The executions in flight while the endpoint was down failed to connect, were retried, and completed.
    assert retried, "no execution ran while the endpoint was down"
    assert {error for errors in retried for error in errors} <= {"EndpointConnectionError", "ConnectionClosedError"}


def test_help_lists_only_the_user_commands(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "{up,classify,review,registry,down}" in out
    assert "SUPPRESS" not in out and "serve" not in out


def test_up_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["up", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in (
        "(default: .scones)",
        "(default: cdk.out)",
        "(default: 8)",
        "(default: the one the assembly holds)",
    ):
        assert default in out


def test_up_without_a_cloud_assembly_says_to_synthesize_one(tmp_path, capsys):
    assert main(["up", "--assembly", str(tmp_path / "cdk.out"), "--state-dir", str(tmp_path / "state")]) == 2
    assert (
        capsys.readouterr().err
        == f"local: error: no cloud assembly at {tmp_path / 'cdk.out'}: run `make synth` first\n"
    )


def test_up_refuses_a_concurrency_below_one_before_starting_anything(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["up", "--concurrency", "0"])
    assert exited.value.code == 2
    assert "argument --concurrency: '0' is not a positive whole number" in capsys.readouterr().err


def test_up_asked_for_dev_on_a_prod_assembly_says_what_it_holds_and_starts_nothing(tmp_path, capsys):
    prod = assembly_directory(env="prod")
    capsys.readouterr()  # what the synthesis printed
    assert main(["up", "--assembly", str(prod), "--env", "dev", "--state-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"local: error: {prod} holds SconesProd*, not the dev stacks: pass --env prod, "
        "or run `make synth` to synthesize them\n"
    )
    assert not (tmp_path / "aws.json").exists()


def test_up_runs_the_environment_the_assembly_holds_and_a_failure_stops_the_local_aws_it_started(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "local",
            "up",
            "--assembly",
            str(assembly_directory(env="prod")),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "SCONES_CIFAR100": str(tmp_path / "missing.tar.gz")},
        timeout=300,
    )
    # The prod stacks' data bucket was deployed (no KeyError: 'SconesDevData'); staging then failed, in one line.
    assert "[assembly] the prod stacks" in result.stdout
    assert result.returncode == 2
    assert result.stderr == f"local: error: no archive at {tmp_path / 'missing.tar.gz'}\n"
    assert "[aws] stopped: this run started it and failed" in result.stdout
    url = re.search(r"started the local AWS .* at http://127.0.0.1:(\d+)", result.stdout)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(url[1])), timeout=5).close()
    assert not (tmp_path / "state" / "aws.json").exists()


def test_up_on_a_cut_short_or_partial_assembly_says_to_synthesize_again(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"artifacts": {')
    assert main(["up", "--assembly", str(tmp_path), "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"local: error: {tmp_path / 'manifest.json'} is not JSON (")
    assert err.endswith("): run `make synth` again\n") and err.count("\n") == 1
    (tmp_path / "manifest.json").write_text('{"artifacts": {}}')
    assert main(["up", "--assembly", str(tmp_path), "--state-dir", str(tmp_path / "state")]) == 2
    assert capsys.readouterr().err == (
        f"local: error: {tmp_path} has no SconesDevData, SconesDevTraining, "
        "SconesDevWorkflow, SconesDevEndpoint, SconesDevMonitoring: "
        "run `make synth` to synthesize them\n"
    )


def test_the_summary_shows_the_reports_under_the_working_folder_as_relative_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    state_dir = tmp_path / ".scones"
    summary = {
        "failed_by_error": {},
        "model_test_accuracy": 0.9,
        "executions": 1,
        "succeeded": 1,
        "waiting_for_review": 0,
        "accepted_accuracy": 1.0,
        "latency_ms_p50": 1,
        "latency_ms_p99": 1,
        "captured_records": 1,
        "capture_report": str(state_dir / "report" / "report.html"),
        "model_package": "scones-dev/1 Approved",
        "review_page": "http://127.0.0.1:8123/#token=t",
    }
    print_summary(summary, "bucket", ["scones-dev"], state_dir)
    printed = capsys.readouterr().out
    assert "model package (serving)   scones-dev/1 Approved   (all of them: python -m local registry)\n" in printed
    assert "model report              .scones/model/report.html\n" in printed
    assert "capture report            .scones/report/report.html\n" in printed
    assert "summary                   .scones/summary.json\n" in printed
