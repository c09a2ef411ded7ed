"""What the review API does with the review table, Step Functions and the bucket, one function per route.

A reviewer's answer resumes the waiting execution (SendTaskSuccess, or SendTaskFailure NotAVehicle for
"neither"), and every answer or correction becomes data: the photo copied to `labels/<class>/<key>` (the
folder layout `python -m training.etl --photos` stages) and one JSON line at
`reviews/<YYYY>/<MM>/<DD>/<execution>.json`. Answers print EMF lines: `ReviewAnswers` and `Overruled` by
`ModelClass`, and `NotAVehicle`; the schedule's call prints `ReviewsWaiting` and `OldestReviewAgeSeconds`. Every
metric is also by `ReviewTable` (TABLE_NAME), so that two environments in one account do not mix. With
RETRAIN_AFTER_LABELS set, every label written is counted towards a retraining (retrain.py).
"""

import functools
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from common import as_probabilities, setting
from common.review import (
    ANSWER_PK,
    NEITHER,
    TASK_PK,
    dynamodb_client,
    epoch,
    execution_of_task,
    from_item,
    iso,
    most_likely,
    to_item,
)

from review_api import retrain

PHOTO_URL_SECONDS = 300
NOT_A_VEHICLE_METRIC = "NotAVehicle"
# Every review metric's dimension: the review table, one per environment, so that dev and prod do not mix.
TABLE_DIMENSION = "ReviewTable"
# What Step Functions answers a token whose wait is over (timed out, execution stopped or finished).
CLOSED_TASK_ERRORS = ("TaskTimedOut", "TaskDoesNotExist", "InvalidToken")
EXECUTION_NAME = re.compile(r"^[A-Za-z0-9_.~-]{1,80}$")
DESCRIBE_THREADS = 8


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@functools.cache
def s3_client():
    # Signature version 4: S3 refuses older presigned URLs for objects encrypted with KMS
    return boto3.client("s3", config=Config(signature_version="s3v4"))


@functools.cache
def stepfunctions_client():
    return boto3.client("stepfunctions")


def class_names() -> list[str]:
    return [name.strip() for name in setting("CLASS_NAMES").split(",") if name.strip()]


def answer_classes() -> list[str]:
    return [*class_names(), NEITHER]


def photo_url(bucket: str, key: str) -> str | None:
    if bucket != setting("BUCKET_NAME"):
        return None
    return s3_client().generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PHOTO_URL_SECONDS
    )


def timeout_seconds() -> float | None:
    """REVIEW_TIMEOUT_SECONDS when set: tasks requested longer ago are past their deadline, and skipped by key."""
    try:
        return float(os.environ["REVIEW_TIMEOUT_SECONDS"])
    except (KeyError, ValueError):
        return None


def waiting_query(start_after: str | None, now: float) -> dict:
    """The Query parameters of the waiting tasks after `start_after`, those past their deadline left out."""
    timeout = timeout_seconds()
    if timeout is not None:
        start_after = max(start_after or "", iso(now - timeout))
    query = {
        "TableName": setting("TABLE_NAME"),
        "KeyConditionExpression": "pk = :pk" + (" AND sk > :after" if start_after else ""),
        "FilterExpression": "deadline > :now",
        "ExpressionAttributeValues": {":pk": {"S": TASK_PK}, ":now": {"N": str(int(now))}},
    }
    if start_after:
        query["ExpressionAttributeValues"][":after"] = {"S": start_after}
    return query


# ------------------------------------------------------------------------------------------ tasks


def list_tasks(limit: int, after: str | None) -> dict:
    """One page of waiting tasks, oldest first, with one Query; `next` is the `after` of the next page."""
    query = waiting_query(after, time.time())
    found = dynamodb_client().query(**query, Limit=limit + 1)  # one more tells whether a next page exists
    items = [from_item(item) for item in found["Items"]]
    if len(items) > limit:
        items, following = items[:limit], items[limit - 1]["sk"]
    else:
        following = found.get("LastEvaluatedKey", {}).get("sk", {}).get("S")
    classes = class_names()
    tasks = []
    for item in items:
        inferences = json.loads(item["inferences"])
        model_class, neither = most_likely(inferences, classes)
        tasks.append(
            {
                "id": item["sk"],
                "execution": execution_of_task(item["sk"]),
                "s3_key": item["s3_key"],
                "photo_url": photo_url(item["s3_bucket"], item["s3_key"]),
                "inferences": inferences,
                "classes": classes,
                "neither": neither,
                "model_class": model_class,
                "reason": item.get("reason", ""),
                "requested_at": item["requested_at"],
                "deadline": int(item["deadline"]),
            }
        )
    return {"tasks": tasks, "next": following}


def queue_metrics(namespace: str) -> str:
    """The EMF line of the waiting tasks: how many, and the age of the oldest (0 when none wait)."""
    now = time.time()
    query = {**waiting_query(None, now), "ProjectionExpression": "sk"}
    waiting, oldest = 0, None
    while True:  # one Query answers up to 1 MB of items: about 700 tasks a page
        found = dynamodb_client().query(**query)
        waiting += len(found["Items"])
        if oldest is None and found["Items"]:
            oldest = found["Items"][0]["sk"]["S"].partition("#")[0]
        if "LastEvaluatedKey" not in found:
            break
        query["ExclusiveStartKey"] = found["LastEvaluatedKey"]
    age = max(0.0, now - epoch(oldest)) if oldest else 0.0
    metrics = {"ReviewsWaiting": (waiting, "Count"), "OldestReviewAgeSeconds": (age, "Seconds")}
    return emf(namespace, [TABLE_DIMENSION], metrics, **{TABLE_DIMENSION: setting("TABLE_NAME")})


def emf(namespace: str, dimensions: list[str], metrics: dict, by_table: dict | None = None, **values) -> str:
    """One EMF record: `metrics` by `dimensions`, and `by_table` ({name: (value, unit)}) by the review table alone."""
    directives = [(dimensions, metrics), *([([TABLE_DIMENSION], by_table)] if by_table else [])]
    return json.dumps(
        {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": namespace,
                        "Dimensions": [names],
                        "Metrics": [{"Name": name, "Unit": unit} for name, (_, unit) in group.items()],
                    }
                    for names, group in directives
                ],
            },
            **values,
            **{name: value for _, group in directives for name, (value, _) in group.items()},
        }
    )


# ---------------------------------------------------------------------------------------- answers


def checked_class(body: dict) -> str:
    chosen = body.get("class")
    if chosen not in answer_classes():
        raise HttpError(400, f"class {chosen!r} is not one of {', '.join(answer_classes())}: send one of those.")
    return chosen


def require_bucket(bucket: str, key: str) -> None:
    if bucket != setting("BUCKET_NAME") or not key:
        raise HttpError(
            400,
            f"The photo s3://{bucket}/{key} is not in the workflow's bucket {setting('BUCKET_NAME')}: it cannot be "
            "shown or labelled here; classify photos uploaded to that bucket.",
        )


def claim(name: str, values: dict) -> None:
    """Write the answer item of execution `name` unless one is there: 409 when another answer came first."""
    try:
        dynamodb_client().put_item(
            TableName=setting("TABLE_NAME"),
            Item=to_item({"pk": ANSWER_PK, "sk": name, **values}),
            ConditionExpression="attribute_not_exists(sk)",
        )
    except ClientError as error:
        if error.response["Error"]["Code"] != "ConditionalCheckFailedException":
            raise
        raise already_answered(name) from None


def already_answered(name: str) -> HttpError:
    found = dynamodb_client().get_item(
        TableName=setting("TABLE_NAME"), Key=to_item({"pk": ANSWER_PK, "sk": name}), ConsistentRead=True
    )
    answer = from_item(found.get("Item", {}))
    return HttpError(
        409,
        f"{name} was already answered {answer.get('class', '')!r} by {answer.get('reviewer', 'another reviewer')} "
        f"at {answer.get('answered_at', 'an earlier time')}; nothing was changed. Reload the page.",
    )


def delete(pk: str, sk: str) -> None:
    dynamodb_client().delete_item(TableName=setting("TABLE_NAME"), Key=to_item({"pk": pk, "sk": sk}))


def gone(task: str, why: str) -> HttpError:
    delete(TASK_PK, task)
    return HttpError(410, f"The task {task} can no longer be answered: {why}. Nothing was recorded.")


def answer_task(body: dict, reviewer: str) -> dict:
    task, chosen = body.get("task"), checked_class(body)
    if not isinstance(task, str) or not task:
        raise HttpError(400, 'The body has no task: send {"task": "<id from /api/tasks>", "class": "..."}.')
    name = execution_of_task(task)
    table = setting("TABLE_NAME")
    found = dynamodb_client().get_item(TableName=table, Key=to_item({"pk": TASK_PK, "sk": task}), ConsistentRead=True)
    if "Item" not in found:
        if name and "Item" in dynamodb_client().get_item(
            TableName=table, Key=to_item({"pk": ANSWER_PK, "sk": name}), ConsistentRead=True
        ):
            raise already_answered(name)
        raise HttpError(404, f"No task {task!r} is waiting for a review: take a task id from /api/tasks.")
    item = from_item(found["Item"])
    require_bucket(item["s3_bucket"], item["s3_key"])
    if time.time() >= item["deadline"]:
        raise gone(task, f"its deadline {iso(item['deadline'])} has passed and the execution has timed out")
    inferences = json.loads(item["inferences"])
    model_class, neither = most_likely(inferences, class_names())
    record = {
        "execution": name,
        "s3_key": item["s3_key"],
        "model_class": model_class,
        "inferences": inferences,
        "class": chosen,
        "reviewer": reviewer,
        "answered_at": iso(time.time()),
        "kind": "task",
    }
    claim(name, {key: record[key] for key in ("class", "model_class", "reviewer", "answered_at", "s3_key", "kind")})
    try:
        why = closed(item["execution_arn"]) or resume(item, record, neither)
    except ClientError:
        delete(ANSWER_PK, name)
        raise
    if why:
        delete(ANSWER_PK, name)
        raise gone(task, why)
    label = record_answer(item["s3_bucket"], record)
    delete(TASK_PK, task)
    return {"execution": name, "class": chosen, "label": label}


def closed(execution_arn: str) -> str | None:
    """Why the execution no longer takes an answer, or None while it waits."""
    try:
        status = stepfunctions_client().describe_execution(executionArn=execution_arn)["status"]
    except ClientError as error:
        if error.response["Error"]["Code"] != "ExecutionDoesNotExist":
            raise
        return "its execution no longer exists"
    return None if status == "RUNNING" else f"its execution is {status}, no longer waiting"


def resume(item: dict, record: dict, neither: float) -> str | None:
    """Answer the waiting execution; None once it took the answer, else why it did not (its wait is over)."""
    try:
        send(item, record, neither)
    except ClientError as error:
        code = error.response["Error"]["Code"]
        if code not in CLOSED_TASK_ERRORS:
            raise
        return f"Step Functions answered {code}"
    return None


def send(item: dict, record: dict, neither: float) -> None:
    if record["class"] == NEITHER:
        stepfunctions_client().send_task_failure(
            taskToken=item["task_token"],
            error="NotAVehicle",
            cause=(
                f"{record['reviewer']} saw no {' and no '.join(class_names())} in s3://{item['s3_bucket']}/"
                f"{item['s3_key']} (the model's answer: {record['model_class']}, {record['inferences']})."
            ),
        )
        return
    output = {
        "s3_bucket": item["s3_bucket"],
        "s3_key": item["s3_key"],
        "class": record["class"],
        "source": "review",
        "inferences": record["inferences"],
        "neither": neither,
        "model_class": record["model_class"],
        "reviewer": record["reviewer"],
        "reviewed_at": record["answered_at"],
    }
    stepfunctions_client().send_task_success(taskToken=item["task_token"], output=json.dumps(output))


def record_answer(bucket: str, record: dict) -> str | None:
    """The photo under labels/<class>/, the JSON line under reviews/, the EMF line; answers the label's URL,
    or None when the photo is no longer there to copy (the answer is recorded all the same)."""
    label_key = f"{retrain.LABELS_PREFIX}{record['class']}/{record['s3_key']}"
    try:
        s3_client().copy_object(Bucket=bucket, Key=label_key, CopySource={"Bucket": bucket, "Key": record["s3_key"]})
        label = f"s3://{bucket}/{label_key}"
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("NoSuchKey", "404"):
            raise
        label = None
    day = record["answered_at"][:10].replace("-", "/")
    s3_client().put_object(
        Bucket=bucket,
        Key=f"reviews/{day}/{record['execution']}.json",
        Body=(json.dumps(record) + "\n").encode(),
        ContentType="application/x-ndjson",
    )
    overruled = int(record["class"] != record["model_class"])
    metrics = {"ReviewAnswers": (1, "Count"), "Overruled": (overruled, "Count")}
    # An execution a reviewer failed on purpose: the monitoring stack's failure-rate alarm leaves these out.
    not_a_vehicle = int(record["kind"] == "task" and record["class"] == NEITHER)
    print(
        emf(
            setting("METRIC_NAMESPACE"),
            [TABLE_DIMENSION, "ModelClass"],
            metrics,
            {NOT_A_VEHICLE_METRIC: (not_a_vehicle, "Count")},
            ModelClass=record["model_class"],
            **{TABLE_DIMENSION: setting("TABLE_NAME")},
            ReviewerClass=record["class"],
            Kind=record["kind"],
        )
    )
    if label:
        retrain.count_label(bucket)
    return label


# ------------------------------------------------------------------------------------ corrections


def execution_arn(name: str) -> str:
    state_machine = setting("STATE_MACHINE_ARN")
    return f"{state_machine.replace(':stateMachine:', ':execution:', 1)}:{name}"


def succeeded(described: dict) -> dict:
    """What a recent answer shows of a described execution."""
    output = json.loads(described.get("output") or "{}")
    inferences = as_probabilities(output.get("inferences")) or []
    return {
        "execution": described["name"],
        "s3_bucket": output.get("s3_bucket"),
        "s3_key": output.get("s3_key"),
        "photo_url": photo_url(output.get("s3_bucket"), output.get("s3_key")) if output.get("s3_key") else None,
        "class": output.get("class"),
        "classes": class_names(),
        "model_class": output.get("model_class", output.get("class")),
        "inferences": inferences,
        "neither": output.get("neither", most_likely(inferences, class_names())[1] if inferences else None),
        "source": output.get("source", "model"),
        "stopped_at": described["stopDate"].isoformat(),
    }


def recent(limit: int) -> dict:
    listed = stepfunctions_client().list_executions(
        stateMachineArn=setting("STATE_MACHINE_ARN"), statusFilter="SUCCEEDED", maxResults=limit
    )["executions"]
    client = stepfunctions_client()
    with ThreadPoolExecutor(DESCRIBE_THREADS) as pool:
        described = list(pool.map(lambda e: client.describe_execution(executionArn=e["executionArn"]), listed))
    return {"answers": [succeeded(d) for d in sorted(described, key=lambda d: d["stopDate"], reverse=True)]}


def correct(body: dict, reviewer: str) -> dict:
    name, chosen = body.get("execution"), checked_class(body)
    if not isinstance(name, str) or not EXECUTION_NAME.match(name):
        raise HttpError(404, f"No execution {name!r}: take an execution name from /api/recent.")
    try:
        described = stepfunctions_client().describe_execution(executionArn=execution_arn(name))
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("ExecutionDoesNotExist", "InvalidArn"):
            raise
        raise HttpError(
            404, f"No execution {name!r} of the classify state machine: take one from /api/recent."
        ) from None
    if described["status"] != "SUCCEEDED":
        raise HttpError(404, f"{name} is {described['status']}: only succeeded executions' answers can be corrected.")
    answer = succeeded(described)
    require_bucket(answer["s3_bucket"] or "", answer["s3_key"] or "")
    record = {
        "execution": name,
        "s3_key": answer["s3_key"],
        "model_class": answer["model_class"],
        "inferences": answer["inferences"],
        "class": chosen,
        "reviewer": reviewer,
        "answered_at": iso(time.time()),
        "kind": "correction",
    }
    claim(name, {key: record[key] for key in ("class", "model_class", "reviewer", "answered_at", "s3_key", "kind")})
    label = record_answer(answer["s3_bucket"], record)
    return {"execution": name, "class": chosen, "label": label}
