"""The synthesized workflow definition executed by moto's Step Functions engine, with the real handlers
running in-process from their asset folders and a stand-in endpoint speaking the SageMaker Runtime API."""

import io
import json
import os
import random

import boto3
import pytest
from conftest import assembly_directory, environment_restored
from fake_endpoint import FakeEndpoint
from PIL import Image

from local import aws
from local.assembly import read_assembly
from local.deploy import LocalDeployment
from local.executions import run_execution

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment():
    with environment_restored():
        server, _ = aws.start()
        try:
            with FakeEndpoint() as endpoint:
                os.environ["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = endpoint.url
                deployed = LocalDeployment()
                # The classic workflow (-c review=false): tests/test_local_review.py runs the review step.
                stacks = {stack.name: stack for stack in read_assembly(assembly_directory(review="false"))}
                deployed.deploy(stacks["SconesDevData"])
                deployed.deploy(stacks["SconesDevWorkflow"])
                deployed.endpoint = endpoint
                deployed.bucket = deployed.created("SconesDevData", "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
                yield deployed
        finally:
            server.stop()


@pytest.fixture
def endpoint(deployment):
    deployment.endpoint.failures = []
    deployment.endpoint.requests = []
    deployment.endpoint.answer_body = b"[0.97, 0.03]"
    return deployment.endpoint


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def state_machine_arn(deployment, name: str) -> str:
    return f"arn:aws:states:us-east-1:123456789012:stateMachine:scones-dev-{name}"


def run(deployment, name: str, execution_input: dict) -> tuple[dict, list[dict]]:
    stepfunctions = boto3.client("stepfunctions")
    described = run_execution(stepfunctions, state_machine_arn(deployment, name), execution_input)
    return described, stepfunctions.get_execution_history(executionArn=described["executionArn"])["events"]


def entered(events: list[dict]) -> list[str]:
    return [e["stateEnteredEventDetails"]["name"] for e in events if "stateEnteredEventDetails" in e]


def put_image(deployment, key: str, colour=(200, 30, 30)) -> bytes:
    image = png(colour)
    boto3.client("s3").put_object(Bucket=deployment.bucket, Key=key, Body=image)
    return image


def test_confident_image_succeeds_with_the_classic_output(deployment, endpoint):
    image = put_image(deployment, "test/bicycle_s_000001.png")
    described, events = run(
        deployment, "classify-image", {"s3_bucket": deployment.bucket, "s3_key": "test/bicycle_s_000001.png"}
    )
    assert described["status"] == "SUCCEEDED"
    assert json.loads(described["output"]) == {
        "s3_bucket": deployment.bucket,
        "s3_key": "test/bicycle_s_000001.png",
        "class": "bicycle",
        "inferences": [0.97, 0.03],
        "neither": 0.0,
        "threshold": 0.93,
        "threshold_source": "default",
        "model": None,
        "source": "model",
    }
    assert entered(events) == ["Serialize image data", "Classify image", "Filter low confidence", "Confident"]
    assert [r["body"] for r in endpoint.requests] == [image]
    assert endpoint.requests[0]["path"] == "/endpoints/scones-dev/invocations"
    assert endpoint.requests[0]["content_type"] == "image/png"


def test_a_photo_too_large_for_the_state_travels_by_reference(deployment, endpoint):
    buffer = io.BytesIO()  # random pixels: a JPEG of about 300 KB
    Image.frombytes("RGB", (500, 500), random.Random(0).randbytes(500 * 500 * 3)).save(buffer, "JPEG", quality=95)
    photo = buffer.getvalue()
    assert 180_000 < len(photo) < 6 * 1024 * 1024
    boto3.client("s3").put_object(Bucket=deployment.bucket, Key="photos/large.jpg", Body=photo)
    described, events = run(
        deployment, "classify-image", {"s3_bucket": deployment.bucket, "s3_key": "photos/large.jpg"}
    )
    assert described["status"] == "SUCCEEDED"
    assert json.loads(described["output"])["class"] == "bicycle"
    assert [r["body"] for r in endpoint.requests] == [photo]
    assert all(len(json.dumps(e, default=str)) < 20_000 for e in events)  # the photo never entered the state


def test_a_photo_over_the_endpoints_limit_fails_naming_what_to_do(deployment, endpoint):
    boto3.client("s3").put_object(
        Bucket=deployment.bucket, Key="photos/huge.jpg", Body=b"\xff\xd8\xff" + bytes(7 << 20)
    )
    described, _ = run(deployment, "classify-image", {"s3_bucket": deployment.bucket, "s3_key": "photos/huge.jpg"})
    assert (described["status"], described["error"]) == ("FAILED", "ImageTooLarge")
    assert "Resize or recompress the image" in json.loads(described["cause"])["errorMessage"]
    assert endpoint.requests == []


def test_low_confidence_fails_with_threshold_confidence_not_met(deployment, endpoint):
    put_image(deployment, "test/motorcycle_s_000002.png")
    endpoint.answer_body = b"[0.6, 0.4]"
    described, events = run(
        deployment, "classify-image", {"s3_bucket": deployment.bucket, "s3_key": "test/motorcycle_s_000002.png"}
    )
    assert described["status"] == "FAILED"
    assert described["error"] == "ThresholdConfidenceNotMet"
    assert json.loads(described["cause"])["errorMessage"].startswith("THRESHOLD_CONFIDENCE_NOT_MET")
    assert entered(events) == ["Serialize image data", "Classify image", "Filter low confidence", "Low confidence"]


def test_transient_endpoint_failures_are_retried_to_success(deployment, endpoint):
    put_image(deployment, "test/bicycle_s_000003.png")
    endpoint.failures = ["ServiceUnavailable", "ModelNotReadyException"]
    described, events = run(
        deployment, "classify-image", {"s3_bucket": deployment.bucket, "s3_key": "test/bicycle_s_000003.png"}
    )
    assert described["status"] == "SUCCEEDED"
    failed = [e["taskFailedEventDetails"]["error"] for e in events if e["type"] == "TaskFailed"]
    assert failed == ["ServiceUnavailable", "ModelNotReadyException"]
    assert len(endpoint.requests) == 3


def test_missing_image_fails_fast_without_retries(deployment, endpoint):
    described, events = run(
        deployment, "classify-image", {"s3_bucket": deployment.bucket, "s3_key": "test/no_such_image.png"}
    )
    assert described["status"] == "FAILED"
    assert described["error"] == "ImageNotFound"
    assert "test/no_such_image.png" in json.loads(described["cause"])["errorMessage"]
    assert [e["type"] for e in events].count("TaskScheduled") == 1
    assert endpoint.requests == []


def test_batch_classifies_each_image_under_the_prefix_in_a_child_execution(deployment, endpoint):
    put_image(deployment, "batch/a.png")
    put_image(deployment, "batch/b.png")
    boto3.client("s3").put_object(Bucket=deployment.bucket, Key="batch/c.png", Body=b"not a PNG")
    boto3.client("s3").put_object(Bucket=deployment.bucket, Key="batch.lst", Body=b"0\t0\tbatch/a.png\n")
    endpoint.failures = ["ModelNotReadyException"]
    described, events = run(deployment, "classify-prefix", {"prefix": "batch"})
    assert described["status"] == "SUCCEEDED"
    stepfunctions = boto3.client("stepfunctions")
    children = [
        stepfunctions.describe_execution(executionArn=e["executionArn"])
        for e in stepfunctions.list_executions(stateMachineArn=state_machine_arn(deployment, "classify-image"))[
            "executions"
        ]
    ]
    children = [
        c
        for c in children
        if json.loads(c["input"]).get("AWS_STEP_FUNCTIONS_STARTED_BY_EXECUTION_ID") == described["executionArn"]
    ]
    by_key = {json.loads(c["input"])["s3_key"]: c for c in children}
    assert sorted(by_key) == ["batch/a.png", "batch/b.png", "batch/c.png"]
    assert [by_key[key]["status"] for key in sorted(by_key)] == ["SUCCEEDED", "SUCCEEDED", "FAILED"]
    assert by_key["batch/c.png"]["error"] == "NotAnImage"  # recorded as its outcome; the batch goes on
    assert endpoint.failures == [] and len(endpoint.requests) == 3  # one child's classify retried, then answered
    assert [json.loads(by_key[key]["output"])["inferences"] for key in ("batch/a.png", "batch/b.png")] == [
        [0.97, 0.03],
        [0.97, 0.03],
    ]
    assert json.loads(described["output"])["ResultWriterDetails"]["Key"].startswith("batch_results/")


def test_a_task_naming_a_function_that_does_not_exist_fails_with_lambdas_error(deployment):
    stepfunctions = boto3.client("stepfunctions")
    missing = "arn:aws:lambda:us-east-1:123456789012:function:no-such-function"
    definition = {
        "StartAt": "Invoke",
        "States": {
            "Invoke": {
                "Type": "Task",
                "Resource": "arn:aws:states:::lambda:invoke",
                "Parameters": {"FunctionName": missing, "Payload.$": "$"},
                "End": True,
            }
        },
    }
    machine = stepfunctions.create_state_machine(
        name="invokes-a-missing-function",
        definition=json.dumps(definition),
        roleArn="arn:aws:iam::123456789012:role/any",
    )["stateMachineArn"]
    described = run_execution(stepfunctions, machine, {})
    assert described["status"] == "FAILED"
    assert described["error"] == "Lambda.ResourceNotFoundException"


def test_requests_from_the_local_aws_own_process_keep_keys_queries_and_errors(deployment):
    s3 = boto3.client("s3")  # this test runs in the local AWS's process: its requests skip the socket
    keys = ["odd-keys/a+b c(2).jpg", "odd-keys/ünï/%41.png", "odd-keys/x?y=1&z.png"]
    for number, key in enumerate(keys):
        s3.put_object(Bucket=deployment.bucket, Key=key, Body=bytes([number]) * 300_000)
    assert [s3.get_object(Bucket=deployment.bucket, Key=key)["Body"].read()[:1] for key in keys] == [
        b"\x00",
        b"\x01",
        b"\x02",
    ]
    listed = s3.list_objects_v2(Bucket=deployment.bucket, Prefix="odd-keys/", MaxKeys=2)
    assert [entry["Key"] for entry in listed["Contents"]] == sorted(keys)[:2] and listed["IsTruncated"]
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=deployment.bucket, Key="odd-keys/absent.jpg")
