"""The review Lambdas on moto: an execution waits on a task token (sqs:sendMessage.waitForTaskToken, run by
moto's Step Functions engine), the intake handler turns the queue's message into a waiting task, and the API
handler answers it as API Gateway's HTTP API would call it."""

import hashlib
import http.server
import io
import json
import os
import shutil
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from conftest import definition_of, synth_stacks
from moto import mock_aws
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lambdas"))

from common import review as shared
from review_api import answers, index as api, retrain
from review_intake import index as intake

from local import stepfunctions_engine
from training import photos

BUCKET = "scones-review-data"
TABLE = "scones-test-review"
CLASSES = "bicycle,motorcycle"
NAMESPACE = "SconesTest"
CLAIMS = {"sub": "0000-1111", "email": "ana@example.com"}
TIMEOUT = 3600
ROLE = "arn:aws:iam::123456789012:role/scones-test"
UNCERTAIN = [0.55, 0.4]
REASON = json.dumps(
    {"errorType": "ThresholdConfidenceNotMet", "errorMessage": "THRESHOLD_CONFIDENCE_NOT_MET: 0.55 is below 0.93"}
)


def definition(queue_url: str, timeout_seconds: int) -> str:
    """The review part of the synthesized classify state machine, sending to `queue_url` and waiting
    `timeout_seconds`; an input with `answer` is a confident answer, which succeeds at once with it as output."""
    synthesized = definition_of(synth_stacks()["Workflow"].state_machine)["States"]
    review = {name: synthesized[name] for name in ("Ask a reviewer", "Reviewed", "Not a vehicle", "Review timed out")}
    ask = review["Ask a reviewer"]
    ask["Resource"] = ask["Resource"].replace("<Ref:AWS::Partition>", "aws")
    ask["Parameters"]["QueueUrl"] = queue_url
    ask["TimeoutSeconds"] = timeout_seconds
    return json.dumps(
        {
            "StartAt": "Confident?",
            "States": {
                "Confident?": {
                    "Type": "Choice",
                    "Choices": [{"Variable": "$.answer", "IsPresent": True, "Next": "Confident"}],
                    "Default": "Ask a reviewer",
                },
                "Confident": {"Type": "Pass", "OutputPath": "$.answer", "End": True},
                **review,
            },
        }
    )


def png(key: str) -> bytes:
    """A photo of its own colour for each key."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), tuple(hashlib.sha256(key.encode()).digest()[:3])).save(buffer, format="PNG")
    return buffer.getvalue()


class Review:
    """moto's AWS with the bucket, the table, the queue and the classify state machine the handlers use."""

    def __init__(self) -> None:
        self.s3, self.sqs = boto3.client("s3"), boto3.client("sqs")
        self.dynamodb, self.stepfunctions = boto3.client("dynamodb"), boto3.client("stepfunctions")
        self.s3.create_bucket(Bucket=BUCKET)
        self.s3.create_bucket(Bucket="someone-elses-bucket")
        self.dynamodb.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        self.queue = self.sqs.create_queue(QueueName="scones-test-review")["QueueUrl"]
        self.state_machine = self.state_machine_of("scones-test-classify-image", TIMEOUT)
        os.environ["STATE_MACHINE_ARN"] = self.state_machine

    def state_machine_of(self, name: str, timeout_seconds: int) -> str:
        return self.stepfunctions.create_state_machine(
            name=name, definition=definition(self.queue, timeout_seconds), roleArn=ROLE
        )["stateMachineArn"]

    def start(self, key: str, inferences=UNCERTAIN, bucket=BUCKET, state_machine=None, name=None) -> str:
        """Start an uncertain execution for a photo put at `key`; answers its ARN once it waits for a reviewer."""
        if bucket == BUCKET:
            self.s3.put_object(Bucket=BUCKET, Key=key, Body=png(key))
        execution_input = {"s3_bucket": bucket, "s3_key": key, "inferences": inferences, "error": {"Cause": REASON}}
        arn = self.stepfunctions.start_execution(
            stateMachineArn=state_machine or self.state_machine,
            input=json.dumps(execution_input),
            name=name or key.replace("/", "-"),
        )["executionArn"]
        return arn

    def messages(self, count: int, started: str | None = None) -> list[dict]:
        """The next `count` messages of the review queue, as SQS event records, deleted from the queue; when
        they do not come, the execution `started` says why."""
        records, deadline = [], time.monotonic() + 30
        while len(records) < count and time.monotonic() < deadline:
            for message in self.sqs.receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10).get("Messages", []):
                records.append({"messageId": message["MessageId"], "body": message["Body"]})
                self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=message["ReceiptHandle"])
            time.sleep(0.01)
        assert len(records) == count, started and self.history(started)
        return records

    def history(self, arn: str) -> str:
        status = self.stepfunctions.describe_execution(executionArn=arn)["status"]
        events = self.stepfunctions.get_execution_history(executionArn=arn)["events"]
        return f"{arn} is {status}: " + json.dumps(events, default=str)[-3000:]

    def waiting(self, key: str, **kwargs) -> str:
        """A waiting task for the photo `key` through the intake handler; answers the task's id."""
        (record,) = self.messages(1, started=self.start(key, **kwargs))
        assert intake.handler({"Records": [record]}, None) == {"batchItemFailures": []}
        return self.tasks()[-1]["sk"]

    def tasks(self) -> list[dict]:
        found = self.dynamodb.query(
            TableName=TABLE, KeyConditionExpression="pk = :pk", ExpressionAttributeValues={":pk": {"S": "task"}}
        )
        return [shared.from_item(item) for item in found["Items"]]

    def answer_item(self, name: str) -> dict | None:
        found = self.dynamodb.get_item(TableName=TABLE, Key={"pk": {"S": "answer"}, "sk": {"S": name}})
        return shared.from_item(found["Item"]) if "Item" in found else None

    def finished(self, arn: str) -> dict:
        deadline = time.monotonic() + 10
        while (described := self.stepfunctions.describe_execution(executionArn=arn))["status"] == "RUNNING":
            assert time.monotonic() < deadline, f"{arn} still running"
            time.sleep(0.01)
        return described

    def keys(self, prefix: str) -> list[str]:
        return [item["Key"] for item in self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


@pytest.fixture
def review(monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    environment = {
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "TABLE_NAME": TABLE,
        "BUCKET_NAME": BUCKET,
        "CLASS_NAMES": CLASSES,
        "METRIC_NAMESPACE": NAMESPACE,
        "USER_POOL_CLIENT_ID": "client-id-1",
        "USER_POOL_REGION": "eu-west-1",
        "REVIEW_TIMEOUT_SECONDS": str(TIMEOUT),
        "STATE_MACHINE_ARN": "",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    for client in (shared.dynamodb_client, answers.s3_client, answers.stepfunctions_client, retrain.events_client):
        client.cache_clear()
    stepfunctions_engine.install()
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}}):
        yield Review()
    for client in (shared.dynamodb_client, answers.s3_client, answers.stepfunctions_client, retrain.events_client):
        client.cache_clear()


def call(method: str, path: str, body=None, query=None, claims=CLAIMS, raw_body=None) -> tuple[int, dict]:
    """The API handler's status and JSON body for a request as API Gateway (payload format 2.0) passes it."""
    context = {"http": {"method": method, "path": path}, "stage": "$default"}
    if claims is not None:
        context["authorizer"] = {"jwt": {"claims": claims}}
    event = {"version": "2.0", "rawPath": path, "requestContext": context, "queryStringParameters": query}
    if body is not None or raw_body is not None:
        event["body"] = raw_body if raw_body is not None else json.dumps(body)
    answer = api.handler(event, None)
    return answer["statusCode"], json.loads(answer["body"])


def emf_lines(captured: str) -> list[dict]:
    return [record for line in captured.splitlines() if "_aws" in (record := json.loads(line))]


# ----------------------------------------------------------------------------------------- intake


def test_intake_writes_the_waiting_task_and_a_redelivery_writes_the_same(review, capsys):
    arn = review.start("photos/a.png")
    (record,) = review.messages(1)

    assert intake.handler({"Records": [record]}, None) == {"batchItemFailures": []}
    (task,) = review.tasks()
    assert intake.handler({"Records": [record, record]}, None) == {"batchItemFailures": []}

    assert review.tasks() == [task]
    body = json.loads(record["body"])
    requested = shared.epoch(body["requested_at"])
    assert task == {
        "pk": "task",
        "sk": f"{body['requested_at']}#photos-a.png",
        "task_token": body["task_token"],
        "execution_arn": arn,
        "s3_bucket": BUCKET,
        "s3_key": "photos/a.png",
        "inferences": json.dumps(UNCERTAIN),
        "reason": "THRESHOLD_CONFIDENCE_NOT_MET: 0.55 is below 0.93",
        "requested_at": body["requested_at"],
        "deadline": pytest.approx(requested + TIMEOUT, abs=1),
        "expires_at": pytest.approx(requested + TIMEOUT + 86400, abs=1),
    }
    logs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(log["received"], len(log["written"]), log["failed"]) for log in logs] == [(1, 1, []), (2, 2, [])]


@pytest.mark.parametrize(
    "body, problem",
    [
        ("not json", "The message is not JSON"),
        ("[1, 2]", "The message is a list, not a JSON object"),
        (json.dumps({"execution_arn": "arn:x"}), "The message's task_token is None"),
        ("{}", "The message's task_token is None"),
        (
            json.dumps(
                {"task_token": "t", "execution_arn": "arn:aws:states:us-east-1:1:execution:m:n", "requested_at": "soon"}
                | {"s3_bucket": BUCKET, "s3_key": "k", "inferences": [0.5]}
            ),
            "requested_at 'soon' is not an ISO 8601 time",
        ),
        (
            json.dumps(
                {"task_token": "t", "execution_arn": "arn:aws:states:us-east-1:1:execution:m:n"}
                | {"requested_at": "2026-01-01T00:00:00.000Z", "s3_bucket": BUCKET, "s3_key": "k", "inferences": "x"}
            ),
            "inferences of s3://scones-review-data/k are 'x', not a list of class probabilities",
        ),
    ],
)
def test_intake_fails_a_bad_record_alone_saying_what_is_wrong(review, capsys, body, problem):
    review.start("photos/good.png")
    (good,) = review.messages(1)
    bad = {"messageId": "bad-1", "body": body}

    assert intake.handler({"Records": [bad, good]}, None) == {"batchItemFailures": [{"itemIdentifier": "bad-1"}]}

    assert [task["s3_key"] for task in review.tasks()] == ["photos/good.png"]
    (log,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(f["message"], f["error"]) for f in log["failed"]] == [("bad-1", "InvalidTaskMessage")]
    assert log["failed"][0]["detail"].startswith(problem)
    with pytest.raises(intake.InvalidTaskMessage, match=problem[:20]):
        intake.task_item(body, TIMEOUT)


# ------------------------------------------------------------------------------------------ tasks


def test_tasks_are_listed_oldest_first_in_pages(review):
    ids = [review.waiting(f"photos/{i}.png") for i in range(5)]

    pages, after = [], None
    while True:
        status, page = call("GET", "/api/tasks", query={"limit": "2", **({"after": after} if after else {})})
        assert status == 200
        pages.append([task["id"] for task in page["tasks"]])
        after = page["next"]
        if not after:
            break

    assert pages == [ids[0:2], ids[2:4], ids[4:5]]
    assert ids == sorted(ids)
    status, page = call("GET", "/api/tasks")
    first = page["tasks"][0]
    assert first == {
        "id": ids[0],
        "execution": "photos-0.png",
        "s3_key": "photos/0.png",
        "photo_url": first["photo_url"],
        "inferences": UNCERTAIN,
        "classes": ["bicycle", "motorcycle"],
        "neither": 0.05,
        "model_class": "bicycle",
        "reason": "THRESHOLD_CONFIDENCE_NOT_MET: 0.55 is below 0.93",
        "requested_at": ids[0].partition("#")[0],
        "deadline": first["deadline"],
    }
    assert "X-Amz-Expires=300" in first["photo_url"] and "/photos/0.png" in first["photo_url"]


def test_tasks_past_their_deadline_are_left_out(review, monkeypatch):
    fresh = review.waiting("photos/fresh.png")
    body = {
        "task_token": "old-token",
        "execution_arn": "arn:aws:states:us-east-1:123456789012:execution:scones-test-classify-image:old",
        "requested_at": shared.iso(time.time() - 120),
        "s3_bucket": BUCKET,
        "s3_key": "photos/old.png",
        "inferences": UNCERTAIN,
        "reason": REASON,
    }
    monkeypatch.setenv("REVIEW_TIMEOUT_SECONDS", "60")
    intake.handler({"Records": [{"messageId": "m", "body": json.dumps(body)}]}, None)
    old = f"{body['requested_at']}#old"
    assert {task["sk"] for task in review.tasks()} == {old, fresh}

    assert [task["id"] for task in call("GET", "/api/tasks")[1]["tasks"]] == [fresh]
    monkeypatch.delenv("REVIEW_TIMEOUT_SECONDS")  # the deadline alone, without the key's lower bound
    assert [task["id"] for task in call("GET", "/api/tasks")[1]["tasks"]] == [fresh]

    status, answer = call("POST", "/api/answers", {"task": old, "class": "bicycle"})
    assert status == 410 and "deadline" in answer["error"]
    assert [task["sk"] for task in review.tasks()] == [fresh]
    assert review.answer_item("old") is None and review.keys("labels/") == []


@pytest.mark.parametrize(
    "query, problem", [({"limit": "0"}, "limit='0'"), ({"limit": "101"}, "limit='101'"), ({"limit": "x"}, "limit='x'")]
)
def test_a_bad_page_size_is_refused(review, query, problem):
    status, answer = call("GET", "/api/tasks", query=query)
    assert status == 400 and answer["error"].startswith(problem)


# ---------------------------------------------------------------------------------------- answers


def test_answer_bicycle_resumes_the_execution_and_records_the_label(review, capsys):
    task = review.waiting("test/bicycle_s_000123.png")
    arn = review.tasks()[0]["execution_arn"]
    capsys.readouterr()

    status, answer = call("POST", "/api/answers", {"task": task, "class": "bicycle"})

    assert status == 200
    name = "test-bicycle_s_000123.png"
    assert answer == {
        "execution": name,
        "class": "bicycle",
        "label": f"s3://{BUCKET}/labels/bicycle/test/bicycle_s_000123.png",
    }
    described = review.finished(arn)
    assert described["status"] == "SUCCEEDED"
    output = json.loads(described["output"])
    assert output == {
        "s3_bucket": BUCKET,
        "s3_key": "test/bicycle_s_000123.png",
        "class": "bicycle",
        "source": "review",
        "inferences": UNCERTAIN,
        "neither": 0.05,
        "model_class": "bicycle",
        "reviewer": "ana@example.com",
        "reviewed_at": output["reviewed_at"],
    }
    photo = review.s3.get_object(Bucket=BUCKET, Key="test/bicycle_s_000123.png")["Body"].read()
    label = review.s3.get_object(Bucket=BUCKET, Key="labels/bicycle/test/bicycle_s_000123.png")["Body"].read()
    assert label == photo
    (line_key,) = review.keys("reviews/")
    day = output["reviewed_at"][:10].replace("-", "/")
    assert line_key == f"reviews/{day}/{name}.json"
    line = review.s3.get_object(Bucket=BUCKET, Key=line_key)["Body"].read().decode()
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "execution": name,
        "s3_key": "test/bicycle_s_000123.png",
        "model_class": "bicycle",
        "inferences": UNCERTAIN,
        "class": "bicycle",
        "reviewer": "ana@example.com",
        "answered_at": output["reviewed_at"],
        "kind": "task",
    }
    assert review.tasks() == []
    assert review.answer_item(name)["class"] == "bicycle"
    (metric,) = emf_lines(capsys.readouterr().out)
    assert metric["_aws"]["CloudWatchMetrics"] == [
        {
            "Namespace": NAMESPACE,
            "Dimensions": [["ReviewTable", "ModelClass"]],
            "Metrics": [{"Name": "ReviewAnswers", "Unit": "Count"}, {"Name": "Overruled", "Unit": "Count"}],
        },
        {
            "Namespace": NAMESPACE,
            "Dimensions": [["ReviewTable"]],
            "Metrics": [{"Name": "NotAVehicle", "Unit": "Count"}],
        },
    ]
    assert metric["ReviewTable"] == TABLE  # one per environment: dev's and prod's reviews do not mix
    assert (metric["ModelClass"], metric["ReviewAnswers"], metric["Overruled"], metric["NotAVehicle"]) == (
        "bicycle",
        1,
        0,
        0,
    )


def test_answer_neither_fails_the_execution_with_not_a_vehicle(review, capsys):
    task = review.waiting("photos/car.png", inferences=[0.3, 0.25])
    arn = review.tasks()[0]["execution_arn"]

    status, answer = call("POST", "/api/answers", {"task": task, "class": "neither"})

    assert (status, answer["label"]) == (200, f"s3://{BUCKET}/labels/neither/photos/car.png")
    described = review.finished(arn)
    assert (described["status"], described["error"]) == ("FAILED", "NotAVehicle")
    # moto 5.2.5's SendTaskFailure drops the cause, so the sentence naming photo and reviewer is not seen here
    (metric,) = emf_lines(capsys.readouterr().out)
    assert (metric["ModelClass"], metric["Overruled"]) == ("neither", 0)  # the model's most likely: 1 - 0.55
    assert metric["NotAVehicle"] == 1  # the failure-rate alarm leaves this execution's failure out


def test_answering_twice_is_refused_and_changes_nothing(review):
    task = review.waiting("photos/twice.png")
    assert call("POST", "/api/answers", {"task": task, "class": "motorcycle"})[0] == 200
    labels, lines = review.keys("labels/"), review.keys("reviews/")

    status, answer = call("POST", "/api/answers", {"task": task, "class": "bicycle"}, claims={"sub": "bob"})

    assert status == 409
    assert "already answered 'motorcycle' by ana@example.com" in answer["error"]
    assert (
        (review.keys("labels/"), review.keys("reviews/"))
        == (labels, lines)
        == (
            ["labels/motorcycle/photos/twice.png"],
            lines,
        )
    )
    assert review.answer_item("photos-twice.png")["reviewer"] == "ana@example.com"


def test_of_two_reviewers_answering_at_once_exactly_one_counts(review, one_writer_per_item):
    task = review.waiting("photos/race.png")
    arn = review.tasks()[0]["execution_arn"]
    barrier, results = threading.Barrier(2), {}

    def reviewer(name: str, chosen: str) -> None:
        barrier.wait()
        results[name] = call("POST", "/api/answers", {"task": task, "class": chosen}, claims={"email": name})

    threads = [threading.Thread(target=reviewer, args=args) for args in (("ana", "bicycle"), ("bob", "motorcycle"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(status for status, _ in results.values()) == [200, 409]
    (winner,) = [name for name, (status, _) in results.items() if status == 200]
    chosen = {"ana": "bicycle", "bob": "motorcycle"}[winner]
    assert json.loads(review.finished(arn)["output"])["class"] == chosen
    assert review.keys("labels/") == [f"labels/{chosen}/photos/race.png"]
    assert len(review.keys("reviews/")) == 1


def test_an_unknown_task_is_not_found(review):
    status, answer = call("POST", "/api/answers", {"task": "2026-01-01T00:00:00.000Z#nobody", "class": "bicycle"})
    assert status == 404 and "No task" in answer["error"]


def test_a_timed_out_execution_cannot_be_answered(review):
    """The state machine gave up waiting (1 s) while the task's own deadline, from the intake's timeout, has not
    passed: the execution's state says the answer comes too late. (A stopped execution takes the same path on
    AWS; moto keeps an execution stopped during a callback wait RUNNING until the callback arrives.)"""
    short = review.state_machine_of("scones-test-short", 1)
    task = review.waiting("photos/late.png", state_machine=short)
    arn = review.tasks()[0]["execution_arn"]
    described = review.finished(arn)
    assert (described["status"], described["error"]) == ("FAILED", "ReviewTimedOut")

    status, answer = call("POST", "/api/answers", {"task": task, "class": "motorcycle"})

    assert status == 410 and "FAILED" in answer["error"]
    assert review.tasks() == [] and review.answer_item("photos-late.png") is None
    assert review.keys("labels/") == [] and review.keys("reviews/") == []


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"class": "car"}, "class 'car' is not one of bicycle, motorcycle, neither"),
        ({"class": None}, "class None is not one of"),
        ({"task": None, "class": "bicycle"}, "The body has no task"),
    ],
)
def test_a_bad_answer_is_refused_and_changes_nothing(review, body, problem):
    task = review.waiting("photos/bad.png")
    status, answer = call("POST", "/api/answers", {"task": task, **body})
    assert status == 400 and answer["error"].startswith(problem)
    assert len(review.tasks()) == 1 and review.keys("labels/") == []


@pytest.mark.parametrize("raw", ["{not json", "[1]", ""])
def test_a_body_that_is_not_a_json_object_is_refused(review, raw):
    status, answer = call("POST", "/api/answers", raw_body=raw)
    assert status == 400 and answer["error"].startswith("The body is not a JSON object")


def test_a_photo_in_another_bucket_is_refused_and_nothing_is_written(review):
    task = review.waiting("photos/elsewhere.png", bucket="someone-elses-bucket")
    arn = review.tasks()[0]["execution_arn"]
    assert call("GET", "/api/tasks")[1]["tasks"][0]["photo_url"] is None

    status, answer = call("POST", "/api/answers", {"task": task, "class": "bicycle"})

    assert status == 400 and "not in the workflow's bucket scones-review-data" in answer["error"]
    assert review.stepfunctions.describe_execution(executionArn=arn)["status"] == "RUNNING"
    assert len(review.tasks()) == 1 and review.answer_item("photos-elsewhere.png") is None
    assert review.keys("") == []


@pytest.mark.parametrize("claims", [None, {}], ids=["no authorizer", "no claims"])
@pytest.mark.parametrize(
    "method, path",
    [("GET", "/api/tasks"), ("POST", "/api/answers"), ("GET", "/api/recent"), ("POST", "/api/corrections")],
)
def test_without_claims_every_api_route_is_unauthorized(review, claims, method, path):
    task = review.waiting("photos/private.png")
    body = {"task": task, "execution": "photos-private.png", "class": "bicycle"}
    status, answer = call(method, path, body if method == "POST" else None, claims=claims)
    assert status == 401 and ("Sign in" in answer["error"] or "names no user" in answer["error"])
    assert len(review.tasks()) == 1 and review.keys("labels/") == []


def test_unknown_routes_and_methods(review):
    assert call("GET", "/api/nothing")[0] == 404
    assert call("GET", "/elsewhere")[0] == 404
    assert call("DELETE", "/api/tasks")[0] == 405
    assert call("GET", "/api/answers")[0] == 405
    assert call("POST", "/")[0] == 405


# ----------------------------------------------------------------------------- recent, corrections


def confident(review, name: str, key: str, predicted: str, inferences: list[float]) -> str:
    answer = {"s3_bucket": BUCKET, "s3_key": key, "class": predicted, "inferences": inferences, "source": "model"}
    review.s3.put_object(Bucket=BUCKET, Key=key, Body=png(key))
    arn = review.stepfunctions.start_execution(
        stateMachineArn=review.state_machine, name=name, input=json.dumps({"answer": answer})
    )["executionArn"]
    assert review.finished(arn)["status"] == "SUCCEEDED"
    return arn


def test_recent_lists_succeeded_executions_newest_first(review):
    for i in range(3):
        confident(review, f"ok-{i}", f"test/motorcycle_{i}.png", "motorcycle", [0.02, 0.97])
        time.sleep(0.01)
    review.start("photos/waiting.png")  # running: not an answer yet

    status, recent = call("GET", "/api/recent", query={"limit": "2"})

    assert status == 200
    assert [answer["execution"] for answer in recent["answers"]] == ["ok-2", "ok-1"]
    first = recent["answers"][0]
    assert (first["s3_key"], first["class"], first["source"], first["inferences"]) == (
        "test/motorcycle_2.png",
        "motorcycle",
        "model",
        [0.02, 0.97],
    )
    assert first["neither"] == pytest.approx(0.01) and "X-Amz-Expires=300" in first["photo_url"]
    assert first["stopped_at"] > recent["answers"][1]["stopped_at"]
    assert call("GET", "/api/recent", query={"limit": "51"})[0] == 400


def test_a_correction_records_the_label_once_and_leaves_the_execution(review, capsys):
    arn = confident(review, "ok-1", "test/motorcycle_1.png", "motorcycle", [0.02, 0.97])
    before = review.stepfunctions.describe_execution(executionArn=arn)
    capsys.readouterr()

    status, answer = call("POST", "/api/corrections", {"execution": "ok-1", "class": "bicycle"})

    assert (status, answer) == (
        200,
        {"execution": "ok-1", "class": "bicycle", "label": f"s3://{BUCKET}/labels/bicycle/test/motorcycle_1.png"},
    )
    (line_key,) = review.keys("reviews/")
    line = json.loads(review.s3.get_object(Bucket=BUCKET, Key=line_key)["Body"].read())
    assert (line["kind"], line["model_class"], line["class"], line["execution"]) == (
        "correction",
        "motorcycle",
        "bicycle",
        "ok-1",
    )
    (metric,) = emf_lines(capsys.readouterr().out)
    assert (metric["ModelClass"], metric["ReviewAnswers"], metric["Overruled"]) == ("motorcycle", 1, 1)
    assert review.stepfunctions.describe_execution(executionArn=arn)["output"] == before["output"]

    status, answer = call("POST", "/api/corrections", {"execution": "ok-1", "class": "neither"})
    assert status == 409 and "already answered 'bicycle'" in answer["error"]
    assert review.keys("labels/") == ["labels/bicycle/test/motorcycle_1.png"]


def test_a_correction_of_an_unknown_or_unfinished_execution_is_not_found(review):
    review.start("photos/running.png")
    for name in ("nobody", "photos-running.png", "../../x"):
        status, answer = call("POST", "/api/corrections", {"execution": name, "class": "bicycle"})
        assert status == 404, name
    assert review.keys("labels/") == []


def test_a_correction_of_a_photo_in_another_bucket_is_refused(review):
    answer = {"s3_bucket": "someone-elses-bucket", "s3_key": "x.png", "class": "bicycle", "inferences": [0.99, 0.0]}
    arn = review.stepfunctions.start_execution(
        stateMachineArn=review.state_machine, name="elsewhere", input=json.dumps({"answer": answer})
    )["executionArn"]
    review.finished(arn)
    status, problem = call("POST", "/api/corrections", {"execution": "elsewhere", "class": "motorcycle"})
    assert status == 400 and "not in the workflow's bucket" in problem["error"]
    assert review.answer_item("elsewhere") is None and review.keys("") == []


# ------------------------------------------------------------------------------- metrics, page, data


def test_the_schedule_publishes_the_queue_metrics(review, capsys):
    assert api.handler({"action": "publish_queue_metrics"}, None)["ReviewsWaiting"] == 0
    review.waiting("photos/1.png")
    time.sleep(0.05)
    review.waiting("photos/2.png")
    capsys.readouterr()

    api.handler({"action": "publish_queue_metrics"}, None)

    (metric,) = emf_lines(capsys.readouterr().out)
    assert metric["_aws"]["CloudWatchMetrics"] == [
        {
            "Namespace": NAMESPACE,
            "Dimensions": [["ReviewTable"]],
            "Metrics": [
                {"Name": "ReviewsWaiting", "Unit": "Count"},
                {"Name": "OldestReviewAgeSeconds", "Unit": "Seconds"},
            ],
        }
    ]
    oldest = shared.epoch(review.tasks()[0]["requested_at"])
    assert (metric["ReviewsWaiting"], metric["ReviewTable"]) == (2, TABLE)
    assert metric["OldestReviewAgeSeconds"] == pytest.approx(time.time() - oldest, abs=1)


def test_the_page_is_public_and_allows_only_its_own_script(review):
    answer = api.handler({"rawPath": "/", "requestContext": {"http": {"method": "GET"}}}, None)

    assert answer["statusCode"] == 200 and answer["headers"]["content-type"].startswith("text/html")
    page = answer["body"]
    assert 'data-client-id="client-id-1"' in page and 'data-region="eu-west-1"' in page
    policy = answer["headers"]["content-security-policy"]
    assert (
        f"script-src {api.SCRIPT_HASH};" in policy
        and "connect-src 'self' https://cognito-idp.eu-west-1.amazonaws.com" in policy
    )
    assert "http" not in page.replace("https://cognito-idp", "").replace("http-equiv", "").split("<script>")[0]
    for marker in ("data-task", "data-class", 'id="status"'):
        assert marker in page


def test_the_labels_read_back_as_training_photos(review, tmp_path):
    for key, chosen in (("p/1.png", "bicycle"), ("p/2.png", "motorcycle"), ("p/3.png", "neither")):
        task = review.waiting(key)
        assert call("POST", "/api/answers", {"task": task, "class": chosen})[0] == 200
    confident(review, "ok-9", "p/4.png", "motorcycle", [0.03, 0.96])
    assert call("POST", "/api/corrections", {"execution": "ok-9", "class": "bicycle"})[0] == 200
    review.s3.put_object(Bucket=BUCKET, Key=f"labels/{photos.MARKER}", Body=b"the training state machine's")

    (tmp_path / "train").mkdir()
    source = photos.find(f"s3://{BUCKET}/labels/", review.s3)
    staged = photos.stage(source, tmp_path, ["bicycle", "motorcycle"], validation_fraction=0.0, seed=0, progress=False)

    assert staged.section["skipped"] == []
    assert sorted(staged.section["staged"].values()) == [
        "bicycle/p/1.png",
        "bicycle/p/4.png",
        "motorcycle/p/2.png",
        "neither/p/3.png",
    ]
    assert sorted(label for label, _ in staged.rows["train"]) == ["bicycle", "bicycle", "motorcycle", "neither"]


# ------------------------------------------------------------------------------------------ retraining


@pytest.fixture
def one_writer_per_item(monkeypatch):
    """DynamoDB applies each request to an item at once, its condition and its return values included; moto's
    in-process handler does not (threads can lose an ADD, both pass a condition, or an UpdateItem answer
    UPDATED_NEW from an item read before another thread's write), so its item requests are serialized here."""
    from moto.dynamodb.responses import DynamoHandler

    lock = threading.RLock()
    for name in ("put_item", "update_item", "delete_item", "get_item"):
        unlocked = getattr(DynamoHandler, name)

        def locked(*args, _unlocked=unlocked, **kwargs):
            with lock:
                return _unlocked(*args, **kwargs)

        monkeypatch.setattr(DynamoHandler, name, locked)


def retraining_events(review) -> str:
    """A rule on the default event bus that sends the review API's retraining events to a new queue (as the
    monitoring stack's rule starts the training state machine); answers the queue's URL."""
    queue = review.sqs.create_queue(QueueName="scones-test-retrain-events")["QueueUrl"]
    queue_arn = review.sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events = boto3.client("events")
    pattern = {"source": ["scones.review"], "detail-type": ["Reviewed labels accumulated"]}
    events.put_rule(Name="retrain-on-labels", EventPattern=json.dumps(pattern))
    events.put_targets(Rule="retrain-on-labels", Targets=[{"Id": "queue", "Arn": queue_arn}])
    return queue


def received(review, queue: str) -> list[dict]:
    """The events in `queue` (deleted from it)."""
    found = []
    while messages := review.sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", []):
        for message in messages:
            found.append(json.loads(message["Body"]))
            review.sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
    return found


def labels_counted(review) -> int | None:
    found = review.dynamodb.get_item(
        TableName=TABLE, Key={"pk": {"S": "counter"}, "sk": {"S": "labels-since-training"}}
    )
    return int(found["Item"]["labels"]["N"]) if "Item" in found else None


def answer(review, key: str, chosen: str = "bicycle") -> None:
    task = review.waiting(key)
    assert call("POST", "/api/answers", {"task": task, "class": chosen})[0] == 200


def test_every_second_label_asks_for_one_retraining(review, monkeypatch, capsys):
    monkeypatch.setenv("RETRAIN_AFTER_LABELS", "2")
    queue = retraining_events(review)

    answer(review, "photos/1.png")
    assert (received(review, queue), labels_counted(review)) == ([], 1)

    answer(review, "photos/2.png", "neither")

    (event,) = received(review, queue)
    assert (event["source"], event["detail-type"]) == ("scones.review", "Reviewed labels accumulated")
    assert event["detail"] == {
        "labels": 2,
        "labels_prefix": f"s3://{BUCKET}/labels/",
        "state_machine": review.state_machine,
    }
    assert labels_counted(review) == 0
    assert review.keys("labels/") == ["labels/bicycle/photos/1.png", "labels/neither/photos/2.png"]
    # a correction writes a label too: it counts
    answer(review, "photos/3.png")
    confident(review, "ok-1", "test/motorcycle_1.png", "motorcycle", [0.02, 0.97])
    assert call("POST", "/api/corrections", {"execution": "ok-1", "class": "bicycle"})[0] == 200
    assert [event["detail"]["labels"] for event in received(review, queue)] == [2]
    assert labels_counted(review) == 0
    logs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"retraining"' in line]
    assert [log["retraining"] for log in logs] == ["requested", "requested"]


def test_an_answer_whose_photo_is_gone_writes_no_label_and_counts_none(review, monkeypatch):
    monkeypatch.setenv("RETRAIN_AFTER_LABELS", "1")
    queue = retraining_events(review)
    task = review.waiting("photos/gone.png")
    review.s3.delete_object(Bucket=BUCKET, Key="photos/gone.png")

    assert call("POST", "/api/answers", {"task": task, "class": "bicycle"}) == (
        200,
        {"execution": "photos-gone.png", "class": "bicycle", "label": None},
    )

    assert (received(review, queue), labels_counted(review)) == ([], None)


def test_without_the_setting_labels_are_not_counted(review):
    queue = retraining_events(review)
    for i in range(3):
        answer(review, f"photos/{i}.png")

    assert (received(review, queue), labels_counted(review)) == ([], None)


def test_of_two_answers_crossing_the_count_together_exactly_one_asks(review, monkeypatch, one_writer_per_item):
    monkeypatch.setenv("RETRAIN_AFTER_LABELS", "2")
    queue = retraining_events(review)
    answer(review, "photos/first.png")
    tasks = [review.waiting(f"photos/together-{i}.png") for i in range(2)]
    barrier, statuses = threading.Barrier(2), []

    def reviewer(task: str) -> None:
        barrier.wait()
        statuses.append(call("POST", "/api/answers", {"task": task, "class": "motorcycle"})[0])

    threads = [threading.Thread(target=reviewer, args=(task,)) for task in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200, 200]
    (event,) = received(review, queue)
    # the event takes the labels its answer saw; one counted meanwhile stays counted towards the next retraining
    assert (event["detail"]["labels"], labels_counted(review)) in ((2, 1), (3, 0))


def test_labels_counted_at_once_ask_once_per_n_and_lose_none(review, monkeypatch, one_writer_per_item):
    monkeypatch.setenv("RETRAIN_AFTER_LABELS", "3")
    queue = retraining_events(review)
    barrier = threading.Barrier(8)

    def reviewer() -> None:
        barrier.wait()
        for _ in range(3):
            retrain.count_label(BUCKET)

    threads = [threading.Thread(target=reviewer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    asked = [event["detail"]["labels"] for event in received(review, queue)]
    assert all(labels >= 3 for labels in asked)
    assert sum(asked) + labels_counted(review) == 24
    assert labels_counted(review) < 3
    assert len(asked) <= 8


@pytest.mark.parametrize(
    "failure",
    [
        lambda stub: stub.add_client_error("put_events", "InternalException", "EventBridge is unavailable", 500),
        lambda stub: stub.add_response(
            "put_events",
            {"FailedEntryCount": 1, "Entries": [{"ErrorCode": "ThrottlingException", "ErrorMessage": "Rate exceeded"}]},
        ),
    ],
    ids=["error", "failed entry"],
)
def test_a_failed_put_events_keeps_the_answer_and_the_next_label_asks_again(review, monkeypatch, capsys, failure):
    """moto's EventBridge cannot be made to fail, so botocore's Stubber gives the two failures EventBridge
    answers: an error, and a 200 whose entry failed."""
    monkeypatch.setenv("RETRAIN_AFTER_LABELS", "1")
    queue = retraining_events(review)

    with Stubber(retrain.events_client()) as stub:
        failure(stub)
        answer(review, "photos/unheard.png")
        stub.assert_no_pending_responses()

    assert review.keys("labels/") == ["labels/bicycle/photos/unheard.png"]
    assert labels_counted(review) == 1
    (log,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"retraining"' in line]
    assert (log["retraining"], log["labels"]) == ("not requested", 1)
    assert "unavailable" in log["error"] or "Rate exceeded" in log["error"]

    answer(review, "photos/heard.png")

    assert [event["detail"]["labels"] for event in received(review, queue)] == [2]
    assert labels_counted(review) == 0


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_retrain_after_labels_is_named(review, monkeypatch, value):
    monkeypatch.setenv("RETRAIN_AFTER_LABELS", value)
    with pytest.raises(retrain.InvalidConfiguration, match=f"RETRAIN_AFTER_LABELS='{value}'.*retrain_after_labels"):
        retrain.labels_per_retraining()


# --------------------------------------------------------------------------------------------- browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LOCAL_TOKEN = "local-test-token"


class PageServer(http.server.ThreadingHTTPServer):
    """The API handler behind 127.0.0.1 as API Gateway calls it: `/api/` requests with the Bearer token
    LOCAL_TOKEN get claims, as a JWT authorizer would give them; others get none."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Request)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Request(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def handle_one(self) -> None:
        path, _, query = self.path.partition("?")
        context = {"http": {"method": self.command, "path": path}, "stage": "$default"}
        if self.headers.get("authorization") == f"Bearer {LOCAL_TOKEN}":
            context["authorizer"] = {"jwt": {"claims": {"sub": "local", "email": "local reviewer"}}}
        length = int(self.headers.get("content-length") or 0)
        event = {
            "rawPath": path,
            "requestContext": context,
            "queryStringParameters": dict(urllib.parse.parse_qsl(query)) or None,
            "body": self.rfile.read(length).decode() if length else None,
        }
        answer = api.handler(event, None)
        body = answer["body"].encode()
        self.send_response(answer["statusCode"])
        for name, value in answer["headers"].items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = handle_one


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH: `make chromium` installs Debian's")
def test_the_page_in_headless_chromium_answers_a_task(review, capsys):
    from playwright.sync_api import expect, sync_playwright

    task = review.waiting("test/motorcycle_s_000042.png")
    arn = review.tasks()[0]["execution_arn"]
    confident(review, "ok-1", "test/bicycle_s_000001.png", "bicycle", [0.98, 0.01])
    server = PageServer()
    problems = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.route("https://**", lambda route: route.abort())  # the photos' presigned S3 URLs: no network
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.goto(f"{server.url}#token={LOCAL_TOKEN}")
            card = page.locator(f'[data-task="{task}"]')
            card.wait_for(timeout=5000)
            assert "Model: bicycle" in card.inner_text() and "motorcycle: 40.0 %" in card.inner_text()
            page.locator('[data-execution="ok-1"]').wait_for(timeout=5000)

            card.locator('[data-class="motorcycle"]').click()
            expect(page.locator("#status")).to_contain_text("Answered", timeout=5000)
            card.wait_for(state="detached", timeout=5000)

            page.locator('[data-execution="ok-1"] [data-class="neither"]').click()
            expect(page.locator("#status")).to_contain_text("Corrected", timeout=5000)
            browser.close()
    finally:
        server.close()

    assert json.loads(review.finished(arn)["output"])["class"] == "motorcycle"
    assert review.keys("labels/") == [
        "labels/motorcycle/test/motorcycle_s_000042.png",
        "labels/neither/test/bicycle_s_000001.png",
    ]
    # the photos' presigned URLs point at S3 itself, which this test's moto does not serve over HTTP
    assert [p for p in problems if "Failed to load resource" not in p and "ERR_" not in p] == []
