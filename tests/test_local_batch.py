"""The Distributed Map's result files on the local engine (local.engine_result_writer), as AWS writes them:
`<Prefix><map run id>/SUCCEEDED_0.json`, `FAILED_0.json`, `PENDING_0.json` (each only when it has
executions) and `manifest.json`, which the Map's output names under `ResultWriterDetails`."""

import datetime
import json

import boto3
import pytest
from fake_endpoint import FakeEndpointRequest
from test_local_workflow import deployment, put_image, run, state_machine_arn  # noqa: F401 - shared fixture

from local.executions import run_execution

pytestmark = pytest.mark.slow

ACCOUNT_REGION = "us-east-1:123456789012"


class PerImageRequest(FakeEndpointRequest):
    """Answers each image's own probabilities (`server.answers`, by the image's bytes)."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "content_type": self.headers["Content-Type"], "body": body})
        self.reply(200, self.server.answers[body], {})


@pytest.fixture
def endpoint(deployment):  # noqa: F811
    deployment.endpoint.RequestHandlerClass = PerImageRequest
    deployment.endpoint.answers = {}
    deployment.endpoint.requests = []
    return deployment.endpoint


def read_json(bucket: str, key: str):
    return json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def keys_under(bucket: str, prefix: str) -> list[str]:
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def timestamp(text: str) -> datetime.datetime:
    assert text.endswith("Z") and len(text) == len("2025-02-04T20:11:03.270Z"), text
    return datetime.datetime.fromisoformat(text.removesuffix("Z") + "+00:00")


def check_manifest(bucket: str, output: dict, files: dict[str, int]) -> tuple[str, dict]:
    """The Map's output and its manifest as AWS writes them; answers the result folder and the manifest."""
    map_run_arn = output["MapRunArn"]
    run_id = map_run_arn.rsplit(":", 1)[-1]
    assert output["ResultWriterDetails"]["Bucket"] == bucket
    manifest_key = output["ResultWriterDetails"]["Key"]
    folder = manifest_key.removesuffix("manifest.json")
    assert folder.endswith(f"/{run_id}/")
    manifest = read_json(bucket, manifest_key)
    assert manifest["DestinationBucket"] == bucket and manifest["MapRunArn"] == map_run_arn
    assert {status: [entry["Key"] for entry in entries] for status, entries in manifest["ResultFiles"].items()} == {
        status: [f"{folder}{status}_0.json"] if files.get(status) else []
        for status in ("FAILED", "PENDING", "SUCCEEDED")
    }
    s3 = boto3.client("s3")
    for entries in manifest["ResultFiles"].values():
        for entry in entries:
            assert entry["Size"] == s3.head_object(Bucket=bucket, Key=entry["Key"])["ContentLength"]
    assert keys_under(bucket, folder) == sorted(
        [manifest_key, *(f"{folder}{status}_0.json" for status, count in files.items() if count)]
    )
    return folder, manifest


def check_child(record: dict, map_state_machine: str, status: str) -> None:
    """A child execution's description in a result file, as AWS writes it (Transformation NONE)."""
    assert record["Status"] == status
    assert record["StateMachineArn"] == map_state_machine
    assert record["ExecutionArn"] == map_state_machine.replace(":stateMachine:", ":execution:") + ":" + record["Name"]
    assert record["InputDetails"] == {"Included": True} and record["RedriveCount"] == 0
    assert timestamp(record["StartDate"]) <= timestamp(record["StopDate"])
    if status == "SUCCEEDED":
        assert record["OutputDetails"] == {"Included": True}
        assert record["RedriveStatus"] == "NOT_REDRIVABLE"
        assert record["RedriveStatusReason"] == "Execution is SUCCEEDED and cannot be redriven"
    else:
        assert "Output" not in record and record["RedriveStatus"] == "REDRIVABLE_BY_MAP_RUN"


def test_classify_prefix_writes_its_result_files_and_manifest(deployment, endpoint):  # noqa: F811
    confident = put_image(deployment, "mixed/a_motorcycle.png", colour=(10, 200, 10))
    low = put_image(deployment, "mixed/c_bicycle.png", colour=(10, 10, 200))
    boto3.client("s3").put_object(Bucket=deployment.bucket, Key="mixed/b_notes.txt", Body=b"not a photo")
    endpoint.answers = {confident: b"[0.02, 0.97]", low: b"[0.55, 0.45]"}

    described, _ = run(deployment, "classify-prefix", {"prefix": "mixed/"})

    assert described["status"] == "SUCCEEDED", described.get("cause")
    output = json.loads(described["output"])
    assert output["MapRunArn"].startswith(f"arn:aws:states:{ACCOUNT_REGION}:mapRun:scones-dev-classify-prefix/")
    folder, _ = check_manifest(deployment.bucket, output, {"SUCCEEDED": 3})
    assert folder.startswith("batch_results/")
    records = read_json(deployment.bucket, f"{folder}SUCCEEDED_0.json")
    map_state_machine = f"arn:aws:states:{ACCOUNT_REGION}:stateMachine:scones-dev-classify-prefix/ClassifyPrefix"
    for record in records:
        check_child(record, map_state_machine, "SUCCEEDED")
    assert [json.loads(r["Input"]) for r in records] == [
        {"Key": "mixed/a_motorcycle.png"},
        {"Key": "mixed/b_notes.txt"},
        {"Key": "mixed/c_bicycle.png"},
    ]
    confident_out, skipped_out, low_out = (json.loads(r["Output"]) for r in records)
    assert confident_out == {
        "Key": "mixed/a_motorcycle.png",
        "outcome": {"status": "SUCCEEDED", "class": "motorcycle", "inferences": [0.02, 0.97]},
    }
    assert skipped_out == {"s3_key": "mixed/b_notes.txt", "skipped": True}
    # a child that ran and failed is the item's recorded outcome: the item itself succeeded
    assert low_out["Key"] == "mixed/c_bicycle.png" and low_out["outcome"]["Error"] == "States.TaskFailed"
    child = json.loads(low_out["outcome"]["Cause"])
    assert child["Status"] == "FAILED" and child["Error"] == "ThresholdConfidenceNotMet"
    assert len(endpoint.requests) == 2


def test_failed_items_go_to_failed_0_json_with_their_error(deployment):  # noqa: F811
    """A Distributed Map whose items fail or succeed by their own input (no child execution, no endpoint)."""
    definition = {
        "StartAt": "Each",
        "States": {
            "Each": {
                "Type": "Map",
                "ItemsPath": "$.items",
                "ItemProcessor": {
                    "ProcessorConfig": {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"},
                    "StartAt": "Good?",
                    "States": {
                        "Good?": {
                            "Type": "Choice",
                            "Choices": [{"Variable": "$.good", "BooleanEquals": True, "Next": "Done"}],
                            "Default": "Refuse",
                        },
                        "Done": {"Type": "Pass", "Parameters": {"done.$": "$.name"}, "End": True},
                        "Refuse": {"Type": "Fail", "Error": "NotGood", "Cause": 'item "refused"'},
                    },
                },
                "Label": "Items",
                "ResultWriter": {
                    "Resource": "arn:aws:states:::s3:putObject",
                    "Parameters": {"Bucket": deployment.bucket, "Prefix": "item_results"},
                },
                "End": True,
            }
        },
    }
    stepfunctions = boto3.client("stepfunctions")
    arn = stepfunctions.create_state_machine(
        name="items-with-failures",
        definition=json.dumps(definition),
        roleArn="arn:aws:iam::123456789012:role/scones-batch-test",
    )["stateMachineArn"]
    items = [{"name": "one", "good": True}, {"name": "two", "good": False}, {"name": "three", "good": True}]

    described = run_execution(stepfunctions, arn, {"items": items})

    assert described["status"] == "SUCCEEDED", described.get("cause")  # moto applies no tolerated failure threshold
    folder, _ = check_manifest(deployment.bucket, json.loads(described["output"]), {"SUCCEEDED": 2, "FAILED": 1})
    assert folder.startswith("item_results/")
    map_state_machine = f"arn:aws:states:{ACCOUNT_REGION}:stateMachine:items-with-failures/Items"
    succeeded = read_json(deployment.bucket, f"{folder}SUCCEEDED_0.json")
    (failed,) = read_json(deployment.bucket, f"{folder}FAILED_0.json")
    for record in succeeded:
        check_child(record, map_state_machine, "SUCCEEDED")
    check_child(failed, map_state_machine, "FAILED")
    assert [(json.loads(r["Input"]), json.loads(r["Output"])) for r in succeeded] == [
        (items[0], {"done": "one"}),
        (items[2], {"done": "three"}),
    ]
    assert json.loads(failed["Input"]) == items[1]
    assert (failed["Error"], failed["Cause"]) == ("NotGood", 'item "refused"')
    assert len({r["Name"] for r in [*succeeded, failed]}) == 3
