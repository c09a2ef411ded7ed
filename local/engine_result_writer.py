"""The Distributed Map's result files, written as AWS writes them, for moto 5.2.5's Step Functions engine.

With a `ResultWriter`, AWS exports every child workflow execution of a Map Run to the bucket, grouped by
status, under `<Prefix>/<map run id>/`: `SUCCEEDED_0.json`, `FAILED_0.json` (failed, timed out or aborted
children) and `PENDING_0.json` (children that never finished), each a JSON array of the executions'
descriptions, and only for a status that has executions; then `manifest.json`:
`{"DestinationBucket", "MapRunArn", "ResultFiles": {"FAILED": [...], "PENDING": [...], "SUCCEEDED":
[{"Key", "Size"}]}}`. The Map state's output names the manifest:
`{"MapRunArn", "ResultWriterDetails": {"Bucket", "Key"}}`. moto writes only an empty manifest.

moto runs each item of a Distributed Map in the parent's process rather than as a child execution; the
record of each item here takes the child execution's place with AWS's naming: its ARN is
`arn:...:execution:<state machine>/<map label>:<name>` and its state machine `...:stateMachine:<state
machine>/<map label>`, as the Map Run's own ARN is formed.

`install()` patches the engine in this process.
"""

from __future__ import annotations

import copy
import datetime
import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from moto.stepfunctions.parser.asl.component.state.exec.state_map.iteration.itemprocessor.distributed_item_processor_worker import (  # noqa: E501
    DistributedItemProcessorWorker,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_map.result_writer.resource_eval import (
    resource_eval_s3,
)
from moto.stepfunctions.parser.asl.eval.program_state import (
    ProgramEnded,
    ProgramError,
    ProgramStopped,
    ProgramTimedOut,
)

RESULT_STATUSES = ("FAILED", "PENDING", "SUCCEEDED")  # the manifest's groups, in the order AWS lists them
_lock = threading.Lock()


def _timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass
class ItemRun:
    """One item of a Map Run: what AWS reports of the child execution that ran it."""

    index: int
    name: str
    input: Any
    start: datetime.datetime
    status: str = "PENDING"
    stop: datetime.datetime | None = None
    output: Any = None
    error: str | None = None
    cause: str | None = None

    def describe(self, map_state_machine_arn: str) -> dict:
        if self.status == "PENDING":
            return {"Input": _compact(self.input), "InputDetails": {"Included": True}, "Status": "PENDING"}
        described = {
            "ExecutionArn": f"{map_state_machine_arn.replace(':stateMachine:', ':execution:')}:{self.name}",
            "Input": _compact(self.input),
            "InputDetails": {"Included": True},
            "Name": self.name,
            "RedriveCount": 0,
            "StartDate": _timestamp(self.start),
            "StateMachineArn": map_state_machine_arn,
            "Status": self.status,
            "StopDate": _timestamp(self.stop),
        }
        if self.status == "SUCCEEDED":
            described |= {
                "Output": _compact(self.output),
                "OutputDetails": {"Included": True},
                "RedriveStatus": "NOT_REDRIVABLE",
                "RedriveStatusReason": "Execution is SUCCEEDED and cannot be redriven",
            }
        else:
            described["RedriveStatus"] = "REDRIVABLE_BY_MAP_RUN"
            described |= {key: value for key, value in (("Error", self.error), ("Cause", self.cause)) if value}
        return dict(sorted(described.items()))


def item_runs(map_run_record) -> dict[int, ItemRun]:
    """The items of a Map Run recorded so far, by index."""
    with _lock:
        return map_run_record.__dict__.setdefault("_scones_item_runs", {})


def _outcome(run: ItemRun, state, output: Any) -> None:
    run.stop = datetime.datetime.now(datetime.UTC)
    if isinstance(state, ProgramEnded):
        run.status, run.output = "SUCCEEDED", output
    elif isinstance(state, ProgramError):
        run.status = "FAILED"
        run.error, run.cause = (state.error or {}).get("error"), (state.error or {}).get("cause")
    elif isinstance(state, ProgramTimedOut):
        run.status, run.error = "TIMED_OUT", "States.Timeout"
    elif isinstance(state, ProgramStopped):
        run.status, run.error, run.cause = "ABORTED", state.error, state.cause
    else:  # the item's evaluation raised before its program could end
        run.status, run.error = "FAILED", "States.Runtime"


def _write(bucket: str, key: str, body: bytes, region: str, credentials) -> None:
    s3 = resource_eval_s3.boto_client_for(region=region, service="s3", state_credentials=credentials)
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")


def write_results(env, resource_runtime_part, state_credentials) -> None:
    """The ResultWriter's `arn:aws:states:::s3:putObject`: the result files, the manifest, the state's output."""
    parameters = env.stack.pop()
    env.stack.pop()  # the items' outputs, which the result files hold instead
    map_run_record = env.map_run_record_pool_manager.get_all().pop()
    bucket, prefix = parameters["Bucket"], parameters.get("Prefix", "")
    folder = f"{prefix.rstrip('/')}/" if prefix else ""
    folder += map_run_record.map_run_arn.split(":")[-1] + "/"

    grouped: dict[str, list[dict]] = {status: [] for status in RESULT_STATUSES}
    for _, run in sorted(item_runs(map_run_record).items()):
        group = run.status if run.status in ("SUCCEEDED", "PENDING") else "FAILED"
        grouped[group].append(run.describe(map_run_record.map_state_machine_arn))
    files: dict[str, list[dict]] = {status: [] for status in RESULT_STATUSES}
    for status, described in grouped.items():
        if described:
            key, body = f"{folder}{status}_0.json", json.dumps(described).encode()
            _write(bucket, key, body, resource_runtime_part.region, state_credentials)
            files[status].append({"Key": key, "Size": len(body)})
    manifest = {"DestinationBucket": bucket, "MapRunArn": map_run_record.map_run_arn, "ResultFiles": files}
    manifest_key = f"{folder}manifest.json"
    _write(bucket, manifest_key, json.dumps(manifest).encode(), resource_runtime_part.region, state_credentials)
    env.stack.append(
        {"MapRunArn": map_run_record.map_run_arn, "ResultWriterDetails": {"Bucket": bucket, "Key": manifest_key}}
    )


def install() -> None:
    """Record each Distributed Map item's run, and write the result files where the ResultWriter says."""
    if getattr(DistributedItemProcessorWorker, "_scones_records_items", False):
        return
    eval_input = DistributedItemProcessorWorker._eval_input
    eval_job = DistributedItemProcessorWorker._eval_job

    def record_input(self, env_frame) -> None:
        eval_input(self, env_frame)
        env_frame._scones_item_input = copy.deepcopy(env_frame.states.get_input())

    def record_job(self, env, job) -> None:
        run = ItemRun(
            index=job.job_index,
            name=str(uuid.uuid4()),
            input=job.job_input,
            start=datetime.datetime.now(datetime.UTC),
        )
        item_runs(self._map_run_record)[job.job_index] = run
        eval_job(self, env, job)
        run.input = getattr(env, "_scones_item_input", job.job_input)
        _outcome(run, env.program_state(), job.job_output)

    DistributedItemProcessorWorker._eval_input = record_input
    DistributedItemProcessorWorker._eval_job = record_job
    resource_eval_s3.ResourceEvalS3._handle_put_object = staticmethod(write_results)
    DistributedItemProcessorWorker._scones_records_items = True
