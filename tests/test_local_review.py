"""The review step end to end on this machine: the synthesized definitions on the local engine, the real review
Lambdas behind the local page server (local/review.py), and the page itself in headless Chromium."""

import argparse
import io
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import boto3
import pytest
from conftest import assembly_directory, environment_restored
from fake_endpoint import FakeEndpoint
from PIL import Image

from local import aws, classify, review
from local.assembly import read_assembly
from local.deploy import LocalDeployment
from local.executions import run_execution, waits_for_callback
from training import photos

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
UNCERTAIN = b"[0.6, 0.3]"  # bicycle 0.6, motorcycle 0.3, neither 0.1: below the default threshold 0.93
# 14.4 s: answers in these tests come within a second or two, and the timeout test waits for it to pass. (One
# environment only: the local Lambda runtime runs every function in one process, with one set of variables.)
REVIEW_TIMEOUT_HOURS = "0.004"


@pytest.fixture(scope="module")
def local():
    with environment_restored():
        server, _ = aws.start()
        try:
            with FakeEndpoint() as endpoint:
                endpoint.answer_body = UNCERTAIN
                os.environ["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = endpoint.url
                deployment = LocalDeployment()
                assembly = assembly_directory(review_timeout_hours=REVIEW_TIMEOUT_HOURS)
                stacks = {stack.name: stack for stack in read_assembly(assembly)}
                for short in ("Data", "Review", "Workflow"):
                    deployment.deploy(stacks[f"SconesDev{short}"])
                functions = deployment.created("SconesDevReview", "AWS::Lambda::Function").values()
                api = next(f["Ref"] for f in functions if "ReviewApi" in f["Ref"])
                page = review.ReviewServer(0, api, "test-token")
                threading.Thread(target=page.serve_forever, daemon=True).start()
                bucket = deployment.created("SconesDevData", "AWS::S3::Bucket")["Data666C94C7"]["Ref"]
                yield SimpleNamespace(
                    bucket=bucket,
                    endpoint=endpoint,
                    info={"url": f"http://127.0.0.1:{page.server_address[1]}", "token": "test-token"},
                )
                page.shutdown()
        finally:
            server.stop()


MACHINE = "arn:aws:states:us-east-1:123456789012:stateMachine:scones-dev-classify-image"


def put_photo(local, key: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (40, 90, 160)).save(buffer, format="JPEG")
    boto3.client("s3").put_object(Bucket=local.bucket, Key=key, Body=buffer.getvalue())
    return buffer.getvalue()


def start_uncertain(local, key: str) -> str:
    put_photo(local, key)
    arn = boto3.client("stepfunctions").start_execution(
        stateMachineArn=MACHINE, input=json.dumps({"s3_bucket": local.bucket, "s3_key": key})
    )["executionArn"]
    return arn


def task_of(local, execution_arn: str, timeout: float = 10) -> dict:
    name = execution_arn.rsplit(":", 1)[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in review.waiting_tasks(local.info):
            if task["execution"] == name:
                return task
        time.sleep(0.05)
    raise AssertionError(f"no review task for {name} after {timeout} s")


def finished(execution_arn: str, timeout: float = 10) -> dict:
    stepfunctions = boto3.client("stepfunctions")
    deadline = time.monotonic() + timeout
    while (described := stepfunctions.describe_execution(executionArn=execution_arn))["status"] == "RUNNING":
        assert time.monotonic() < deadline, f"{execution_arn} still running"
        time.sleep(0.05)
    return described


def answer(local, task: dict, answer_class: str, token: str | None = "test-token") -> tuple[int, dict]:
    request = urllib.request.Request(
        local.info["url"] + "/api/answers",
        data=json.dumps({"task": task["id"], "class": answer_class}).encode(),
        method="POST",
        headers={"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_an_uncertain_photo_waits_for_a_person_and_is_listed_with_the_models_answer(local):
    photo = put_photo(local, "photos/waits.jpg")
    described = run_execution(
        boto3.client("stepfunctions"), MACHINE, {"s3_bucket": local.bucket, "s3_key": "photos/waits.jpg"}
    )
    assert described["status"] == "RUNNING" and described["waiting"]
    task = task_of(local, described["executionArn"])
    assert (task["s3_key"], task["model_class"], task["inferences"]) == ("photos/waits.jpg", "bicycle", [0.6, 0.3])
    assert task["neither"] == pytest.approx(0.1)
    with urllib.request.urlopen(task["photo_url"], timeout=10) as response:  # the presigned URL shows the photo
        assert response.read() == photo


def test_a_confident_photo_never_waits(local):
    local.endpoint.answer_body = b"[0.99, 0.01]"
    try:
        arn = start_uncertain(local, "photos/confident.jpg")
        described = finished(arn)
    finally:
        local.endpoint.answer_body = UNCERTAIN
    assert described["status"] == "SUCCEEDED"
    assert json.loads(described["output"])["source"] == "model"


@pytest.mark.parametrize("answer_class", ["bicycle", "motorcycle"])
def test_a_reviewers_class_resumes_the_execution_and_becomes_a_label(local, answer_class):
    key = f"photos/answered-{answer_class}.jpg"
    arn = start_uncertain(local, key)
    task = task_of(local, arn)
    assert answer(local, task, answer_class)[0] == 200
    described = finished(arn)
    assert described["status"] == "SUCCEEDED"
    output = json.loads(described["output"])
    assert (output["class"], output["source"], output["model_class"]) == (answer_class, "review", "bicycle")
    s3 = boto3.client("s3")
    label = s3.get_object(Bucket=local.bucket, Key=f"labels/{answer_class}/{key}")["Body"].read()
    assert label == s3.get_object(Bucket=local.bucket, Key=key)["Body"].read()
    assert waits_for_callback(boto3.client("stepfunctions"), arn) is False


def test_neither_fails_the_execution_with_not_a_vehicle(local):
    arn = start_uncertain(local, "photos/a-cat.jpg")
    assert answer(local, task_of(local, arn), "neither")[0] == 200
    described = finished(arn)
    assert (described["status"], described["error"]) == ("FAILED", "NotAVehicle")


def test_no_answer_in_time_fails_with_review_timed_out(local):
    arn = start_uncertain(local, "photos/nobody-looks.jpg")
    described = finished(arn, timeout=60)
    assert (described["status"], described["error"]) == ("FAILED", "ReviewTimedOut")


def test_answering_twice_or_without_the_token_changes_nothing(local):
    arn = start_uncertain(local, "photos/twice.jpg")
    task = task_of(local, arn)
    assert answer(local, task, "motorcycle", token=None)[0] == 401
    assert answer(local, task, "motorcycle", token="forged")[0] == 401
    assert boto3.client("stepfunctions").describe_execution(executionArn=arn)["status"] == "RUNNING"
    assert answer(local, task, "motorcycle")[0] == 200
    status, body = answer(local, task, "bicycle")
    assert status in (404, 409) and body["error"]
    assert json.loads(finished(arn)["output"])["class"] == "motorcycle"
    listed = boto3.client("s3").list_objects_v2(Bucket=local.bucket, Prefix="labels/bicycle/photos/twice")
    assert listed["KeyCount"] == 0


def test_the_shell_lists_and_answers_a_task(local, capsys):
    arn = start_uncertain(local, "photos/from-the-shell.jpg")
    name = task_of(local, arn)["execution"]
    arguments = argparse.Namespace(state_dir=None, answer=None, json=False)
    assert review.run(arguments, lambda _: local.info) == 0
    assert name in capsys.readouterr().out
    assert (
        review.run(
            argparse.Namespace(state_dir=None, answer=(name[:12], "motorcycle"), json=False), lambda _: local.info
        )
        == 0
    )
    assert "labels/motorcycle/photos/from-the-shell.jpg" in capsys.readouterr().out
    assert finished(arn)["status"] == "SUCCEEDED"


def test_labels_are_read_back_as_training_photos(local):
    arn = start_uncertain(local, "photos/to-train-on.jpg")
    assert answer(local, task_of(local, arn), "motorcycle")[0] == 200
    finished(arn)
    source = photos.find(f"s3://{local.bucket}/labels/")
    paths = [entry.path for entry in source.entries]
    assert "motorcycle/photos/to-train-on.jpg" in paths


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `make chromium` installs Debian's")
def test_a_reviewer_answers_in_the_browser(local):
    from playwright.sync_api import sync_playwright

    arn = start_uncertain(local, "photos/in-the-browser.jpg")
    task = task_of(local, arn)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{local.info['url']}/#token={local.info['token']}")
            card = page.locator(f'[data-task="{task["id"]}"]')
            card.wait_for(timeout=10_000)
            assert card.locator("img").evaluate("image => image.naturalWidth") == 48  # the photo loaded
            card.locator('[data-class="motorcycle"]').click()
            described = finished(arn)
            card.wait_for(state="detached", timeout=10_000)
        finally:
            browser.close()
    assert described["status"] == "SUCCEEDED"
    assert json.loads(described["output"])["class"] == "motorcycle"
    boto3.client("s3").head_object(Bucket=local.bucket, Key="labels/motorcycle/photos/in-the-browser.jpg")


def test_classify_reports_a_photo_that_waits_for_review(local):
    put_photo(local, "photos/classify-waits.jpg")
    deployed = {
        "bucket": local.bucket,
        "state_machines": {"classify-image": MACHINE},
        "classes": ["bicycle", "motorcycle"],
        "filter_threshold": {"value": 0.93, "source": "default"},
        "review": local.info,
    }
    (row,) = classify.classify_each(deployed, [{"photo": "waits.jpg", "s3_key": "photos/classify-waits.jpg"}], 1)
    assert (row["status"], row["error"], row["accepted"]) == ("RUNNING", classify.WAITING, False)
    assert row["class"] == "bicycle" and row["probabilities"] == {"bicycle": 0.6, "motorcycle": 0.3}
